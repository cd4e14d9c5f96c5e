"""The fake proxy itself keeps to the contract (../shared/docs/cliproxyapi-contract.md), so
that tests built on it mean something."""

from __future__ import annotations

import pytest
import requests

from tests.fakes.proxy import FakeProxy, SettableClock

KEY = "mgmt"


@pytest.fixture
def proxy():
    p = FakeProxy(management_key=KEY).start()
    yield p
    p.stop()


def call(proxy, method, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, f"{proxy.url}/v0/management{path}", headers=headers, timeout=5, **kw)


def chat(proxy, key, model="mock-gpt"):
    return requests.post(f"{proxy.url}/v1/chat/completions", json={"model": model},
                         headers={"Authorization": f"Bearer {key}"}, timeout=5)


def test_empty_list_reads_as_null(proxy):
    assert call(proxy, "GET", "/api-keys").json() == {"api-keys": None}


def test_put_forms_and_the_empty_items_quirk(proxy):
    assert call(proxy, "PUT", "/api-keys", json=["a"]).json() == {"status": "ok"}
    assert call(proxy, "PUT", "/api-keys", json={"items": ["b", "b"]}).status_code == 200
    assert proxy.api_keys == ["b", "b"]  # duplicates stored as given
    assert call(proxy, "PUT", "/api-keys", json={"items": []}).json() == {"error": "invalid body"}
    assert call(proxy, "PUT", "/api-keys", data="garbage").status_code == 400
    assert call(proxy, "PUT", "/api-keys", json=[]).status_code == 200  # a bare [] empties it
    assert proxy.api_keys == []


def test_patch_appends_when_old_is_missing(proxy):
    proxy.api_keys = ["a"]
    call(proxy, "PATCH", "/api-keys", json={"old": "zzz", "new": "b"})
    assert proxy.api_keys == ["a", "b"]
    call(proxy, "PATCH", "/api-keys", json={"index": 0, "value": "c"})
    assert proxy.api_keys == ["c", "b"]
    assert call(proxy, "PATCH", "/api-keys", json={"index": 5, "value": "x"}).json() == {"error": "missing fields"}
    assert call(proxy, "PATCH", "/api-keys", json={"foo": 1}).status_code == 400


def test_delete_by_value_answers_ok_even_when_nothing_matched(proxy):
    proxy.api_keys = ["a", "b", "a"]
    assert call(proxy, "DELETE", "/api-keys", params={"value": "a"}).status_code == 200
    assert proxy.api_keys == ["b"]
    assert call(proxy, "DELETE", "/api-keys", params={"value": "nope"}).status_code == 200
    assert call(proxy, "DELETE", "/api-keys").json() == {"error": "missing index or value"}


def test_auth_order_and_the_ban_after_five_failures(proxy):
    assert call(proxy, "GET", "/api-keys", key=None).json() == {"error": "missing management key"}
    for _ in range(3):
        assert call(proxy, "GET", "/api-keys", key="wrong").json() == {"error": "invalid management key"}
    assert call(proxy, "GET", "/api-keys", key="wrong").status_code == 401  # the 5th failure
    banned = call(proxy, "GET", "/api-keys")  # even the right key now
    assert banned.status_code == 403 and "banned" in banned.json()["error"]


def test_no_management_secret_and_disabled_management(proxy):
    proxy.management_key = ""
    assert call(proxy, "GET", "/api-keys").json() == {"error": "remote management key not set"}
    proxy.management_key = KEY
    proxy.management_enabled = False
    assert call(proxy, "GET", "/api-keys").status_code == 404


def test_client_keys_template_keys_and_the_open_proxy(proxy):
    assert chat(proxy, "anything").status_code == 200  # empty list: open proxy
    proxy.api_keys = ["k1"]
    proxy.restart()
    assert chat(proxy, "k1").status_code == 200
    assert chat(proxy, "k2").json() == {"error": "Invalid API key"}
    assert chat(proxy, "k1", model="no-such-model").status_code == 502
    proxy.api_keys = ["k1", "your-api-key-1"]
    proxy.restart()
    assert chat(proxy, "k1").json() == {"error": "unsafe_example_api_key"}


def test_every_key_carrier_is_accepted(proxy):
    proxy.api_keys = ["k1"]
    proxy.restart()
    url = f"{proxy.url}/v1/chat/completions"
    body = {"model": "mock-gpt"}
    assert requests.post(url, json=body, headers={"X-Api-Key": "k1"}, timeout=5).ok
    assert requests.post(url, json=body, headers={"X-Goog-Api-Key": "k1"}, timeout=5).ok
    assert requests.post(url, json=body, params={"key": "k1"}, timeout=5).ok
    assert requests.post(url, json=body, params={"auth_token": "k1"}, timeout=5).ok


def test_queue_pops_destructively_and_validates_count(proxy):
    proxy.api_keys = ["k1"]
    proxy.restart()
    chat(proxy, "k1")
    chat(proxy, "k1", model="claude-mock")
    chat(proxy, "k1", model="mock-fail")
    assert call(proxy, "GET", "/usage-queue", params={"count": "0"}).json() == {
        "error": "count must be a positive integer"}
    assert call(proxy, "GET", "/usage-queue", params={"count": "x"}).status_code == 400
    assert len(call(proxy, "GET", "/usage-queue").json()) == 1  # count defaults to 1
    rest = call(proxy, "GET", "/usage-queue", params={"count": "10"}).json()
    assert [(r["alias"], r["model"], r["failed"]) for r in rest] == [
        ("claude-mock", "claude-mock-upstream", False), ("mock-fail", "mock-fail", True)]
    assert call(proxy, "GET", "/usage-queue", params={"count": "10"}).json() == []
    assert call(proxy, "GET", "/usage").status_code == 404  # the new generation has no snapshot


def test_queue_records_expire_after_the_retention(proxy):
    now = [1_000.0]
    proxy.clock = lambda: now[0]
    proxy.add_usage("k1")
    now[0] += proxy.retention_seconds + 1
    assert call(proxy, "GET", "/usage-queue", params={"count": "10"}).json() == []


def test_statistics_off_records_nothing(proxy):
    assert call(proxy, "PUT", "/usage-statistics-enabled", json={"value": False}).status_code == 200
    assert call(proxy, "GET", "/usage-statistics-enabled").json() == {"usage-statistics-enabled": False}
    chat(proxy, "anyone")
    assert call(proxy, "GET", "/usage-queue", params={"count": "10"}).json() == []


def test_snapshot_generation_accumulates_and_restart_forgets():
    proxy = FakeProxy(generation="snapshot", management_key=KEY, api_keys=["k1"]).start()
    try:
        chat(proxy, "k1")
        chat(proxy, "k1", model="claude-mock")
        chat(proxy, "unknown")  # refused before routing: not counted
        usage = call(proxy, "GET", "/usage").json()["usage"]
        assert usage["total_requests"] == 2 and usage["total_tokens"] == 36
        assert set(usage["apis"]["k1"]["models"]) == {"mock-gpt", "claude-mock-upstream"}
        assert call(proxy, "GET", "/usage-queue", params={"count": "1"}).status_code == 404
        proxy.restart()
        assert call(proxy, "GET", "/usage").json()["usage"]["total_requests"] == 0
        assert proxy.api_keys == ["k1"]  # config.yaml survives a restart
    finally:
        proxy.stop()


def test_read_only_config_fails_writes(proxy):
    proxy.config_read_only = True
    answer = call(proxy, "PUT", "/api-keys", json=["a"])
    assert answer.status_code == 500 and answer.json()["error"].startswith("failed to save config")


Clock = SettableClock


@pytest.fixture
def clock(proxy) -> Clock:
    proxy.clock = Clock()
    return proxy.clock


def test_a_good_login_resets_the_count(proxy):
    for _ in range(4):
        call(proxy, "GET", "/api-keys", key="wrong")
    assert call(proxy, "GET", "/api-keys").status_code == 200
    for _ in range(4):
        assert call(proxy, "GET", "/api-keys", key="wrong").status_code == 401
    assert call(proxy, "GET", "/api-keys").status_code == 200
    assert proxy.peak_failures == 4 and proxy.refused_logins == 8


def test_a_ban_ends_after_30_minutes_with_a_clean_count(proxy, clock):
    for _ in range(5):
        call(proxy, "GET", "/api-keys", key="wrong")
    assert call(proxy, "GET", "/api-keys").status_code == 403
    clock.now += 30 * 60 + 1
    for _ in range(4):
        assert call(proxy, "GET", "/api-keys", key="wrong").status_code == 401
    assert call(proxy, "GET", "/api-keys").status_code == 200


def test_an_idle_count_lasts_until_the_hourly_sweep_after_two_hours(proxy, clock):
    for _ in range(4):
        call(proxy, "GET", "/api-keys", key="wrong")  # sweeps run at +1 h, +2 h, +3 h...
    clock.now += 2 * 3600 + 59 * 60  # idle for exactly 2 h at the +2 h sweep: still counted
    call(proxy, "GET", "/api-keys", key="wrong")
    assert call(proxy, "GET", "/api-keys").status_code == 403  # the 5th failure banned it


def test_an_idle_count_is_gone_after_the_sweep_past_two_hours(proxy, clock):
    for _ in range(4):
        call(proxy, "GET", "/api-keys", key="wrong")
    clock.now += 3 * 3600 + 1  # the +3 h sweep found it idle for over 2 h
    call(proxy, "GET", "/api-keys", key="wrong")
    assert call(proxy, "GET", "/api-keys").status_code == 200
    assert proxy.peak_failures == 4
