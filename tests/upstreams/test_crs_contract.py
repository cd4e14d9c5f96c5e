"""The contract the CRS client relies on, checked against the fake CRS and against the real
claude-relay-service 1.1.314 from ../shared/upstreams (skipped when it, node, npm or
redis-server is missing; scripts/crs.sh installs the tools). The same checks run on both, so
the fake the unit tests use is proven against the real thing.

How the real one is started: tests/upstreams/crsrun.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import requests

from pool.upstream import UpstreamNotFound
from pool.upstreams.crs import Limits

from tests.fakes.crs import MODEL, USAGE, cost_of
from tests.upstreams.crsrun import Relay, records_when_there


@pytest.fixture(params=["fake", "real"])
def relay(request: pytest.FixtureRequest) -> Relay:
    return request.getfixturevalue(f"{request.param}_crs")


def test_created_key_works_at_once(relay: Relay) -> None:
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    assert created.value.startswith("cr_")
    answer = relay.message(created.value)
    assert answer.status_code == 200, answer.text
    assert created.id in {key.id for key in client.list_keys()}


def test_usage_records_show_the_request_with_its_split(relay: Relay) -> None:
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert relay.message(created.value).status_code == 200
    records = records_when_there(client, created.id, since, 1)
    assert len(records) == 1
    record = records[0]
    assert record.model == MODEL
    assert (record.input_tokens, record.output_tokens, record.cache_read_tokens,
            record.cache_create_tokens) == (100, 50, 10000, 2000)
    assert record.cost == cost_of(USAGE) == Decimal("0.01155")  # CRS's own sonnet-4 prices
    assert abs(record.timestamp - datetime.now(timezone.utc)) < timedelta(minutes=1)
    # `since` is inclusive, to the millisecond CRS writes.
    assert client.usage_records(created.id, since=record.timestamp).records == [record]
    later = client.usage_records(created.id, since=record.timestamp + timedelta(milliseconds=1))
    assert later.records == [] and later.cursor == record.timestamp + timedelta(milliseconds=1)


def test_daily_cost_limit_answers_402_within_three_requests(relay: Relay) -> None:
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}",
                                limits=Limits(daily_cost_limit=Decimal("0.01")))
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    statuses: list[int] = []
    for sent in range(1, 4):
        statuses.append(relay.message(created.value).status_code)
        if statuses[-1] == 402:
            break
        # CRS counts a request's cost after answering it: wait until it is recorded, so the
        # next request meets the cost (the same moment the portal's sync would see it).
        records_when_there(client, created.id, since, sent)
    # The request that crosses the limit passes (CRS checks the cost so far, before it);
    # the next one is refused.
    assert statuses == [200, 402], statuses


def test_limits_update_and_disable_enable(relay: Relay) -> None:
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    client.update_limits(created.id, Limits(daily_cost_limit=Decimal(3),
                                            total_cost_limit=Decimal(9)))
    key = {k.id: k for k in client.list_keys()}[created.id]
    assert (key.daily_cost_limit, key.total_cost_limit) == (Decimal(3), Decimal(9))
    client.set_active(created.id, False)
    assert relay.message(created.value).status_code == 401
    client.set_active(created.id, True)
    assert relay.message(created.value).status_code == 200


def test_rate_window_and_expiry_are_set_and_cleared(relay: Relay) -> None:
    client = relay.client()
    expires = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
    created = client.create_key(
        name=f"contract-{uuid.uuid4().hex[:8]}",
        limits=Limits(rate_limit_window=5, rate_limit_requests=10, concurrency_limit=2,
                      token_limit=1000, expires_at=expires))
    key = {k.id: k for k in client.list_keys()}[created.id]
    assert (key.rate_limit_window, key.rate_limit_requests, key.concurrency_limit,
            key.token_limit) == (5, 10, 2, 1000)
    assert key.expires_at == expires
    client.update_limits(created.id, Limits())
    key = {k.id: k for k in client.list_keys()}[created.id]
    assert (key.rate_limit_window, key.rate_limit_requests, key.concurrency_limit,
            key.token_limit) == (0, 0, 0, 0)
    assert key.expires_at == expires  # left alone: update_limits sends no expiresAt when None


def test_stale_session_token_is_replaced_once(relay: Relay) -> None:
    client = relay.client()
    client.health()
    client._token = "0" * 64  # well formed, unknown to CRS: as after its session timeout
    client.health()
    assert client.logins == 2


def test_deleted_key_is_refused(relay: Relay) -> None:
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    assert relay.message(created.value).status_code == 200
    records_when_there(client, created.id, None, 1)
    client.delete_key(created.id)
    assert relay.message(created.value).status_code == 401
    assert created.id not in {key.id for key in client.list_keys()}
    # A soft delete: its records still answer (the portal reads a revoked key's last ones).
    assert len(client.usage_records(created.id).records) == 1


def test_unknown_key_is_not_found(relay: Relay) -> None:
    client = relay.client()
    missing = str(uuid.uuid4())
    with pytest.raises(UpstreamNotFound):
        client.delete_key(missing)
    with pytest.raises(UpstreamNotFound):
        client.set_active(missing, False)
    with pytest.raises(UpstreamNotFound):
        client.usage_records(missing)


def test_health(relay: Relay) -> None:
    relay.client().health()


def test_an_expiry_sent_wakes_a_disabled_key_unless_its_state_goes_with_it(relay: Relay
                                                                           ) -> None:
    """CRS's PUT turns any expiresAt into isActive, then applies an isActive sent in the same
    body: what CrsClient.update_limits(active=...) and the driver rely on."""
    client = relay.client()
    ahead = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}",
                                limits=Limits(expires_at=ahead))
    client.set_active(created.id, False)
    client.update_limits(created.id, Limits(expires_at=ahead), active=False)
    assert relay.message(created.value).status_code == 401
    client.update_limits(created.id, Limits(expires_at=ahead))  # no state: the quirk
    assert relay.message(created.value).status_code == 200
    client.update_limits(created.id, Limits(), active=True)  # expiry cleared, still on
    key = {k.id: k for k in client.list_keys()}[created.id]
    assert key.expires_at is None and key.is_active
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    client.update_limits(created.id, Limits(expires_at=past), active=True)
    assert relay.message(created.value).status_code == 401  # expired, whatever isActive says


def test_name_over_100_code_units_is_refused_and_100_taken(relay: Relay) -> None:
    from pool.upstream import UpstreamUnexpected  # noqa: PLC0415

    client = relay.client()
    assert client.create_key(name="😀" * 50).name == "😀" * 50  # 100 UTF-16 code units
    with pytest.raises(UpstreamUnexpected):
        client.create_key(name="😀" * 50 + "x")


def test_version(relay: Relay) -> None:
    assert relay.client().version() == "1.1.314"


def test_only_the_newest_200_records_are_kept(relay: Relay) -> None:
    """redis.addUsageRecord's LTRIM: what the driver's "may have been lost" note rests on."""
    client = relay.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    for _ in range(204):
        assert relay.message(created.value).status_code == 200
    last_sent = datetime.now(timezone.utc) - timedelta(milliseconds=5)
    assert relay.message(created.value).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # the 205th record is written after its answer: wait for it, bounded
        records = client.usage_records(created.id).records
        if max(r.timestamp for r in records) >= last_sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert max(r.timestamp for r in records) >= last_sent
    assert len(records) == 200


def test_the_client_paths_the_pages_give_answer_at_the_real_crs(real_crs: Relay) -> None:
    """CrsDriver.client_paths: Claude Code's base (/api + /v1/messages) and OpenAI-style chat
    completions (/api/v1 + /chat/completions), both through the claude-console account."""
    from pool.upstreams.crs_driver import CrsDriver  # noqa: PLC0415

    client = real_crs.client()
    created = client.create_key(name=f"contract-{uuid.uuid4().hex[:8]}")
    headers = {"x-api-key": created.value, "Authorization": f"Bearer {created.value}",
               "anthropic-version": "2023-06-01"}
    paths = CrsDriver.client_paths
    claude = requests.post(f"{real_crs.url}{paths['anthropic']}/v1/messages", headers=headers,
                           json={"model": MODEL, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert claude.status_code == 200, claude.text
    chat = requests.post(f"{real_crs.url}{paths['openai']}/chat/completions", headers=headers,
                         json={"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "ok"
    assert len(records_when_there(client, created.id, None, 2)) == 2


def test_logout_ends_the_session(relay: Relay) -> None:
    client = relay.client()
    client.health()
    token = client._token
    client.logout()
    assert client._token is None
    client._token = token  # the old session: CRS no longer knows it, so a new login follows
    client.health()
    assert client.logins == 2
