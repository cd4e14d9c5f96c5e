"""The Claude Code Hub client against the fake CCH (tests/fakes/cch.py): paging the request
log, the unfinished row, and every failure as one sentence without the admin token or a key.
The calls' behaviour itself is checked on the fake and a real CCH alike in
test_cch_contract.py."""

from __future__ import annotations

import threading
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
from pool.upstreams.cch import CchClient, Limits, cents, epoch_ms

from tests.fakes.cch import ADMIN_TOKEN, FakeCch


@pytest.fixture
def fake() -> Iterator[FakeCch]:
    server = FakeCch().start()
    yield server
    server.stop()


@pytest.fixture
def client(fake: FakeCch) -> Iterator[CchClient]:
    made = CchClient(fake.url, ADMIN_TOKEN, timeout=2)
    yield made
    made.close()


def _message(fake: FakeCch, value: str) -> requests.Response:
    return requests.post(f"{fake.url}/v1/messages", headers={"x-api-key": value},
                         json={"model": "claude-sonnet-4-20250514", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]}, timeout=10)


def _log_rows(fake: FakeCch, key_id: int, count: int, start: datetime) -> None:
    for i in range(count):
        fake.logs.append({
            "id": 1000 + i, "keyId": key_id, "at": start + timedelta(milliseconds=i),
            "model": "m", "statusCode": 200, "inputTokens": i, "outputTokens": 1,
            "cacheCreationInputTokens": 0, "cacheReadInputTokens": 0, "costUsd": "0",
            "durationMs": 5})


def test_cents_round_down_and_never_to_no_limit() -> None:
    assert cents(None) is None
    assert cents(Decimal("1.239")) == 1.23
    assert cents(Decimal("0.004")) == 0.01  # 0 would be "no limit" at CCH
    assert cents(Decimal(5)) == 5.0
    assert cents(Decimal(10_001), most=Decimal(10_000)) is None  # CCH would refuse it
    assert Limits(daily_usd=Decimal(20_000), monthly_usd=Decimal(20_000)).as_cch(user=True)[
        "dailyQuota"] is None


def test_the_log_is_read_across_pages_oldest_first(client: CchClient, fake: FakeCch) -> None:
    user = client.create_user(name="pager@example.com")
    key = client.create_key(user.id, name="k")
    start = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
    _log_rows(fake, key.id, 250, start)
    rows = client.usage_logs(key.id, since=start)
    assert [r.id for r in rows] == list(range(1000, 1250))
    assert rows[0].created_at == start and rows[-1].input_tokens == 249
    pages = [p for p in fake.admin_requests if p == ("GET", "/api/v1/usage-logs")]
    assert len(pages) == 3  # 100 + 100 + 50
    # startTime is inclusive to the millisecond.
    later = client.usage_logs(key.id, since=start + timedelta(milliseconds=200))
    assert [r.id for r in later] == list(range(1200, 1250))


def test_an_unfinished_request_comes_out_unfinished(client: CchClient, fake: FakeCch) -> None:
    user = client.create_user(name="slow@example.com")
    key = client.create_key(user.id, name="k")
    fake.hold = threading.Event()
    worker = threading.Thread(target=_message, args=(fake, key.value))
    worker.start()
    try:
        assert fake.held.wait(10)
        (row,) = client.usage_logs(key.id)
        assert not row.finished and row.status_code is None and row.input_tokens == 0
    finally:
        fake.hold.set()
        worker.join(10)
    assert fake.settled()  # completed by CCH's batched write, after the answer
    (row,) = client.usage_logs(key.id)
    assert row.finished and row.input_tokens == 100 and row.cache_read_tokens == 10000


def test_a_wrong_token_is_refused_without_the_token(fake: FakeCch) -> None:
    client = CchClient(fake.url, "wrong-admin-token-123", timeout=2)
    with pytest.raises(UpstreamRefused) as caught:
        client.time_zone()
    assert "wrong-admin-token-123" not in str(caught.value)
    assert "auth.invalid" in str(caught.value)


def test_an_unknown_key_is_not_found(client: CchClient) -> None:
    with pytest.raises(UpstreamNotFound):
        client.delete_key(987654)
    with pytest.raises(UpstreamNotFound):
        client.update_key(987654, name="x", enabled=False)


def test_a_500_is_one_sentence(client: CchClient, fake: FakeCch) -> None:
    fake.inject("/api/v1/system", "500")
    with pytest.raises(UpstreamUnexpected) as caught:
        client.time_zone()
    assert "HTTP 500" in str(caught.value) and ADMIN_TOKEN not in str(caught.value)


def test_malformed_json_is_unexpected(client: CchClient, fake: FakeCch) -> None:
    fake.inject("/api/v1/users", "malformed")
    with pytest.raises(UpstreamUnexpected) as caught:
        client.list_keys(1)
    assert "not JSON" in str(caught.value)


def test_a_dripped_answer_is_cut_at_the_deadline(fake: FakeCch) -> None:
    client = CchClient(fake.url, ADMIN_TOKEN, timeout=0.6)
    fake.inject("/api/v1/system", "drip")
    with pytest.raises(UpstreamUnreachable) as caught:
        client.time_zone()
    assert "within 0.6 s" in str(caught.value)


def test_a_hanging_cch_is_cut_at_the_deadline(fake: FakeCch) -> None:
    client = CchClient(fake.url, ADMIN_TOKEN, timeout=0.5)
    fake.inject("/api/v1/system", "hang")
    with pytest.raises(UpstreamUnreachable):
        client.time_zone()


def test_nothing_listening_is_unreachable() -> None:
    client = CchClient("http://127.0.0.1:9", ADMIN_TOKEN, timeout=1)
    with pytest.raises(UpstreamUnreachable) as caught:
        client.time_zone()
    assert "connection failed" in str(caught.value)


def test_an_answer_over_the_cap_is_refused(fake: FakeCch) -> None:
    client = CchClient(fake.url, ADMIN_TOKEN, timeout=2, max_answer_bytes=200)
    user = client.create_user(name="big@example.com")
    for i in range(5):
        client.create_key(user.id, name=f"key number {i}")
    with pytest.raises(UpstreamTooLarge):
        client.list_keys(user.id)


def test_a_key_value_in_an_error_is_hidden(client: CchClient, fake: FakeCch) -> None:
    value = "sk-" + "ab" * 16
    original = fake.route

    def echoing(method, path, query, body, headers):  # type: ignore[no-untyped-def]
        return 400, {"errorCode": "x", "detail": f"bad key {value} and {ADMIN_TOKEN}"}

    fake.route = echoing  # type: ignore[method-assign]
    try:
        with pytest.raises(UpstreamUnexpected) as caught:
            client.time_zone()
    finally:
        fake.route = original  # type: ignore[method-assign]
    assert value not in str(caught.value) and ADMIN_TOKEN not in str(caught.value)


def test_limits_go_out_as_cch_names_them(client: CchClient, fake: FakeCch) -> None:
    user = client.create_user(name="limits@example.com",
                              limits=Limits(daily_usd=Decimal("2.567"), daily_reset_time="08:00"))
    assert fake.users[user.id]["dailyQuota"] == Decimal("2.56")
    assert fake.users[user.id]["dailyResetTime"] == "08:00"
    key = client.create_key(user.id, name="k", limits=Limits(monthly_usd=Decimal(9)))
    listed = {k.id: k for k in client.list_keys(user.id)}
    assert listed[key.id].monthly_usd == Decimal(9) and listed[key.id].daily_usd is None


def test_epoch_ms_floors_to_the_millisecond() -> None:
    moment = datetime(2026, 12, 2, 9, 0, 0, 123000, tzinfo=timezone.utc)
    assert epoch_ms(moment) == 1_796_202_000_123
    assert epoch_ms(moment + timedelta(microseconds=999)) % 1000 == 123
