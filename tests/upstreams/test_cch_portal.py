"""Issue 16's second Done-when line, against the fake Claude Code Hub (tests/fakes/cch.py)
forwarding to a mock Anthropic server: with only CCH_URL + CCH_ADMIN_TOKEN set (no
CLIProxyAPI), a person registers through the pages and gets a key that works at CCH at once;
the "default" key CCH makes with a user never works; sync_usage attributes requests and tokens
exactly, at the portal's price; a $0.01 daily cost limit on the person, then reconcile_keys,
makes CCH itself refuse within three $0.0116 requests with no sync in between; a key revoked
in the portal (then reconcile_keys) is refused by CCH; a second sync counts nothing twice."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from io import StringIO

import pytest
import requests
from django.core.management import CommandError, call_command
from django.db.models import Sum

from accounts.models import User
from pool.models import ApiKey, UpstreamAccount, key_digest
from pool.upstreams.registry import public_url
from usage.models import ModelPrice, UsageSnapshot

from tests.accounts.mailbox import emailed_path
from tests.fakes.cch import ADMIN_TOKEN, FakeCch, cost_of
from tests.realproxy import CLAUDE_MODEL, CLAUDE_USAGE, MockUpstream

pytestmark = pytest.mark.django_db
Status = ApiKey.Status
# The portal's price for the mock's model: Anthropic's Sonnet 4 list prices, USD / 1M tokens.
PRICE = {"input": Decimal(3), "output": Decimal(15), "cache_read": Decimal("0.3"),
         "cache_write": Decimal("3.75")}
# 100 × 3 + 50 × 15 + 10,000 × 0.3 + 2,000 × 3.75 = 11,550 per million: $0.01155 a request.
PER_REQUEST = Decimal("0.01155")


@pytest.fixture
def anthropic() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def cch(anthropic: MockUpstream, settings) -> Iterator[FakeCch]:
    # CCH prices with its own table (here the same list prices); the portal bills with its own.
    fake = FakeCch(upstream=anthropic.url, prices={CLAUDE_MODEL: PRICE}).start()
    settings.CCH_URL = fake.url
    settings.CCH_ADMIN_TOKEN = ADMIN_TOKEN
    yield fake
    fake.stop()


@pytest.fixture
def priced() -> ModelPrice:
    return ModelPrice.objects.create(model=CLAUDE_MODEL, **PRICE)


def message(cch: FakeCch, value: str) -> requests.Response:
    return requests.post(
        f"{cch.url}/v1/messages",
        headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
        json={"model": CLAUDE_MODEL, "max_tokens": 16,
              "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def register(client, email: str = "new@example.com", label: str = "laptop") -> str:
    """Registers through the pages; returns the key value the page shows once."""
    response = client.post("/register", {"email": email, "name": "New Person", "label": label})
    assert response.status_code == 200
    path = emailed_path()
    shown = client.post(path, follow=True)
    assert shown.status_code == 200
    page = shown.content.decode()
    return page.split('id="key-value">', 1)[1].split("<", 1)[0]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_a_registered_person_gets_a_working_cch_key_and_no_default_key(client, cch, anthropic):
    value = register(client)

    person = User.objects.get(email="new@example.com")
    key = ApiKey.objects.get(owner=person)
    assert value.startswith("sk-") and key_digest(value) == key.key_hash
    assert key.upstream.kind == "cch" and key.status == Status.ACTIVE
    assert public_url(key) == cch.url
    account = UpstreamAccount.objects.get(person=person)
    user = cch.users[int(account.remote_id)]
    assert user["name"] == "new@example.com"
    # The only key CCH holds for the person is the one the portal handed out: the user was
    # made without the "default" key.
    assert not any(k["name"] == "default" for k in cch.keys.values())
    assert [k["id"] for k in cch.user_keys(user["id"])] == [int(key.remote_id)]
    assert message(cch, value).status_code == 200  # at once: no sync, no reconcile
    assert anthropic.requests_seen == 1


def test_a_default_key_made_anyway_is_off_and_gone_with_the_first_key(client, anthropic,
                                                                        settings):
    # A CCH that ignores ?withDefaultKey=false (an older one) makes the "default" key.
    fake = FakeCch(upstream=anthropic.url, default_keys=False).start()
    settings.CCH_URL, settings.CCH_ADMIN_TOKEN = fake.url, ADMIN_TOKEN
    try:
        value = register(client)
        (default,) = [k for k in fake.keys.values() if k["name"] == "default"]
        assert default["deleted"] and not default["isEnabled"]
        assert message(fake, default["value"]).status_code == 401
        assert message(fake, value).status_code == 200
    finally:
        fake.stop()


def test_sync_attributes_requests_and_tokens_exactly_and_counts_nothing_twice(
        client, cch, priced):
    value = register(client)
    key = ApiKey.objects.get(key_hash=key_digest(value))
    for _ in range(3):
        assert message(cch, value).status_code == 200
    assert cch.settled()  # CCH completes its log rows by a batched write after the answers

    run("sync_usage")

    row = UsageSnapshot.objects.get(api_key=key)
    assert (row.model, row.requests, row.failures) == (CLAUDE_MODEL, 3, 0)
    assert row.input_tokens == 3 * CLAUDE_USAGE["input_tokens"]  # uncached input
    assert row.cached_tokens == 3 * CLAUDE_USAGE["cache_read_input_tokens"]
    assert row.cache_creation_tokens == 3 * CLAUDE_USAGE["cache_creation_input_tokens"]
    assert row.output_tokens == 3 * CLAUDE_USAGE["output_tokens"]
    assert row.cost == 3 * PER_REQUEST
    # What CCH billed for the same tokens at the same prices is the same figure.
    assert sum(Decimal(r["costUsd"]) for r in cch.logs) == 3 * PER_REQUEST == 3 * cost_of(
        CLAUDE_USAGE, PRICE)

    run("sync_usage")  # nothing new: nothing counted again
    message(cch, value)
    assert cch.settled()
    run("sync_usage")
    totals = UsageSnapshot.objects.filter(api_key=key).aggregate(n=Sum("requests"),
                                                                  cost=Sum("cost"))
    assert totals == {"n": 4, "cost": 4 * PER_REQUEST}


def test_an_unfinished_request_is_counted_once_it_finishes(client, cch, priced):
    value = register(client)
    key = ApiKey.objects.get(key_hash=key_digest(value))
    message(cch, value)
    assert cch.settled()
    cch.hold = threading.Event()
    slow = threading.Thread(target=message, args=(cch, value))
    slow.start()
    try:
        assert cch.held.wait(10)
        run("sync_usage")  # the slow one's row is there, unfinished: not counted yet
        assert UsageSnapshot.objects.get(api_key=key).requests == 1
    finally:
        cch.hold.set()
        slow.join(30)
    cch.hold = None
    assert cch.settled()
    run("sync_usage")
    run("sync_usage")
    row = UsageSnapshot.objects.get(api_key=key)
    assert (row.requests, row.cost) == (2, 2 * PER_REQUEST)


def test_a_daily_cost_limit_makes_cch_refuse_without_a_sync(client, cch):
    value = register(client)
    person = User.objects.get(email="new@example.com")
    User.objects.filter(pk=person.pk).update(limit_cost_day=Decimal("0.01"))

    run("reconcile_keys")

    account = UpstreamAccount.objects.get(person=person)
    assert cch.users[int(account.remote_id)]["dailyQuota"] == Decimal("0.01")
    statuses = [message(cch, value).status_code for _ in range(3)]
    assert statuses[0] == 200 and 402 in statuses  # within three requests, CCH itself
    refused = message(cch, value)
    assert refused.status_code == 402
    assert refused.json()["error"]["limit_type"] == "daily_quota"
    assert cch.settled()
    assert len([r for r in cch.logs if r["statusCode"] == 200]) == statuses.count(200)


def test_a_revoked_key_is_refused_by_cch(client, cch):
    value = register(client)
    key = ApiKey.objects.get(key_hash=key_digest(value))
    assert message(cch, value).status_code == 200

    confirm = client.post(f"/my-keys/{key.pk}/revoke")
    assert confirm.status_code in (200, 303)
    run("reconcile_keys")

    key.refresh_from_db()
    assert key.status == Status.REVOKED and key.proxy_state == ApiKey.ProxyState.REMOVED
    assert cch.keys[int(key.remote_id)]["deleted"]  # the person's last key: off, then deleted
    assert message(cch, value).status_code == 401
    assert "0 keys removed" in run("reconcile_keys")  # nothing left to do


def test_a_cch_that_fails_a_sync_loses_nothing(client, cch, priced):
    value = register(client)
    key = ApiKey.objects.get(key_hash=key_digest(value))
    for _ in range(2):
        assert message(cch, value).status_code == 200
    assert cch.settled()
    cch.inject("/api/v1/usage-logs", "500")

    with pytest.raises(CommandError) as failed:
        run("sync_usage")

    assert "Claude Code Hub" in str(failed.value) and "HTTP 500" in str(failed.value)
    assert ADMIN_TOKEN not in str(failed.value)
    assert not UsageSnapshot.objects.filter(api_key=key).exists()
    run("sync_usage")  # the cursor was kept: the same requests, once
    row = UsageSnapshot.objects.get(api_key=key)
    assert (row.requests, row.cost) == (2, 2 * PER_REQUEST)
