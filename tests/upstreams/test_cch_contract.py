"""The contract the Claude Code Hub client and driver rely on, checked against the fake CCH
(tests/fakes/cch.py) in CI, and against a real CCH 0.9.2 when CCH_TEST_URL and
CCH_TEST_ADMIN_TOKEN are set (skipped otherwise; run by hand, see ../shared/upstreams/
claude-code-hub/README.md for bringing one up). The same checks run on both, so the fake the
other tests use is held to what the real one answers.

The checks that send client requests (`/v1/messages`) need a provider at the real CCH for
CCH_TEST_MODEL (e.g. a mock Anthropic server added as a "claude" provider) and a price for that
model; without CCH_TEST_MODEL they are skipped on the real one. Everything a check makes at the
real CCH (users named kp-contract-…@example.com, their keys) is deleted at the end.

    CCH_TEST_URL=http://127.0.0.1:23000 CCH_TEST_ADMIN_TOKEN=... CCH_TEST_MODEL=claude-mock \\
        .venv/bin/pytest -q -p no:cacheprovider tests/upstreams/test_cch_contract.py
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import requests

from pool.upstream import UpstreamNotFound, UpstreamRefused, UpstreamUnexpected
from pool.upstreams.cch import CchClient, DuplicateName, LastKey, Limits

from tests.fakes.cch import ADMIN_TOKEN, MODEL, FakeCch

REAL_URL = os.environ.get("CCH_TEST_URL", "").rstrip("/")
REAL_TOKEN = os.environ.get("CCH_TEST_ADMIN_TOKEN", "")
REAL_MODEL = os.environ.get("CCH_TEST_MODEL", "")


@dataclass
class Hub:
    kind: str
    url: str
    token: str
    model: str  # "" when client requests cannot be sent
    users: list[int] = field(default_factory=list)

    def client(self, **kwargs: float) -> CchClient:
        return CchClient(self.url, self.token, timeout=kwargs.get("timeout", 15))

    def person(self, client: CchClient, limits: Limits = Limits(), **kwargs: bool) -> int:
        made = client.create_user(name=f"kp-contract-{uuid.uuid4().hex[:10]}@example.com",
                                  limits=limits, **kwargs)
        self.users.append(made.id)
        return made.id

    def message(self, value: str) -> requests.Response:
        if not self.model:
            pytest.skip("CCH_TEST_MODEL is not set: no client requests to the real CCH")
        return requests.post(
            f"{self.url}/v1/messages",
            headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
            json={"model": self.model, "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )


def finished(client: CchClient, key_id: int, *, count: int, since: datetime | None = None,
             timeout: float = 20.0) -> list:
    """The key's log once `count` rows are there and all finished (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = client.usage_logs(key_id, since=since)
        if len(rows) >= count and all(r.finished for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the log still shows {rows} after {timeout} s")
        time.sleep(0.1)


@pytest.fixture(params=["fake", "real"])
def hub(request: pytest.FixtureRequest) -> Iterator[Hub]:
    if request.param == "fake":
        fake = FakeCch().start()
        found = Hub("fake", fake.url, ADMIN_TOKEN, MODEL)
    else:
        if not (REAL_URL and REAL_TOKEN):
            pytest.skip("CCH_TEST_URL and CCH_TEST_ADMIN_TOKEN are not set")
        fake, found = None, Hub("real", REAL_URL, REAL_TOKEN, REAL_MODEL)
    yield found
    cleaner = found.client()
    for user_id in found.users:
        try:
            cleaner.delete_user(user_id)
        except UpstreamNotFound:
            pass
    cleaner.close()
    if fake is not None:
        fake.stop()


def test_it_tells_its_time_zone_and_takes_the_token_as_an_admin(hub: Hub) -> None:
    client = hub.client()
    ZoneInfo(client.time_zone())  # a zone this machine knows
    client.admin_check()


def test_a_wrong_token_is_refused(hub: Hub) -> None:
    for call in ("time_zone", "admin_check"):
        with pytest.raises(UpstreamRefused) as caught:
            getattr(CchClient(hub.url, "not-the-admin-token-0000", timeout=15), call)()
        assert "not-the-admin-token-0000" not in str(caught.value)


def test_a_user_is_made_with_or_without_the_default_key(hub: Hub) -> None:
    client = hub.client()
    assert client.list_keys(hub.person(client)) == []
    with_default = hub.person(client, with_default_key=True)
    (default,) = client.list_keys(with_default)
    assert default.name == "default" and default.is_enabled


def test_a_key_is_made_with_its_limits_to_the_cent(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client, Limits(daily_usd=Decimal(5), monthly_usd=Decimal(50)))
    made = client.create_key(user, name="laptop #a1b2c3",
                             limits=Limits(daily_usd=Decimal("1.239"), monthly_usd=Decimal(7),
                                           daily_reset_time="08:00"))
    assert made.value.startswith("sk-") and len(made.value) == 35
    assert made.value not in repr(made)
    (listed,) = client.list_keys(user)
    assert (listed.id, listed.name, listed.is_enabled) == (made.id, "laptop #a1b2c3", True)
    assert (listed.daily_usd, listed.monthly_usd) == (Decimal("1.23"), Decimal(7))
    assert listed.daily_reset_time == "08:00"


def test_two_enabled_keys_may_not_share_a_name(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client)
    client.create_key(user, name="same")
    with pytest.raises(DuplicateName):
        client.create_key(user, name="same")


def test_a_key_limit_above_its_users_is_refused(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client, Limits(daily_usd=Decimal(1)))
    with pytest.raises(UpstreamUnexpected) as caught:
        client.create_key(user, name="k", limits=Limits(daily_usd=Decimal(2)))
    assert "KEY_LIMIT_DAILY_EXCEEDS_USER_LIMIT" in str(caught.value)
    made = client.create_key(user, name="k", limits=Limits(daily_usd=Decimal(1)))
    with pytest.raises(UpstreamUnexpected):
        client.update_key(made.id, name="k", limits=Limits(daily_usd=Decimal(3)))
    client.update_user_limits(user, Limits(daily_usd=Decimal(3)))
    client.update_key(made.id, name="k", limits=Limits(daily_usd=Decimal(3)))


def test_the_last_key_is_switched_off_by_patch_then_deleted(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client)
    made = client.create_key(user, name="only")
    with pytest.raises(LastKey):
        client.delete_key(made.id)
    client.update_key(made.id, name="only", enabled=False)
    (listed,) = client.list_keys(user)
    assert not listed.is_enabled
    client.delete_key(made.id)
    assert client.list_keys(user) == []
    with pytest.raises(UpstreamNotFound):
        client.delete_key(made.id)


def test_an_expiry_is_set_and_cleared(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client)
    made = client.create_key(user, name="k")
    when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=3)
    client.update_key(made.id, name="k", expires_at=when)
    assert client.list_keys(user)[0].expires_at == when
    client.update_key(made.id, name="k", expires_at=None)
    assert client.list_keys(user)[0].expires_at is None


def test_a_key_works_at_once_and_its_request_is_logged_with_its_tokens(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client)
    made = client.create_key(user, name="k")
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    answer = hub.message(made.value)
    assert answer.status_code == 200, answer.text[:300]
    usage = answer.json()["usage"]
    # CCH completes the row by a batched write after the answer (250 ms): wait for it.
    (row,) = finished(client, made.id, since=before, count=1)
    assert row.status_code == 200 and row.created_at >= before
    # Anthropic's buckets, kept disjoint: input is the uncached part.
    assert row.input_tokens == usage["input_tokens"]
    assert row.output_tokens == usage["output_tokens"]
    assert row.cache_read_tokens == usage.get("cache_read_input_tokens", 0)
    assert row.cache_creation_tokens == usage.get("cache_creation_input_tokens", 0)
    assert client.usage_logs(made.id, since=row.created_at + timedelta(milliseconds=1)) == []


def test_a_daily_cost_limit_refuses_the_request_after_the_crossing_one(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client, Limits(daily_usd=Decimal("0.01")))
    made = client.create_key(user, name="k")
    statuses = [hub.message(made.value).status_code for _ in range(3)]
    assert statuses[0] == 200 and 402 in statuses, statuses
    refused = hub.message(made.value)
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert (error["type"], error["limit_type"]) == ("rate_limit_error", "daily_quota")
    # Refused requests are not in the log.
    assert len(finished(client, made.id, count=statuses.count(200))) == statuses.count(200)


def test_a_deleted_or_switched_off_key_is_refused(hub: Hub) -> None:
    client = hub.client()
    user = hub.person(client)
    first = client.create_key(user, name="a")
    second = client.create_key(user, name="b")
    kept = client.create_key(user, name="c")
    client.update_key(first.id, name="a", enabled=False)
    assert hub.message(first.value).status_code == 401
    client.delete_key(second.id)  # "c" is still enabled: not the last one
    assert hub.message(second.value).status_code == 401
    assert hub.message(kept.value).status_code == 200


def test_a_null_expiry_is_refused_where_an_empty_one_clears(hub: Hub) -> None:
    # The v1 schema lets null through; the action's own schema wants a string (hence "").
    client = hub.client()
    made = client.create_key(hub.person(client), name="k")
    with pytest.raises(UpstreamUnexpected) as caught:
        client._call("PATCH", f"/api/v1/keys/{made.id}", "update a key",
                     json={"name": "k", "expiresAt": None})
    assert "key.action_failed" in str(caught.value)


def test_a_users_limit_may_go_below_its_keys(hub: Hub) -> None:
    # What lets the reconcile push a person's lower limit before their keys' folded ones.
    client = hub.client()
    user = hub.person(client)
    made = client.create_key(user, name="k", limits=Limits(daily_usd=Decimal(5)))
    client.update_user_limits(user, Limits(daily_usd=Decimal(1)))
    client.update_key(made.id, name="k", limits=Limits(daily_usd=Decimal(1)))
    assert client.list_keys(user)[0].daily_usd == Decimal(1)
