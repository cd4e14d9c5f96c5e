"""The proxy client against HTTP faked at the boundary with `responses`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from pool.upstream import (
    EmptyKeyListRefused,
    ProxyClient,
    UpstreamNotConfigured,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnexpected,
    UpstreamUnreachable,
)
from tests.fakes.proxy import SettableClock

BASE = "http://proxy.test:8317"
M = f"{BASE}/v0/management"
SECRET = "s3cret-management-key"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

pytestmark = pytest.mark.django_db


@pytest.fixture
def client() -> ProxyClient:
    return ProxyClient(base_url=BASE, management_key=SECRET, timeout=2)


@pytest.fixture
def rsps():
    with responses.RequestsMock() as mock:
        yield mock


# --- /api-keys ------------------------------------------------------------------------------


def test_list_keys_sends_the_management_key_as_bearer(client, rsps):
    rsps.get(
        f"{M}/api-keys",
        json={"api-keys": ["a", "b"]},
        match=[matchers.header_matcher({"Authorization": f"Bearer {SECRET}"})],
    )
    assert client.list_keys() == ["a", "b"]


def test_null_key_list_means_no_keys(client, rsps):
    rsps.get(f"{M}/api-keys", json={"api-keys": None})
    assert client.list_keys() == []


@pytest.mark.parametrize(
    "body",
    [{"keys": []}, {"api-keys": "a"}, {"api-keys": [1, 2]}, ["a"], "null"],
    ids=["missing-field", "string", "numbers", "bare-list", "null"],
)
def test_key_list_of_the_wrong_shape_is_unexpected(client, rsps, body):
    rsps.get(f"{M}/api-keys", json=body)
    with pytest.raises(UpstreamUnexpected):
        client.list_keys()


def test_non_json_answer_is_unexpected(client, rsps):
    rsps.get(f"{M}/api-keys", body="<html>gateway</html>", status=200)
    with pytest.raises(UpstreamUnexpected, match="not JSON"):
        client.list_keys()


def test_replace_keys_puts_the_whole_list_once(client, rsps):
    put = rsps.put(
        f"{M}/api-keys", json={"status": "ok"}, match=[matchers.json_params_matcher(["a", "b"])]
    )
    client.replace_keys(["a", "b"])
    assert put.call_count == 1


def test_replacing_with_an_empty_list_is_refused_without_a_request(client, rsps):
    with pytest.raises(EmptyKeyListRefused, match="every request"):
        client.replace_keys([])
    assert len(rsps.calls) == 0


def test_write_without_ok_status_is_unexpected(client, rsps):
    rsps.put(f"{M}/api-keys", json={"status": "maybe"})
    with pytest.raises(UpstreamUnexpected, match="did not confirm"):
        client.replace_keys(["a"])


def test_write_to_read_only_config_names_the_proxys_reason(client, rsps):
    rsps.put(
        f"{M}/api-keys",
        status=500,
        json={"error": "failed to save config: open config.yaml: read-only file system"},
    )
    with pytest.raises(UpstreamUnexpected, match="HTTP 500: failed to save config"):
        client.replace_keys(["a"])


def test_patch_and_delete_use_the_contracts_shapes(client, rsps):
    rsps.patch(f"{M}/api-keys", json={"status": "ok"},
               match=[matchers.json_params_matcher({"old": "a", "new": "b"})])
    rsps.patch(f"{M}/api-keys", json={"status": "ok"},
               match=[matchers.json_params_matcher({"index": 0, "value": "c"})])
    rsps.delete(f"{M}/api-keys", json={"status": "ok"},
                match=[matchers.query_param_matcher({"value": "c"})])
    rsps.delete(f"{M}/api-keys", json={"status": "ok"},
                match=[matchers.query_param_matcher({"index": "1"})])
    client.replace_key(old="a", new="b")
    client.replace_key_at(index=0, value="c")
    client.delete_key(value="c")
    client.delete_key_at(index=1)
    assert len(rsps.calls) == 4


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_refusal_is_not_retried_and_names_the_setting(client, rsps, status):
    error = "invalid management key" if status == 401 else "remote management disabled"
    rsps.get(f"{M}/api-keys", status=status, json={"error": error})
    with pytest.raises(UpstreamRefused) as caught:
        client.list_keys()
    assert len(rsps.calls) == 1
    assert error in str(caught.value)
    if status == 401:
        assert "CLIPROXY_MANAGEMENT_KEY" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_after_a_refusal_nothing_more_is_sent_with_that_key(client, rsps):
    rsps.get(f"{M}/api-keys", status=401, json={"error": "invalid management key"})
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    # Another client, another process (the cache is shared): still nothing is sent.
    other = ProxyClient(base_url=BASE, management_key=SECRET, timeout=2)
    with pytest.raises(UpstreamRefused, match="Nothing was sent"):
        other.usage_statistics_enabled()
    assert len(rsps.calls) == 1


def test_a_corrected_key_is_tried_at_once(client, rsps):
    rsps.get(f"{M}/api-keys", status=401, json={"error": "invalid management key"})
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    rsps.replace(responses.GET, f"{M}/api-keys", json={"api-keys": ["a"]})
    fixed = ProxyClient(base_url=BASE, management_key="the-right-one", timeout=2)
    assert fixed.list_keys() == ["a"]


def test_banned_address_is_explained(client, rsps):
    rsps.get(f"{M}/api-keys", status=403,
             json={"error": "IP banned due to too many failed attempts. Try again in 29m"})
    with pytest.raises(UpstreamRefused, match="banned for 30 minutes"):
        client.list_keys()


def test_not_found_says_the_route_is_missing(client, rsps):
    rsps.get(f"{M}/api-keys", status=404, body="404 page not found")
    with pytest.raises(UpstreamNotFound, match="404"):
        client.list_keys()


def test_server_error_is_unexpected(client, rsps):
    rsps.get(f"{M}/api-keys", status=500, body="boom")
    with pytest.raises(UpstreamUnexpected, match="HTTP 500: boom"):
        client.list_keys()


def test_timeout_is_unreachable_and_names_the_setting(client, rsps):
    rsps.get(f"{M}/api-keys", body=requests.ReadTimeout("slow"))
    with pytest.raises(UpstreamUnreachable, match="CLIPROXY_TIMEOUT"):
        client.list_keys()


def test_connection_failure_is_unreachable_and_names_the_url(client, rsps):
    rsps.get(f"{M}/api-keys", body=requests.ConnectionError("refused"))
    with pytest.raises(UpstreamUnreachable, match="proxy.test:8317"):
        client.list_keys()


def test_a_long_error_body_is_cut(client, rsps):
    rsps.get(f"{M}/api-keys", status=502, body="x" * 5000)
    with pytest.raises(UpstreamUnexpected) as caught:
        client.list_keys()
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "url, key", [("", SECRET), (BASE, "")], ids=["no-url", "no-key"]
)
def test_missing_settings_are_named(url, key):
    with pytest.raises(UpstreamNotConfigured, match="CLIPROXY_"):
        ProxyClient(base_url=url, management_key=key, timeout=1)


# --- usage ----------------------------------------------------------------------------------


def test_statistics_switch_reads_and_writes(client, rsps):
    rsps.get(f"{M}/usage-statistics-enabled", json={"usage-statistics-enabled": False})
    rsps.put(f"{M}/usage-statistics-enabled", json={"status": "ok"},
             match=[matchers.json_params_matcher({"value": True})])
    assert client.usage_statistics_enabled() is False
    client.set_usage_statistics_enabled(True)


def test_statistics_switch_without_a_boolean_is_unexpected(client, rsps):
    rsps.get(f"{M}/usage-statistics-enabled", json={"usage-statistics-enabled": "yes"})
    with pytest.raises(UpstreamUnexpected):
        client.usage_statistics_enabled()


def test_snapshot_fixture_parses_into_records(client, rsps):
    rsps.get(f"{M}/usage", body=(FIXTURES / "usage-snapshot-v6.9.47.json").read_text())
    snapshot = client.usage_snapshot()
    records = list(snapshot.records())
    assert snapshot.total_requests == 4 and snapshot.failure_count == 1
    assert len(records) == 4
    assert {r.api_key for r in records} == {"client-key-1", "client-key-2"}
    claude = next(r for r in records if r.model == "claude-mock-upstream")
    assert (claude.tokens.input, claude.tokens.output, claude.tokens.total) == (13, 5, 18)
    assert [r.failed for r in records].count(True) == 1
    assert sum(r.tokens.total for r in records) == snapshot.total_tokens == 54


def test_queue_fixture_parses_into_records(client, rsps):
    rsps.get(f"{M}/usage-queue", body=(FIXTURES / "usage-queue-v7.2.140.json").read_bytes(),
             match=[matchers.query_param_matcher({"count": "10"})])
    records = client.usage_queue_pop(count=10)
    assert len(records) == 4
    first = records[0]
    assert first.api_key == "client-key-1" and first.model == "mock-gpt"
    assert first.timestamp.tzinfo is not None and first.timestamp.microsecond == 9973
    assert first.status_code == 200 and first.failed is False
    claude = records[2]
    assert (claude.alias, claude.model, claude.endpoint) == (
        "claude-mock", "claude-mock-upstream", "POST /v1/messages")
    failed = records[3]
    assert failed.failed and failed.status_code == 500 and failed.tokens.total == 0


def test_empty_queue_is_an_empty_list(client, rsps):
    rsps.get(f"{M}/usage-queue", json=[])
    assert client.usage_queue_pop(count=100) == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"a": 1}', b'[{"timestamp": "yesterday", "api_key": "k"}]',
     b'[{"timestamp": "2026-11-22T03:10:52Z", "api_key": "k", "tokens": {"input_tokens": "9"}}]',
     b"[1, 2]"],
    ids=["not-json", "object", "bad-timestamp", "string-tokens", "numbers"],
)
def test_queue_garbage_is_unexpected(client, rsps, body):
    rsps.get(f"{M}/usage-queue", body=body)
    with pytest.raises(UpstreamUnexpected):
        client.usage_queue_pop(count=5)


def test_queue_records_ignore_unknown_fields(client, rsps):
    record = {"timestamp": "2026-11-22T03:10:52.1Z", "api_key": "k", "model": "m",
              "tokens": {"input_tokens": 1, "total_tokens": 1}, "brand_new_field": {"x": 1}}
    rsps.get(f"{M}/usage-queue", body=json.dumps([record]))
    [parsed] = client.usage_queue_pop(count=1)
    assert parsed.tokens.input == 1 and parsed.tokens.output == 0


@pytest.mark.parametrize("count", [0, -1, True, 1.5])
def test_queue_count_must_be_a_positive_integer(client, rsps, count):
    with pytest.raises(ValueError):
        client.usage_queue_pop_raw(count=count)
    assert len(rsps.calls) == 0


def test_usage_mode_queue_is_found_without_popping(client, rsps):
    probe = rsps.get(f"{M}/usage-queue", status=400,
                     json={"error": "count must be a positive integer"},
                     match=[matchers.query_param_matcher({"count": "0"})])
    assert client.usage_mode() == "queue"
    assert probe.call_count == 1


def test_usage_mode_snapshot_when_the_queue_is_unknown(client, rsps):
    rsps.get(f"{M}/usage-queue", status=404, body="404 page not found")
    rsps.get(f"{M}/usage-statistics-enabled", json={"usage-statistics-enabled": True})
    assert client.usage_mode() == "snapshot"


def test_usage_mode_with_management_disabled_is_not_found(client, rsps):
    rsps.get(f"{M}/usage-queue", status=404, body="404 page not found")
    rsps.get(f"{M}/usage-statistics-enabled", status=404, body="404 page not found")
    with pytest.raises(UpstreamNotFound):
        client.usage_mode()


# --- the time budget ------------------------------------------------------------------------


class MovableMonotonic:
    """Stands in for the `time` module inside pool.upstream: monotonic() moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        import time

        return time.time()


@pytest.fixture
def monotonic(monkeypatch) -> MovableMonotonic:
    fake = MovableMonotonic()
    monkeypatch.setattr("pool.upstream.time", fake)
    return fake


def test_each_call_waits_at_most_what_is_left_of_the_budget(rsps, monotonic):
    rsps.get(f"{M}/api-keys", json={"api-keys": ["a"]})
    client = ProxyClient(base_url=BASE, management_key=SECRET, timeout=10, budget=2)
    client.list_keys()
    monotonic.now += 1.5
    client.list_keys()
    assert [c.request.req_kwargs["timeout"] for c in rsps.calls] == [2, 0.5]


def test_a_budget_used_up_sends_nothing_and_says_which_setting(rsps, monotonic):
    client = ProxyClient(base_url=BASE, management_key=SECRET, timeout=10, budget=2)
    monotonic.now += 2
    with pytest.raises(UpstreamUnreachable, match="PORTAL_REQUEST_PROXY_BUDGET") as caught:
        client.list_keys()
    assert "Nothing was sent" in str(caught.value) and len(rsps.calls) == 0


def test_a_timeout_within_the_budget_names_the_budget(rsps, monotonic):
    rsps.get(f"{M}/api-keys", body=requests.ReadTimeout("slow"))
    client = ProxyClient(base_url=BASE, management_key=SECRET, timeout=10, budget=2)
    with pytest.raises(UpstreamUnreachable, match="PORTAL_REQUEST_PROXY_BUDGET"):
        client.list_keys()


def test_without_a_budget_every_call_gets_the_whole_timeout(client, rsps, monotonic):
    rsps.get(f"{M}/api-keys", json={"api-keys": ["a"]})
    client.list_keys()
    monotonic.now += 3600
    client.list_keys()
    assert [c.request.req_kwargs["timeout"] for c in rsps.calls] == [2, 2]


# --- the refusal latch's probe (the schedule is tested against the fake proxy) --------------




@pytest.fixture
def latch_clock(monkeypatch) -> SettableClock:
    fake = SettableClock()
    monkeypatch.setattr("pool.upstream.clock", fake)
    return fake


def refuse(rsps, path: str = "/api-keys", status: int = 401, error: str = "invalid management key"):
    return rsps.get(f"{M}{path}", status=status, json={"error": error})


def test_one_probe_per_turn_whichever_process_comes_first(client, rsps, latch_clock):
    refuse(rsps)
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    latch_clock.now += 5 * 60
    other = ProxyClient(base_url=BASE, management_key=SECRET, timeout=2)
    seen = []

    def probe_answer(request):
        # While this probe is out, another process wants to call the proxy too.
        with pytest.raises(UpstreamRefused, match="another portal process") as caught:
            other.list_keys()
        seen.append(str(caught.value))
        return 401, {}, json.dumps({"error": "invalid management key"})

    rsps.add_callback(responses.GET, f"{M}/usage-statistics-enabled", callback=probe_answer)
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    assert len(seen) == 1 and other.requests_sent == 0
    assert [c.request.url.split("/management")[1] for c in rsps.calls] == [
        "/api-keys", "/usage-statistics-enabled"]


def test_a_probe_without_an_answer_keeps_the_latch_for_another_turn(client, rsps, latch_clock):
    refuse(rsps)
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    latch_clock.now += 5 * 60
    rsps.get(f"{M}/usage-statistics-enabled", body=requests.ConnectionError("down"))
    with pytest.raises(UpstreamUnreachable):
        client.list_keys()
    latch_clock.now += 4 * 60
    with pytest.raises(UpstreamRefused, match="Nothing was sent"):
        client.list_keys()
    assert len(rsps.calls) == 2
    latch_clock.now += 1 * 60  # five minutes after the probe that got no answer: the next one
    with pytest.raises(UpstreamUnreachable):
        client.list_keys()
    assert len(rsps.calls) == 3


def test_an_answer_that_is_not_a_refusal_lifts_the_latch(client, rsps, latch_clock):
    refuse(rsps)
    with pytest.raises(UpstreamRefused):
        client.list_keys()
    latch_clock.now += 5 * 60
    rsps.get(f"{M}/usage-statistics-enabled", json={"usage-statistics-enabled": True})
    rsps.replace(responses.GET, f"{M}/api-keys", json={"api-keys": ["a"]})
    assert client.list_keys() == ["a"]
    assert client.list_keys() == ["a"]
    assert len(rsps.calls) == 4  # refusal, probe, and two calls


def test_a_ban_zeroes_the_count_so_probes_go_back_to_every_five_minutes(client, rsps, latch_clock):
    refuse(rsps)
    refuse(rsps, "/usage-statistics-enabled")
    for minutes in (0, 5, 5):  # the refusal and two probes: three 401s the proxy remembers
        latch_clock.now += minutes * 60
        with pytest.raises(UpstreamRefused):
            client.list_keys()
    # The operator's own attempts get the address banned; the portal, with a new key, hears it.
    banned = {"error": "IP banned due to too many failed attempts. Try again in 29m"}
    rsps.replace(responses.GET, f"{M}/api-keys", status=403, json=banned)
    rsps.replace(responses.GET, f"{M}/usage-statistics-enabled", status=403, json=banned)
    fixed = ProxyClient(base_url=BASE, management_key="the-new-one", timeout=2)
    latch_clock.now += 60
    with pytest.raises(UpstreamRefused, match="banned for 30 minutes"):
        fixed.list_keys()
    # A ban zeroes the proxy's count, and a 403 is not counted: probed 5 minutes on, not 3 h.
    latch_clock.now += 5 * 60
    with pytest.raises(UpstreamRefused, match="banned for 30 minutes"):
        fixed.list_keys()
    assert len(rsps.calls) == 5


def test_a_latch_from_before_the_probes_is_still_honoured(client, rsps, latch_clock):
    from django.core.cache import cache

    cache.set(client.refusal_cache_key, "The proxy refused the management key.", 1800)
    with pytest.raises(UpstreamRefused, match="Nothing was sent"):
        client.list_keys()
    assert len(rsps.calls) == 0
