"""The portal's pages with claude-relay-service as an upstream, against the fake CRS
(tests/fakes/crs.py) through the real CRS driver:

- with only CRS_* set (no CLIProxyAPI at all), what `make run` serves works: registration,
  /my-keys and its add form, the key page, the leaderboard, /staff/proxy with the relay's
  health, the admin index;
- issue 16's "two upstreams at once": one person holds a CLIProxyAPI key (the fake proxy)
  and a CRS key; usage synced from both in one `sync_usage`; /my-keys, the leaderboard, the
  CSV export and the JSON API total both exactly, each figure what the vendor bills at the
  portal's prices for what each upstream reported.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from decimal import Decimal
from io import StringIO

import pytest
import requests
from django.core.management import call_command
from django.utils import timezone

pytest.importorskip("pool.upstreams.crs_driver", reason="the CRS driver (branch crsw) is not here")

from accounts.models import ApiToken, User  # noqa: E402
from accounts.services import api_token_new  # noqa: E402
from pool.models import ApiKey, Upstream, key_digest  # noqa: E402
from tests.accounts.mailbox import emailed_path  # noqa: E402
from tests.fakes.crs import MODEL, PASSWORD, USAGE, USERNAME, FakeCrs  # noqa: E402
from usage.currency import USD, money  # noqa: E402
from usage.models import ModelPrice, UsageSnapshot  # noqa: E402

pytestmark = pytest.mark.django_db
MILLION = Decimal(1_000_000)
# The portal's own prices (USD per million tokens), set here so the figures below are the
# vendor's bill computed by hand: Anthropic's list price for MODEL, a made-up one for the
# fake proxy's model.
CLAUDE = {"input": Decimal(3), "output": Decimal(15), "cache_read": Decimal("0.3"),
          "cache_write": Decimal("3.75")}
MOCK = {"input": Decimal(1), "output": Decimal(2), "cache_read": Decimal(0),
        "cache_write": Decimal(0)}
PUBLIC = "https://crs.example.com"


@pytest.fixture
def crs(settings) -> Iterator[FakeCrs]:
    """The fake CRS, declared in the environment as the portal's CRS_* settings."""
    fake = FakeCrs().start()
    settings.CRS_URL = fake.url
    settings.CRS_ADMIN_USERNAME = USERNAME
    settings.CRS_ADMIN_PASSWORD = PASSWORD
    settings.CRS_PUBLIC_URL = PUBLIC
    yield fake
    fake.stop()


@pytest.fixture
def prices(db) -> None:
    for model, price in ((MODEL, CLAUDE), ("mock-gpt", MOCK)):
        ModelPrice.objects.update_or_create(model=model, defaults=price)


def ask_crs(crs: FakeCrs, value: str) -> int:
    """A Claude Code request with the key at the relay; the answer's status."""
    return requests.post(f"{crs.url}/api/v1/messages", headers={"x-api-key": value},
                         json={"model": MODEL, "max_tokens": 8, "messages": []},
                         timeout=5).status_code


def key_value(page: str) -> str:
    return page.split('id="key-value">', 1)[1].split("<", 1)[0]


def crs_bill(n: int) -> Decimal:
    """What the vendor bills for `n` requests as the fake CRS reports them."""
    one = (USAGE["input_tokens"] * CLAUDE["input"] + USAGE["output_tokens"] * CLAUDE["output"]
           + USAGE["cache_read_input_tokens"] * CLAUDE["cache_read"]
           + USAGE["cache_creation_input_tokens"] * CLAUDE["cache_write"]) / MILLION
    return n * one


CRS_TOKENS = sum(USAGE.values())  # uncached input + output + cache read + cache write


def staff_token() -> str:
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    raw = api_token_new()
    item = ApiToken(user=staff, name="automation")
    item.set_token(raw)
    item.save()
    return raw


# --- only CRS_* set ----------------------------------------------------------------------------


def test_with_only_crs_the_pages_work_without_any_cliproxyapi(client, crs, prices, settings):
    assert not settings.CLIPROXY_URL
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    path = emailed_path()
    confirm = client.get(path).content.decode()
    assert 'name="upstream"' not in confirm  # one upstream: nothing to pick

    shown = client.post(path, follow=True)
    page = shown.content.decode()
    assert shown.status_code == 200
    value = key_value(page)
    assert value.startswith("cr_") and ask_crs(crs, value) == 200  # works at once
    assert f"export ANTHROPIC_BASE_URL={PUBLIC}/api\n" in page
    person = User.objects.get(email="new@example.com")
    key = ApiKey.objects.get(owner=person)
    assert key.key_hash == key_digest(value) and key.upstream.kind == Upstream.Kind.CRS

    my_keys = client.get("/my-keys").content.decode()
    assert 'name="upstream"' not in my_keys
    assert '<td class="upstream" data-label="Upstream">claude-relay-service</td>' in my_keys
    added = client.post("/my-keys/add", {"label": "ci"}, follow=True)
    second = key_value(added.content.decode())
    assert second.startswith("cr_") and second != value and ask_crs(crs, second) == 200

    out = StringIO()
    call_command("sync_usage", stdout=out)
    detail = client.get(f"/my-keys/{key.pk}").content.decode()
    assert f"<dd><code>{PUBLIC}/api</code></dd>" in detail and "at claude-relay-service" in detail
    snapshot = UsageSnapshot.objects.get(api_key=key)
    assert (snapshot.requests, snapshot.total_tokens, snapshot.cost) == (
        1, CRS_TOKENS, crs_bill(1))

    boss = User.objects.create_superuser("boss@example.com", "a-long-password-1")
    client.force_login(boss)
    board = client.get("/staff/leaderboard", {"period": "all", "by": "requests"})
    assert board.status_code == 200 and "new@example.com" in board.content.decode()
    status = client.get("/staff/proxy").content.decode()
    row = status.split('data-upstream="claude-relay-service"', 1)[1].split("</tr>", 1)[0]
    assert '<span class="ok">yes</span>' in row and f"<td>2</td>" in row  # two keys held
    assert 'id="no-cliproxyapi"' in status and PASSWORD not in status
    index = client.get("/admin/")
    assert index.status_code == 200 and 'data-alert="pool-low"' not in index.content.decode()
    assert client.get("/staff/proxy/settings").status_code == 200  # says there is none


# --- two upstreams at once ---------------------------------------------------------------------


def test_one_person_with_a_cliproxyapi_key_and_a_crs_key_is_totalled_everywhere(
    client, ann, bob, live_key, fake_proxy, crs, prices
):
    proxy_key, proxy_value = live_key  # Ann's CLIProxyAPI key (pool key at the fake proxy)
    client.force_login(ann)
    picker = client.get("/my-keys").content.decode()
    assert len(re.findall(r'name="upstream"', picker)) == 2
    relay = Upstream.objects.get(kind=Upstream.Kind.CRS)
    shown = client.post("/my-keys/add", {"label": "relay", "upstream": relay.pk}, follow=True)
    ann_crs = key_value(shown.content.decode())
    assert ann_crs.startswith("cr_")
    token = staff_token()
    made = client.post("/api/register-key", content_type="application/json",
                       data={"email": bob.email, "label": "bob", "upstream": relay.name},
                       HTTP_AUTHORIZATION=f"Bearer {token}")
    assert made.status_code == 201 and made.json()["upstream"] == relay.name
    bob_crs = made.json()["key"]

    # What each upstream served: 3 requests on Ann's proxy key, 2 on her CRS key, 1 on Bob's.
    start = timezone.now().timestamp()
    for i in range(3):
        fake_proxy.add_usage(proxy_value, model="mock-gpt", input_tokens=11, output_tokens=7,
                             timestamp=start + i / 1000)
    assert [ask_crs(crs, ann_crs) for _ in range(2)] + [ask_crs(crs, bob_crs)] == [200] * 3
    call_command("sync_usage", stdout=StringIO())

    proxy_bill = 3 * (11 * MOCK["input"] + 7 * MOCK["output"]) / MILLION
    ann_requests, ann_tokens, ann_cost = 5, 3 * 18 + 2 * CRS_TOKENS, proxy_bill + crs_bill(2)
    bob_requests, bob_tokens, bob_cost = 1, CRS_TOKENS, crs_bill(1)
    by_key = {s.api_key.upstream_id is None: s for s in UsageSnapshot.objects.filter(
        api_key__owner=ann).select_related("api_key")}
    assert (by_key[True].requests, by_key[True].cost) == (3, proxy_bill)
    assert (by_key[False].requests, by_key[False].cost) == (2, crs_bill(2))

    # /my-keys: both keys, and totals over both.
    page = client.get("/my-keys").content.decode()
    totals = page.split('class="totals"', 1)[1].split("</dl>", 1)[0]
    assert f"<dd>{ann_requests}</dd>" in totals and f"<dd>{ann_tokens:,}</dd>" in totals
    assert money(ann_cost, currency=USD) in totals
    upstreams = re.findall(r'<td class="upstream" data-label="Upstream">([^<]*)</td>', page)
    assert sorted(upstreams) == ["CLIProxyAPI", "claude-relay-service"]

    # The leaderboard (as JSON for a staff token, the page's own numbers).
    board = client.get("/staff/leaderboard", {"period": "all", "by": "tokens"},
                       HTTP_AUTHORIZATION=f"Bearer {token}").json()
    rows = {r["email"]: r for r in board["rows"]}
    assert (rows[ann.email]["requests"], rows[ann.email]["tokens"],
            Decimal(rows[ann.email]["cost"])) == (ann_requests, ann_tokens, ann_cost)
    assert (rows[bob.email]["requests"], Decimal(rows[bob.email]["cost"])) == (
        bob_requests, bob_cost)
    assert (board["totals"]["requests"], board["totals"]["tokens"],
            Decimal(board["totals"]["cost"])) == (
        ann_requests + bob_requests, ann_tokens + bob_tokens, ann_cost + bob_cost)

    # The CSV export: one row per key, model and day; summed per person.
    today = timezone.localdate().isoformat()
    body = b"".join(client.get("/staff/export", {"from": today, "to": today},
                               HTTP_AUTHORIZATION=f"Bearer {token}").streaming_content)
    rows_csv = list(csv.DictReader(io.StringIO(body.decode().lstrip("\ufeff"))))
    ann_rows = [r for r in rows_csv if r["email"] == ann.email]
    assert sorted(r["upstream"] for r in ann_rows) == ["CLIProxyAPI", "claude-relay-service"]
    assert sum(int(r["requests"]) for r in ann_rows) == ann_requests
    assert sum(int(r["total tokens"]) for r in ann_rows) == ann_tokens
    assert sum(Decimal(r["cost (USD)"]) for r in ann_rows) == ann_cost

    # The JSON API: the person's totals over both, each key with its upstream.
    stats = client.get(f"/api/user-stats/{ann.email}").json()
    assert (stats["total_requests"], stats["total_tokens"], Decimal(stats["total_cost"])) == (
        ann_requests, ann_tokens, ann_cost)
    assert {k["upstream"]: k["requests"] for k in stats["keys"]} == {
        "CLIProxyAPI": 3, "claude-relay-service": 2}
    everyone = client.get("/api/all-users-stats", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert (everyone["summary"]["total_requests"], Decimal(everyone["summary"]["total_cost"])) \
        == (ann_requests + bob_requests, ann_cost + bob_cost)

    # A second sync counts nothing twice, on either upstream.
    call_command("sync_usage", stdout=StringIO())
    assert client.get(f"/api/user-stats/{ann.email}").json()["total_requests"] == ann_requests


def test_a_relay_that_does_not_answer_makes_no_key_and_says_so(client, ann, crs, settings):
    crs.stop()  # the relay is away
    client.force_login(ann)
    refused = client.post("/my-keys/add", {"label": "ci"})
    page = refused.content.decode()
    assert refused.status_code == 503
    assert "claude-relay-service could not make a key just now" in page and PASSWORD not in page
    assert not ApiKey.objects.exists()
    client.logout()
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    path = emailed_path()
    assert client.post(path).status_code == 503
    assert not User.objects.filter(email="new@example.com").exists()
    assert client.get(path).status_code == 200  # the link was not used: it works later
