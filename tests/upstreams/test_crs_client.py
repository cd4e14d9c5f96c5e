"""The CRS admin client against the fake CRS (tests/fakes/crs.py): login and the one
re-login, the calls, and every failure as one sentence without a secret."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import requests

from pool.upstream import (
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTooLarge,
    UpstreamUnexpected,
    UpstreamUnreachable,
)
from pool.upstreams.crs import CrsClient, Limits

from tests.fakes.crs import PASSWORD, USERNAME, FakeCrs


@pytest.fixture
def fake() -> Iterator[FakeCrs]:
    server = FakeCrs().start()
    yield server
    server.stop()


@pytest.fixture
def client(fake: FakeCrs) -> CrsClient:
    return CrsClient(fake.url, USERNAME, PASSWORD, timeout=2)


def _message(fake: FakeCrs, value: str) -> requests.Response:
    return requests.post(f"{fake.url}/api/v1/messages", headers={"x-api-key": value},
                         json={"model": "claude-sonnet-4-20250514", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]}, timeout=5)


def test_expired_session_logs_in_again_once(client: CrsClient, fake: FakeCrs) -> None:
    client.health()
    fake.expire_sessions()
    client.health()
    assert client.logins == 2


def test_refused_again_after_relogin_is_a_refusal_not_a_loop(client: CrsClient,
                                                            fake: FakeCrs) -> None:
    client.health()
    original = fake.route

    def always_expired(method, path, query, body, headers):  # type: ignore[no-untyped-def]
        fake.sessions.clear() if path.startswith("/admin/") else None
        return original(method, path, query, body, headers)

    fake.route = always_expired  # type: ignore[method-assign]
    with pytest.raises(UpstreamRefused):
        client.health()
    assert client.logins == 2
    assert fake.admin_requests.count(("GET", "/admin/supported-clients")) == 3


def test_wrong_password_is_refused_without_the_password(fake: FakeCrs) -> None:
    client = CrsClient(fake.url, USERNAME, "wrong-secret-pass", timeout=2)
    with pytest.raises(UpstreamRefused) as caught:
        client.health()
    assert "wrong-secret-pass" not in str(caught.value)
    assert client.logins == 0


def test_created_key_works_and_its_value_is_shown_once(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="alice", limits=Limits(daily_cost_limit=Decimal(5)))
    assert created.value.startswith("cr_") and len(created.value) == 67
    assert created.value not in repr(created)
    assert _message(fake, created.value).status_code == 200
    listed = {key.id: key for key in client.list_keys()}
    assert listed[created.id].daily_cost_limit == Decimal(5)
    assert created.value not in str(fake.keys)


def test_usage_records_have_the_split_and_cost(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="bob")
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    for _ in range(3):
        _message(fake, created.value)
    page = client.usage_records(created.id, since=before)
    assert len(page.records) == 3
    first = page.records[0]
    assert (first.input_tokens, first.output_tokens, first.cache_read_tokens,
            first.cache_create_tokens) == (100, 50, 10000, 2000)
    assert first.cost == Decimal("0.01155")
    assert page.cursor == page.records[-1].timestamp
    assert client.usage_records(created.id, since=page.cursor + timedelta(seconds=1)).records == []


def test_usage_records_page_past_one_page(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="many")
    for _ in range(230):
        _message(fake, created.value)
    # CRS keeps 200 records per key: older ones are gone, and the client reads both pages.
    page = client.usage_records(created.id)
    assert len(page.records) == 200
    assert page.records == sorted(page.records, key=lambda r: r.timestamp)


def test_daily_cost_limit_is_refused_with_402(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="cheap", limits=Limits(daily_cost_limit=Decimal("0.01")))
    statuses = [_message(fake, created.value).status_code for _ in range(3)]
    assert 402 in statuses


def test_disable_enable_and_delete(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="carol")
    client.set_active(created.id, False)
    assert _message(fake, created.value).status_code == 401
    client.set_active(created.id, True)
    assert _message(fake, created.value).status_code == 200
    client.update_limits(created.id, Limits(total_cost_limit=Decimal(7)))
    assert {k.id: k for k in client.list_keys()}[created.id].total_cost_limit == Decimal(7)
    client.delete_key(created.id)
    assert _message(fake, created.value).status_code == 401
    assert created.id not in {key.id for key in client.list_keys()}


def test_unknown_key_is_not_found(client: CrsClient) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for call in (lambda: client.delete_key(missing), lambda: client.usage_records(missing),
                 lambda: client.set_active(missing, False)):
        with pytest.raises(UpstreamNotFound):
            call()


def test_server_error_is_unexpected(client: CrsClient, fake: FakeCrs) -> None:
    client.health()
    fake.inject("/admin/api-keys", "500")
    with pytest.raises(UpstreamUnexpected, match="HTTP 500"):
        client.list_keys()


def test_malformed_json_is_unexpected(client: CrsClient, fake: FakeCrs) -> None:
    client.health()
    fake.inject("/admin/api-keys", "malformed")
    with pytest.raises(UpstreamUnexpected, match="not JSON"):
        client.list_keys()


@pytest.mark.parametrize("kind", ["drip", "hang"])
def test_slow_answer_is_cut_at_the_deadline(fake: FakeCrs, kind: str) -> None:
    client = CrsClient(fake.url, USERNAME, PASSWORD, timeout=0.5)
    client.login()
    fake.inject("/admin/supported-clients", kind)
    with pytest.raises(UpstreamUnreachable, match="within 0.5 s"):
        client.health()


def test_answer_over_the_cap_is_refused(fake: FakeCrs) -> None:
    client = CrsClient(fake.url, USERNAME, PASSWORD, timeout=2, max_answer_bytes=1000)
    for number in range(10):
        client.create_key(name=f"key-{number}")
    with pytest.raises(UpstreamTooLarge):
        client.list_keys()


def test_unreachable() -> None:
    client = CrsClient("http://127.0.0.1:9", USERNAME, PASSWORD, timeout=1)
    with pytest.raises(UpstreamUnreachable):
        client.health()


def test_secrets_never_in_messages(client: CrsClient, fake: FakeCrs) -> None:
    created = client.create_key(name="dave")
    token = next(iter(fake.sessions))
    original = fake.route

    def echoing(method, path, query, body, headers):  # type: ignore[no-untyped-def]
        if path == "/admin/api-keys" and method == "GET":
            return 500, {"error": "Failed", "message": f"boom {PASSWORD} {token} {created.value}"}
        return original(method, path, query, body, headers)

    fake.route = echoing  # type: ignore[method-assign]
    with pytest.raises(UpstreamUnexpected) as caught:
        client.list_keys()
    text = str(caught.value)
    assert PASSWORD not in text and token not in text and created.value not in text
    assert "cr_[hidden]" in text
