"""Issue 16's acceptance against a REAL Claude Code Hub (by hand, never in CI): the portal,
with only CCH_URL + CCH_ADMIN_TOKEN set, in front of a CCH brought up by scripts/cch.sh
(0.9.2 on 127.0.0.1, a "claude" provider forwarding to a mock Anthropic server, a price for
the model uploaded so its costs are not 0). Everything is checked at CCH through its own admin
API, never through the portal's client, so a mistake in that client cannot hide itself:

- a person registers through the pages and gets a key that works at CCH at once, the only
  key CCH holds for them (no "default" key, no web-UI login);
- sync_usage attributes requests and tokens exactly; the portal's cost equals CCH's own
  `costUsd` for the same requests; a second sync counts nothing twice;
- a $0.01 daily cost limit set on a person in the portal, then reconcile_keys, makes CCH
  itself refuse (402) within three $0.01155 requests, with no sync in between;
- a key revoked in the portal, then reconcile_keys, is refused by CCH (401).

    bash scripts/cch.sh        # prints CCH_TEST_URL and CCH_TEST_ADMIN_TOKEN, starts the mock
    CCH_TEST_URL=http://127.0.0.1:23000 CCH_TEST_ADMIN_TOKEN=... CCH_TEST_MODEL=claude-sonnet-4-5 \\
        .venv/bin/pytest -q -s -p no:cacheprovider tests/upstreams/test_cch_real.py

CCH_TEST_MODEL must be routed by CCH to a provider answering like tests/realproxy.py's mock
(CLAUDE_USAGE) and priced there as the portal prices it: scripts/cch.sh adds that provider and
uploads claude-sonnet-4-5 at 3 / 15 / 0.30 / 3.75 USD per million, as the portal's table has
it. Skipped unless the three are set, and where the CCH driver is absent. `-s` prints the
figures (docs/upstreams/cch-real-run.md records a run).
"""

from __future__ import annotations

import os
import time
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
import requests
from django.core.management import call_command
from django.db.models import Sum

from accounts.models import User
from pool.models import ApiKey, UpstreamAccount, key_digest
from usage.models import ModelPrice, UsageSnapshot

from tests.accounts.mailbox import emailed_path
from tests.realproxy import CLAUDE_USAGE

pytest.importorskip("pool.upstreams.cch_driver", reason="the Claude Code Hub driver is absent")

URL = os.environ.get("CCH_TEST_URL", "").rstrip("/")
TOKEN = os.environ.get("CCH_TEST_ADMIN_TOKEN", "")
MODEL = os.environ.get("CCH_TEST_MODEL", "")

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not (URL and TOKEN and MODEL),
                       reason="CCH_TEST_URL, CCH_TEST_ADMIN_TOKEN and CCH_TEST_MODEL are not set"),
]

# The portal's price for the model (Anthropic's Sonnet 4.5 list prices, USD per million).
PRICE = {"input": Decimal(3), "output": Decimal(15), "cache_read": Decimal("0.3"),
         "cache_write": Decimal("3.75")}
# 100 × 3 + 50 × 15 + 10,000 × 0.3 + 2,000 × 3.75 = 11,550 per million: $0.01155 a request.
PER_REQUEST = Decimal("0.01155")
DEADLINE = 30.0  # seconds to wait for a state at CCH (its log rows are completed asynchronously)


def admin(method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{URL}/api/v1{path}", timeout=30,
                            headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)


def message(value: str) -> requests.Response:
    return requests.post(
        f"{URL}/v1/messages",
        headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


def log_rows(key_id: str, *, finished: int) -> list[dict[str, Any]]:
    """The key's rows in CCH's log, once `finished` of them have their status (CCH writes a
    row when a request starts and completes it a moment after the answer)."""
    give_up = time.monotonic() + DEADLINE
    while True:
        answer = admin("GET", "/usage-logs", params={"keyId": key_id, "limit": 100})
        assert answer.status_code == 200, answer.text[:300]
        rows = answer.json()["items"]
        done = [r for r in rows if r["statusCode"] is not None]
        if len(done) >= finished:
            return rows
        assert time.monotonic() < give_up, f"{len(done)} of {finished} rows finished at CCH"
        time.sleep(0.2)


def register(client, email: str, label: str = "laptop") -> str:
    """Registers through the pages; returns the key value the page shows once."""
    response = client.post("/register", {"email": email, "name": "New Person", "label": label})
    assert response.status_code == 200
    shown = client.post(emailed_path(), follow=True)
    assert shown.status_code == 200
    return shown.content.decode().split('id="key-value">', 1)[1].split("<", 1)[0]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture(autouse=True)
def portal(settings) -> None:
    settings.CCH_URL = URL
    settings.CCH_ADMIN_TOKEN = TOKEN
    ModelPrice.objects.update_or_create(model=MODEL, defaults=PRICE)


@pytest.fixture
def cleanup() -> Any:
    made: list[str] = []
    yield made
    for user_id in made:  # the CCH users this run made (keys go with them)
        admin("DELETE", f"/users/{user_id}")


def test_a_cch_person_end_to_end(client, cleanup) -> None:
    tag = f"{time.time_ns():x}"
    value = register(client, f"kp-real-{tag}@example.com")
    person = User.objects.get(email=f"kp-real-{tag}@example.com")
    key = ApiKey.objects.get(key_hash=key_digest(value))
    account = UpstreamAccount.objects.get(person=person)
    cleanup.append(account.remote_id)
    assert key.upstream.kind == "cch" and value.startswith("sk-")

    # The only key CCH holds for the person is the one handed out, and it cannot log in.
    listed = admin("GET", f"/users/{account.remote_id}/keys").json()["items"]
    assert [(k["id"], k["isEnabled"], k["canLoginWebUi"]) for k in listed] == [
        (int(key.remote_id), True, False)]
    user = admin("GET", f"/users/{account.remote_id}").json()
    print(f"\nCCH user {user['id']} {user['name']!r}: keys {[k['name'] for k in listed]}")

    # Works at once: no sync, no reconcile.
    statuses = [message(value).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    rows = log_rows(key.remote_id, finished=3)
    cch_cost = sum(Decimal(r["costUsd"]) for r in rows)

    run("sync_usage")
    snap = UsageSnapshot.objects.filter(api_key=key).aggregate(
        n=Sum("requests"), failed=Sum("failures"), uncached=Sum("input_tokens"),
        read=Sum("cached_tokens"), write=Sum("cache_creation_tokens"),
        out=Sum("output_tokens"), cost=Sum("cost"))
    print(f"after 3 requests and sync_usage: portal {snap}; CCH rows "
          f"{[(r['id'], r['statusCode'], r['inputTokens'], r['cacheReadInputTokens'], r['cacheCreationInputTokens'], r['outputTokens'], r['costUsd']) for r in rows]}")
    assert snap == {
        "n": 3, "failed": 0,
        "uncached": 3 * CLAUDE_USAGE["input_tokens"],
        "read": 3 * CLAUDE_USAGE["cache_read_input_tokens"],
        "write": 3 * CLAUDE_USAGE["cache_creation_input_tokens"],
        "out": 3 * CLAUDE_USAGE["output_tokens"],
        "cost": 3 * PER_REQUEST,
    }
    assert cch_cost == snap["cost"], (cch_cost, snap["cost"])  # what CCH billed, to the digit

    run("sync_usage")  # nothing new: nothing counted twice
    assert message(value).status_code == 200
    log_rows(key.remote_id, finished=4)
    run("sync_usage")
    totals = UsageSnapshot.objects.filter(api_key=key).aggregate(n=Sum("requests"),
                                                                  cost=Sum("cost"))
    print(f"after a 4th request and two more syncs: {totals}")
    assert totals == {"n": 4, "cost": 4 * PER_REQUEST}

    # Revoked in the portal, then reconcile_keys: refused by CCH itself.
    confirm = client.post(f"/my-keys/{key.pk}/revoke")
    assert confirm.status_code in (200, 303)
    print("reconcile_keys:", run("reconcile_keys").strip().replace("\n", " | "))
    key.refresh_from_db()
    assert key.status == ApiKey.Status.REVOKED
    refused = message(value)
    print(f"revoked key at CCH: {refused.status_code} {refused.text[:160]}")
    assert refused.status_code == 401
    assert admin("GET", f"/users/{account.remote_id}/keys").json()["items"] == []


def test_a_daily_cost_limit_set_in_the_portal_is_cch_s_to_enforce(client, cleanup) -> None:
    tag = f"{time.time_ns():x}"
    value = register(client, f"kp-real-limit-{tag}@example.com")
    person = User.objects.get(email=f"kp-real-limit-{tag}@example.com")
    key = ApiKey.objects.get(key_hash=key_digest(value))
    account = UpstreamAccount.objects.get(person=person)
    cleanup.append(account.remote_id)

    User.objects.filter(pk=person.pk).update(limit_cost_day=Decimal("0.01"))
    print("\nreconcile_keys:", run("reconcile_keys").strip().replace("\n", " | "))
    user = admin("GET", f"/users/{account.remote_id}").json()
    listed = admin("GET", f"/users/{account.remote_id}/keys").json()["items"]
    print(f"CCH user dailyQuota {user['dailyQuota']}, dailyResetTime {user['dailyResetTime']}; "
          f"key limitDailyUsd {[k['limitDailyUsd'] for k in listed]}")
    assert Decimal(str(user["dailyQuota"])) == Decimal("0.01")

    # No sync in between: CCH itself refuses.
    answers = [message(value) for _ in range(3)]
    statuses = [a.status_code for a in answers]
    refused = next((a for a in answers if a.status_code == 402), None)
    print(f"three requests at $0.01155: {statuses}; the refusal: "
          f"{refused.text[:400] if refused is not None else None}")
    assert statuses[0] == 200 and refused is not None
    assert refused.json()["error"]["limit_type"] == "daily_quota"
    rows = log_rows(key.remote_id, finished=statuses.count(200))
    assert len(rows) == statuses.count(200)  # refused requests are not in CCH's log

    run("sync_usage")
    snap = UsageSnapshot.objects.filter(api_key=key).aggregate(n=Sum("requests"),
                                                                cost=Sum("cost"))
    print(f"sync_usage: portal {snap}; CCH {sum(Decimal(r['costUsd']) for r in rows)}")
    assert snap == {"n": statuses.count(200), "cost": statuses.count(200) * PER_REQUEST}
