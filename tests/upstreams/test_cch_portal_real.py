"""Issue 16's Done-when flow once against a REAL Claude Code Hub, by hand (skipped unless
CCH_TEST_URL, CCH_TEST_ADMIN_TOKEN and CCH_TEST_MODEL are set: a CCH with a provider for that
model, and a price for it, e.g. scripts/cch.sh's mock Anthropic). The portal sees only CCH_URL
+ CCH_ADMIN_TOKEN; the checks go through CCH's own API and its client route, never a fake:

    CCH_TEST_URL=http://127.0.0.1:23000 CCH_TEST_ADMIN_TOKEN=... CCH_TEST_MODEL=claude-sonnet-4-5 \\
        .venv/bin/pytest -q -p no:cacheprovider tests/upstreams/test_cch_portal_real.py -s

The CCH users it makes are deleted at the end. With -s it prints the figures (requests, tokens,
the portal's cost against CCH's, the request CCH refused at).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from decimal import Decimal
from io import StringIO

import pytest
import requests
from django.core.management import call_command

from accounts.models import User
from pool.models import ApiKey, UpstreamAccount, key_digest
from pool.upstreams.cch import CchClient, LogRow
from usage.models import ModelPrice, UsageSnapshot

from tests.accounts.mailbox import emailed_path

URL = os.environ.get("CCH_TEST_URL", "").rstrip("/")
TOKEN = os.environ.get("CCH_TEST_ADMIN_TOKEN", "")
MODEL = os.environ.get("CCH_TEST_MODEL", "")
# The portal's price for MODEL, USD per million tokens (Sonnet list prices; CCH_TEST_PRICES
# "input,output,cache_read,cache_write" for another model).
PRICE = dict(zip(("input", "output", "cache_read", "cache_write"), (Decimal(p) for p in
             os.environ.get("CCH_TEST_PRICES", "3,15,0.3,3.75").split(","))))

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not (URL and TOKEN and MODEL),
                       reason="CCH_TEST_URL, CCH_TEST_ADMIN_TOKEN and CCH_TEST_MODEL are not set"),
]


@pytest.fixture
def cch(settings) -> Iterator[CchClient]:
    settings.CCH_URL, settings.CCH_ADMIN_TOKEN = URL, TOKEN
    client = CchClient(URL, TOKEN, timeout=30)
    yield client
    for account in UpstreamAccount.objects.all():
        client.delete_user(int(account.remote_id))
    client.close()


def message(value: str) -> requests.Response:
    return requests.post(
        f"{URL}/v1/messages",
        headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


def settled(client: CchClient, key_id: int, count: int, timeout: float = 30.0) -> list[LogRow]:
    deadline = time.monotonic() + timeout
    while True:
        rows = client.usage_logs(key_id)
        if len(rows) >= count and all(r.finished for r in rows):
            return rows
        assert time.monotonic() < deadline, f"CCH's log shows {rows} after {timeout} s"
        time.sleep(0.2)


def register(client, email: str) -> str:
    """Registers through the pages; the key value the page shows once."""
    assert client.post("/register", {"email": email, "name": "Real", "label": "laptop"}
                       ).status_code == 200
    client.logout()
    page = client.post(emailed_path(), follow=True).content.decode()
    return page.split('id="key-value">', 1)[1].split("<", 1)[0]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_the_done_when_flow_against_a_real_cch(client, cch) -> None:
    ModelPrice.objects.update_or_create(model=MODEL, defaults=PRICE)
    email = f"kp-real-{int(time.time())}@example.com"
    value = register(client, email)
    person = User.objects.get(email=email)
    key = ApiKey.objects.get(owner=person)
    assert key_digest(value) == key.key_hash and value.startswith("sk-")
    user_id = int(UpstreamAccount.objects.get(person=person).remote_id)

    # Works at once; the person's only key at CCH is the portal's (no default key).
    assert [k.id for k in cch.list_keys(user_id)] == [int(key.remote_id)]
    answers = [message(value) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    rows = settled(cch, int(key.remote_id), 3)

    run("sync_usage")
    snap = UsageSnapshot.objects.get(api_key=key)
    usage = [a.json()["usage"] for a in answers]
    assert snap.requests == 3
    assert snap.input_tokens == sum(u["input_tokens"] for u in usage)
    assert snap.output_tokens == sum(u["output_tokens"] for u in usage)
    assert snap.cached_tokens == sum(u.get("cache_read_input_tokens", 0) for u in usage)
    assert snap.cache_creation_tokens == sum(u.get("cache_creation_input_tokens", 0)
                                             for u in usage)
    million = Decimal(1_000_000)
    expected = sum((u["input_tokens"] * PRICE["input"] + u["output_tokens"] * PRICE["output"]
                    + u.get("cache_read_input_tokens", 0) * PRICE["cache_read"]
                    + u.get("cache_creation_input_tokens", 0) * PRICE["cache_write"]) / million
                   for u in usage)
    assert snap.cost == expected
    cch_cost = sum(r.cost or 0 for r in rows)
    print(f"\n3 requests: portal ${snap.cost} (its prices), CCH ${cch_cost} (its own), "
          f"tokens in/cache-read/cache-write/out {snap.input_tokens}/{snap.cached_tokens}/"
          f"{snap.cache_creation_tokens}/{snap.output_tokens}")
    run("sync_usage")  # a second sync counts nothing twice
    assert UsageSnapshot.objects.get(api_key=key).requests == 3

    # $0.01 a day on a second person who has spent nothing, reconcile_keys, no sync: CCH
    # itself refuses within three requests.
    other_value = register(client, f"kp-real-limit-{int(time.time())}@example.com")
    other = User.objects.get(email__startswith="kp-real-limit-")
    User.objects.filter(pk=other.pk).update(limit_cost_day=Decimal("0.01"))
    run("reconcile_keys")
    statuses = [message(other_value).status_code for _ in range(3)]
    print(f"a $0.01 daily limit, then three requests of ${expected / 3}: {statuses}")
    assert statuses[0] == 200 and 402 in statuses
    User.objects.filter(pk=other.pk).update(limit_cost_day=None)
    run("reconcile_keys")
    assert message(other_value).status_code == 200  # lifted at CCH too

    # Revoked in the portal (the person's last key), then reconcile_keys: refused by CCH.
    client.force_login(person)
    assert client.post(f"/my-keys/{key.pk}/revoke").status_code in (200, 303)
    run("reconcile_keys")
    key.refresh_from_db()
    assert key.status == ApiKey.Status.REVOKED
    assert cch.list_keys(user_id) == []
    revoked = message(value)
    print(f"revoked key: HTTP {revoked.status_code} {revoked.json()['error'].get('type')}")
    assert revoked.status_code == 401
