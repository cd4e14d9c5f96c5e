"""/my-keys (usage/pages.py): list with usage, add and revoke, as the owner, as someone else
and anonymously; with and without htmx."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from keyportal.locks import lease_acquire, lease_release
from pool.models import ApiKey, key_digest
from pool.services import PROXY_WRITE_LEASE, key_assign
from tests.usage.conftest import served
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState
HTMX = {"HX-Request": "true"}


def shown_value(content: bytes) -> str:
    return content.decode().split('id="key-value">', 1)[1].split("<", 1)[0]


# --- the list -------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_sign_in(client):
    response = client.get("/my-keys")
    assert response.status_code == 302 and response["Location"].startswith("/login?next=")


def test_owner_sees_their_keys_masked_and_nobody_elses(client, ann, bob, ready_keys):
    mine = key_assign(user=ann, label="laptop")
    theirs = key_assign(user=bob, label="bobs-secret-label")
    client.force_login(ann)

    page = client.get("/my-keys").content.decode()

    assert "laptop" in page and mine.key.masked in page
    assert mine.value not in page
    assert "bobs-secret-label" not in page and theirs.key.masked not in page
    assert 'action="/my-keys/add"' in page  # the add form works without JavaScript


def test_htmx_gets_only_the_table(client, ann, ready_keys):
    key_assign(user=ann, label="laptop")
    client.force_login(ann)
    response = client.get("/my-keys", headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert body.lstrip().startswith('<div id="key-table"') and "<html" not in body
    assert "laptop" in body
    assert "HX-Request" in response["Vary"]
    full = client.get("/my-keys")
    assert b"<html" in full.content and "HX-Request" in full["Vary"]


def test_someone_without_keys_is_told_how_to_get_one(client, ann):
    client.force_login(ann)
    assert b"You have no keys yet" in client.get("/my-keys").content


@pytest.mark.parametrize("count", [1, 12])
def test_the_list_costs_the_same_queries_however_many_keys(
    client, ann, django_assert_num_queries, make_ready_keys, count
):
    make_ready_keys(count)
    for n in range(count):
        key = key_assign(user=ann, label=f"k{n}").key
        for hour in range(n % 4 + 1):  # usage rows too, a different number per key
            served(key, at=timezone.now() - timedelta(hours=hour), model=f"m{hour % 2}")
    client.force_login(ann)
    # session, person, keys with their usage sums (and upstreams), quota (this month by key),
    # daily chart, the upstreams open to the person (the add form's picker)
    with django_assert_num_queries(6):
        response = client.get("/my-keys")
    assert response.content.count(b'<tr id="key-') == count


# --- usage columns --------------------------------------------------------------------------


def test_each_key_shows_its_usage_and_the_totals_are_on_top(client, ann, bob, make_ready_keys):
    make_ready_keys(3)
    laptop = key_assign(user=ann, label="laptop").key
    ci = key_assign(user=ann, label="ci").key
    bobs = key_assign(user=bob, label="bob").key
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("2"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    served(laptop, at=timezone.now(), requests=3, input_tokens=500_000, output_tokens=0)
    served(ci, at=timezone.now(), model="unpriced-model", requests=2, input_tokens=40,
           output_tokens=2)
    served(bobs, at=timezone.now(), requests=1000)
    client.force_login(ann)

    page = client.get("/my-keys").content.decode()

    totals = page.split('<dl class="totals"', 1)[1].split("</dl>", 1)[0]
    assert "<dd>5</dd>" in totals and "<dd>1,500,084</dd>" in totals
    # $3.00 is known, the ci key's usage has no price: the total says it is a lower bound.
    assert "≥ $3.00" in totals and "cost-partial" in totals
    laptop_row = page.split(f'<tr id="key-{laptop.pk}">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num" data-label="Requests">3</td>' in laptop_row and "$3.00" in laptop_row
    ci_row = page.split(f'<tr id="key-{ci.pk}">', 1)[1].split("</tr>", 1)[0]
    assert "cost-unknown" in ci_row and "$0" not in ci_row
    assert "1,000" not in page  # Bob's usage is not Ann's


def test_the_keys_come_first_then_the_add_form_quota_and_chart(client, ann, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    served(key, at=timezone.now(), requests=2)
    ann.limit_tokens_day = 1_000_000
    ann.save()
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    order = [page.index(mark) for mark in (
        '<dl class="totals"', f'<tr id="key-{key.pk}">', 'id="add-form"', 'id="quota"',
        'id="usage-chart"',
    )]
    assert order == sorted(order)
    totals = page.split('<dl class="totals"', 1)[1].split("</dl>", 1)[0]
    # The three totals say they are all-time (the quota and chart below are day and month).
    for label in ("All-time requests", "All-time tokens", "All-time cost"):
        assert f"<dt>{label}</dt>" in totals


def test_a_key_without_usage_shows_a_dash_for_its_cost(client, ann, ready_keys):
    key = key_assign(user=ann, label="new").key
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    row = page.split(f'<tr id="key-{key.pk}">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num" data-label="Requests">0</td>' in row
    cost = row.split('data-label="Cost">', 1)[1].split("</td>", 1)[0]
    assert "—" in cost and "$" not in cost and "unknown" not in cost


def test_revoked_row_keeps_its_usage(client, ann, proxy_keys):
    key = key_assign(user=ann, label="laptop").key
    served(key, at=timezone.now(), requests=7)
    client.force_login(ann)
    page = client.post(f"/my-keys/{key.pk}/revoke", headers=HTMX).content.decode()
    row = page.split(f'<tr id="key-{key.pk}">', 1)[1].split("</tr>", 1)[0]
    assert "status-revoked" in row and '<td class="num" data-label="Requests">7</td>' in row


# --- add ------------------------------------------------------------------------------------


def test_adding_a_key_shows_it_once_without_htmx(client, ann, ready_keys):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "  ci  "}, follow=True)
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get(owner=ann)
    assert key.label == "ci" and key_digest(shown_value(response.content)) == key.key_hash
    assert shown_value(response.content) not in client.get("/my-keys").content.decode()


def test_adding_a_key_with_htmx_swaps_in_the_key_and_the_table(client, ann, ready_keys):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci"}, headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200 and "<html" not in body
    assert "no-store" in response["Cache-Control"]
    assert 'id="key-value"' in body
    assert '<div id="key-table" class="key-list" hx-swap-oob="true">' in body
    assert ApiKey.objects.filter(owner=ann).count() == 1


def test_adding_a_key_with_htmx_empties_the_label_and_moves_focus_to_the_key(
    client, ann, ready_keys
):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci"}, headers=HTMX)
    body = response.content.decode()
    form = body.split('<form id="add-form"', 1)[1].split("</form>", 1)[0]
    assert 'hx-swap-oob="true"' in form
    assert 'name="label"' in form and 'value="ci"' not in form  # Enter cannot issue it twice
    assert json.loads(response["HX-Trigger-After-Settle"]) == {
        "kp:focus": {"selector": "#issued h2"}
    }


def test_a_bad_label_is_refused_on_the_field_and_changes_nothing(client, ann, ready_keys):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "x" * 101})
    assert response.status_code == 400 and b'class="errorlist' in response.content
    htmx = client.post("/my-keys/add", {"label": "x" * 101}, headers=HTMX)
    assert htmx["HX-Retarget"] == "#add-form" and htmx["HX-Reswap"] == "outerHTML"
    assert b'class="errorlist' in htmx.content and b"<html" not in htmx.content
    assert ApiKey.objects.filter(owner=ann).count() == 0


def test_adding_keys_is_rate_limited_per_person(client, ann, settings, make_ready_keys):
    settings.PORTAL_RATE_KEYS_PER_PERSON = 2
    make_ready_keys(3)
    client.force_login(ann)
    assert client.post("/my-keys/add", {"label": "a"}, follow=True).status_code == 200
    assert client.post("/my-keys/add", {"label": "b"}, follow=True).status_code == 200
    refused = client.post("/my-keys/add", {"label": "c"})
    assert refused.status_code == 400 and b"Please wait" in refused.content
    assert ApiKey.objects.filter(owner=ann).count() == 2


def test_an_empty_pool_is_said_plainly_and_staff_are_told(client, ann, django_user_model):
    django_user_model.objects.create_user("staff@example.com", password="x" * 12, is_staff=True)
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci"})
    assert response.status_code == 503 and b"No key is available right now" in response.content
    htmx = client.post("/my-keys/add", {"label": "ci"}, headers=HTMX)
    assert htmx.status_code == 200 and b"No key is available" in htmx.content
    assert b"<html" not in htmx.content
    assert [m.to for m in mail.outbox] == [["staff@example.com"]]
    assert ApiKey.objects.count() == 0


def test_anonymous_cannot_add(client, ready_keys):
    response = client.post("/my-keys/add", {"label": "ci"})
    assert response.status_code == 302 and response["Location"].startswith("/login")
    assert ApiKey.objects.filter(status=Status.POOL).count() == 5
    assert client.get("/my-keys/add").status_code == 302


# --- revoke ---------------------------------------------------------------------------------


def test_revoke_asks_first(client, ann, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    client.force_login(ann)
    page = client.get(f"/my-keys/{key.pk}/revoke")
    assert page.status_code == 200 and b"cannot be brought back" in page.content
    assert f'action="/my-keys/{key.pk}/revoke"'.encode() in page.content
    row = client.get(f"/my-keys/{key.pk}/revoke", headers=HTMX)
    assert row.content.lstrip().startswith(f'<tr id="key-{key.pk}" class="confirm">'.encode())
    assert ApiKey.objects.get(pk=key.pk).status == Status.ACTIVE


def test_revoke_kills_the_key_and_removes_it_from_the_proxy(
    client, ann, proxy_keys, fake_proxy, proxy_accepts
):
    issued = key_assign(user=ann, label="laptop")
    assert proxy_accepts(issued.value)
    client.force_login(ann)

    response = client.post(f"/my-keys/{issued.key.pk}/revoke")

    assert response.status_code == 303 and response["Location"] == "/my-keys"
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert key.status == Status.REVOKED and key.revoked_at is not None
    assert key.proxy_state == State.REMOVED
    assert issued.value not in fake_proxy.api_keys and "operator-own-key" in fake_proxy.api_keys
    assert not proxy_accepts(issued.value)
    assert b"is revoked" in client.get("/my-keys").content


def test_revoke_with_htmx_answers_the_list_with_the_key_folded_away(client, ann, proxy_keys):
    key = key_assign(user=ann, label="laptop").key
    other = key_assign(user=ann, label="ci").key
    client.force_login(ann)
    response = client.post(f"/my-keys/{key.pk}/revoke", headers=HTMX)
    body = response.content.decode().lstrip()
    assert response.status_code == 200 and body.startswith('<div id="key-table"')
    live, revoked = body.split('<details class="revoked"', 1)
    assert f'id="key-{other.pk}"' in live and f'id="key-{key.pk}"' not in live
    assert "Revoked (1)" in revoked and "autofocus" in revoked
    row = revoked.split(f'<tr id="key-{key.pk}">', 1)[1].split("</tr>", 1)[0]
    assert "status-revoked" in row and "/revoke" not in row
    # The live region's sentence, out of band.
    status = body.split('<p id="key-status" hx-swap-oob="innerHTML">', 1)[1].split("</p>", 1)[0]
    assert status == f"Key {key.masked} is revoked."


def test_revoked_keys_are_folded_below_the_live_ones(client, ann, proxy_keys):
    old = key_assign(user=ann, label="old").key
    new = key_assign(user=ann, label="new").key
    client.force_login(ann)
    client.post(f"/my-keys/{old.pk}/revoke")
    page = client.get("/my-keys").content.decode()
    live, revoked = page.split('<details class="revoked"', 1)
    assert f'id="key-{new.pk}"' in live and f'id="key-{old.pk}"' not in live
    assert "<summary>Revoked (1)</summary>" in revoked and f'id="key-{old.pk}"' in revoked
    assert "Your API keys</caption>" in live and "Your revoked keys</caption>" in revoked
    assert "autofocus" not in page.split("<details", 1)[1].split("</summary>", 1)[0]


def test_revoke_while_the_proxy_is_down_leaves_removal_pending(client, ann, ready_keys, settings):
    settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = "http://127.0.0.1:9", "k"
    key = key_assign(user=ann, label="laptop").key
    client.force_login(ann)
    row = client.post(f"/my-keys/{key.pk}/revoke", headers=HTMX)
    assert row.status_code == 200 and b"removal from the proxy pending" in row.content
    key.refresh_from_db()
    assert (key.status, key.proxy_state) == (Status.REVOKED, State.REMOVAL_PENDING)


def test_revoked_keys_are_never_handed_out_again(client, ann, bob, ready_keys):
    keys = [key_assign(user=ann, label=str(n)).key for n in range(5)]
    client.force_login(ann)
    for key in keys:
        client.post(f"/my-keys/{key.pk}/revoke")
    from pool.services import PoolEmpty

    with pytest.raises(PoolEmpty):
        key_assign(user=bob, label="")


def test_someone_else_cannot_see_or_revoke_my_key(client, ann, bob, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    client.force_login(bob)
    assert client.get(f"/my-keys/{key.pk}/revoke").status_code == 404
    assert client.post(f"/my-keys/{key.pk}/revoke").status_code == 404
    assert client.post(f"/my-keys/{key.pk}/revoke", headers=HTMX).status_code == 404
    assert ApiKey.objects.get(pk=key.pk).status == Status.ACTIVE


def test_anonymous_cannot_revoke(client, ann, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    for response in (client.get(f"/my-keys/{key.pk}/revoke"), client.post(f"/my-keys/{key.pk}/revoke")):
        assert response.status_code == 302 and response["Location"].startswith("/login")
    assert ApiKey.objects.get(pk=key.pk).status == Status.ACTIVE


def test_revoking_twice_is_harmless(client, ann, ready_keys, settings):
    key = key_assign(user=ann, label="laptop").key
    client.force_login(ann)
    client.post(f"/my-keys/{key.pk}/revoke")
    first = ApiKey.objects.get(pk=key.pk).revoked_at
    assert client.post(f"/my-keys/{key.pk}/revoke").status_code == 303
    assert ApiKey.objects.get(pk=key.pk).revoked_at == first
    assert b"already revoked" in client.get(f"/my-keys/{key.pk}/revoke").content


# --- a slow or busy proxy -------------------------------------------------------------------
# Revoking waits for the proxy at most PORTAL_REQUEST_PROXY_BUDGET (2 s) in all; the bound is
# what keeps a stalled proxy from tying up every web worker, so it is asserted against a proxy
# that stalls for longer than the bound, with the production timeout of 10 s.

BOUND = 4.0
STALL = 5.0


@pytest.fixture
def slow_proxy(settings, fake_proxy):
    settings.CLIPROXY_TIMEOUT = 10
    settings.PORTAL_REQUEST_PROXY_BUDGET = 2
    return fake_proxy


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


@pytest.mark.parametrize("headers", [{}, HTMX], ids=["page", "htmx"])
def test_revoke_answers_within_the_bound_while_the_proxy_stalls(
    client, ann, proxy_keys, slow_proxy, headers
):
    issued = key_assign(user=ann, label="laptop")
    slow_proxy.inject("/api-keys", delay=STALL, times=5)
    client.force_login(ann)

    url = f"/my-keys/{issued.key.pk}/revoke"
    response, elapsed = timed(lambda: client.post(url, headers=headers))

    assert response.status_code == (200 if headers else 303) and elapsed < BOUND
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert (key.status, key.proxy_state) == (Status.REVOKED, State.REMOVAL_PENDING)
    assert issued.value in slow_proxy.api_keys
    if headers:
        assert b"removal from the proxy pending" in response.content
    # The next reconcile finishes the job.
    slow_proxy.faults.clear()
    call_command("reconcile_keys", stdout=StringIO())
    key.refresh_from_db()
    assert key.proxy_state == State.REMOVED and issued.value not in slow_proxy.api_keys


def test_revoke_does_not_wait_for_another_writer(client, ann, proxy_keys, slow_proxy):
    issued = key_assign(user=ann, label="laptop")
    holder = lease_acquire(name=PROXY_WRITE_LEASE, ttl=timedelta(minutes=10))
    client.force_login(ann)

    response, elapsed = timed(lambda: client.post(f"/my-keys/{issued.key.pk}/revoke", headers=HTMX))

    assert response.status_code == 200 and elapsed < BOUND
    assert b"removal from the proxy pending" in response.content
    lease_release(name=PROXY_WRITE_LEASE, holder=holder)


@pytest.mark.parametrize("headers", [{}, HTMX], ids=["page", "htmx"])
def test_the_key_list_never_calls_the_proxy(client, ann, proxy_keys, slow_proxy, headers):
    key_assign(user=ann, label="laptop")
    slow_proxy.inject("", delay=STALL, times=100)  # every management route stalls
    sent = len(slow_proxy.management_requests)
    client.force_login(ann)

    response, elapsed = timed(lambda: client.get("/my-keys", headers=headers))

    assert response.status_code == 200 and elapsed < BOUND
    assert len(slow_proxy.management_requests) == sent
