"""The admin as a place to work: every list searchable and filterable, totals computed in the
query (the number of queries does not grow with the rows shown), keys always masked, and
actions that call the services."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as tz
from decimal import Decimal

import pytest
from django.core import mail

from accounts.models import ApiToken, User
from keyportal.audit import audit_record
from keyportal.models import AuditEvent
from pool.models import ApiKey
from tests.usage.conftest import issue
from usage.models import LimitNotice, ModelPrice, SyncRun, UsageSnapshot

pytestmark = pytest.mark.django_db
HOUR = datetime(2026, 3, 1, 10, tzinfo=tz.utc)


def populate(n: int) -> list:
    """`n` people with a key each, and rows in every list the admin shows."""
    held = issue(n, [f"p{i:03d}@example.com" for i in range(n)])
    for i, h in enumerate(held):
        ApiKey.objects.filter(pk=h.key.pk).update(limit_tokens_day=1000 if i % 2 else None)
        for m in range(2):
            UsageSnapshot.objects.create(
                api_key=h.key, model=f"model-{m}", hour=HOUR + timedelta(hours=i),
                requests=2, total_tokens=100 * (i + 1), cost=Decimal("0.5") if m else None,
            )
        token = ApiToken(user=h.key.owner, name=f"token {i}")
        token.set_token(f"tok-{i:04d}-secret")
        token.save()
        audit_record(action=AuditEvent.Action.KEY_ISSUED, target=h.key)
        ModelPrice.objects.create(model=f"model-{i}", input=1, output=2, cache_read=0,
                                  cache_write=0)
        SyncRun.objects.create(started_at=HOUR, finished_at=HOUR, ok=bool(i % 2),
                               message=f"run {i}")
        LimitNotice.objects.create(subject=f"key:{h.key.pk}", limit="limit_tokens_day",
                                   window_start=HOUR, threshold=80)
    return held


# session, staff user, then the page: count (where shown), rows, date-hierarchy bounds and
# filter choices; never one query per row.
LISTS = {
    "/admin/accounts/user/": 4,
    "/admin/accounts/apitoken/": 5,
    # with the upstream filter's choices, is there a CLIProxyAPI, and the people's / pool counts
    "/admin/pool/apikey/": 10,
    "/admin/keyportal/auditevent/": 7,
    "/admin/usage/usagesnapshot/": 8,
    "/admin/usage/modelprice/": 5,
    "/admin/usage/syncrun/": 7,
    "/admin/usage/limitnotice/": 8,
}


@pytest.mark.parametrize("url", LISTS)
@pytest.mark.parametrize("rows", [3, 25])
def test_list_query_counts_do_not_grow_with_rows(admin_client, django_assert_num_queries, url,
                                                 rows):
    populate(rows)
    with django_assert_num_queries(LISTS[url]):
        assert admin_client.get(url).status_code == 200


def test_people_list_shows_each_persons_keys_and_tokens(admin_client):
    held = populate(3)
    ann = held[2].key.owner
    issue(1, [ann.email])  # a second key, without usage
    page = admin_client.get("/admin/accounts/user/", {"q": ann.email}).content.decode()
    assert ann.email in page and held[0].key.owner.email not in page
    # 2 keys; 2 rows of 300 tokens; cost known for one row only.
    assert '<td class="field-key_count">2</td>' in page
    assert '<td class="field-tokens">600</td>' in page
    assert '<td class="field-cost">$0.50</td>' in page  # the one money format


def test_people_list_sorts_by_tokens_and_filters_by_limits(admin_client):
    held = populate(3)
    User.objects.filter(pk=held[1].key.owner_id).update(limit_cost_month=Decimal("5"))
    page = admin_client.get("/admin/accounts/user/", {"o": "-4"}).content.decode()
    emails = [h.key.owner.email for h in held]
    assert page.index(emails[2]) < page.index(emails[1]) < page.index(emails[0])
    page = admin_client.get("/admin/accounts/user/", {"limits": "yes"}).content.decode()
    assert emails[1] in page and emails[0] not in page


def test_key_list_shows_tokens_masked_keys_and_filters(admin_client):
    held = populate(3)
    page = admin_client.get("/admin/pool/apikey/", {"limits": "yes"}).content.decode()
    assert held[1].key.masked in page and held[0].key.masked not in page
    assert '<td class="field-tokens">400</td>' in page
    assert all(h.value not in page and h.key.key_hash not in page for h in held)
    page = admin_client.get("/admin/pool/apikey/", {"q": held[0].key.last4}).content.decode()
    assert held[0].key.masked in page


def results(response) -> str:
    """The table of rows of a change list (not the filters or the search box)."""
    page = response.content.decode()
    return page[page.index("<tbody>"):page.index("</tbody>")]


@pytest.mark.parametrize(
    "url, params, shown, hidden",
    [
        ("/admin/accounts/apitoken/", {"q": "token 1"}, "token 1", "token 2"),
        ("/admin/usage/modelprice/", {"q": "model-2"}, "model-2", "model-1"),
        ("/admin/usage/syncrun/", {"q": "run 2"}, "run 2", "run 1"),
        ("/admin/usage/syncrun/", {"ok__exact": "1"}, "run 1", "run 2"),
        ("/admin/usage/usagesnapshot/", {"q": "p001@"}, "p001@", "p002@"),
        ("/admin/usage/limitnotice/", {"threshold": "100"}, "person:999", "key:"),
        ("/admin/usage/limitnotice/", {"q": "person:"}, "person:999", "key:"),
    ],
)
def test_lists_search_and_filter(admin_client, url, params, shown, hidden):
    populate(3)
    LimitNotice.objects.create(subject="person:999", limit="limit_cost_month",
                               window_start=HOUR, threshold=100)
    rows = results(admin_client.get(url, params))
    assert shown in rows and hidden not in rows


def test_audit_log_searches_by_key(admin_client):
    held = populate(3)
    body = results(admin_client.get("/admin/keyportal/auditevent/", {"q": held[1].key.last4}))
    assert held[1].key.masked in body and held[0].key.masked not in body


def test_limit_notices_cannot_be_edited_or_deleted(admin_client):
    populate(1)
    notice = LimitNotice.objects.get()
    url = f"/admin/usage/limitnotice/{notice.pk}/"
    admin_client.post(f"{url}change/", {"threshold": "100"})
    assert admin_client.post(f"{url}delete/", {"post": "yes"}).status_code == 403
    notice.refresh_from_db()
    assert notice.threshold == 80


def test_sync_now_runs_the_sync_and_its_limits(admin_client, fake_proxy, live_key):
    key, value = live_key
    ApiKey.objects.filter(pk=key.pk).update(limit_tokens_day=10)
    fake_proxy.add_usage(value, input_tokens=30, output_tokens=0)
    response = admin_client.post("/admin/usage/syncrun/sync/", follow=True)
    text = response.content.decode()
    assert "stored 1" in text and "1 keys suspended for reaching a limit." in text
    key.refresh_from_db()
    assert key.status == ApiKey.Status.SUSPENDED and value not in fake_proxy.api_keys
    assert SyncRun.objects.count() == 1
    assert value not in text and all(value not in m.body for m in mail.outbox)


def test_sync_now_is_for_staff_only(client, ann, fake_proxy):
    client.force_login(ann)
    response = client.post("/admin/usage/syncrun/sync/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not SyncRun.objects.exists()


def test_django_groups_are_not_offered_anywhere(admin_client):
    """The portal grants nothing through groups: no sidebar entry, no page, no field."""
    index = admin_client.get("/admin/").content.decode()
    assert "/admin/auth/group/" not in index
    assert admin_client.get("/admin/auth/group/").status_code == 404
    person = User.objects.create_user("staffer@example.com", password="x" * 12, is_staff=True)
    page = admin_client.get(f"/admin/accounts/user/{person.pk}/change/").content.decode()
    assert 'name="groups"' not in page and 'name="user_permissions"' in page
