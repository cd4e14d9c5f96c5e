"""Limits with no back door: a person over a limit (theirs, or one of their keys') gets no
new key anywhere (/my-keys, the JSON API, a registration link) and is told which limit and
when it resets; /my-keys says so at the top; raising or removing a limit in the admin
brings the keys it held back at once, audited, and the proxy follows."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from keyportal.models import AuditEvent
from pool.models import ApiKey
from pool.services import KeyRefused, key_assign, key_issue_refusal
from tests.accounts.mailbox import emailed_path
from usage.limits import limit_reached, limits_enforce, windows_at
from usage.models import UsageSnapshot

pytestmark = pytest.mark.django_db
Status, State, Reason, Action = (
    ApiKey.Status, ApiKey.ProxyState, ApiKey.SuspendedFor, AuditEvent.Action,
)


@pytest.fixture(autouse=True)
def _utc(settings) -> None:
    settings.TIME_ZONE = "UTC"


def used(key: ApiKey, tokens: int, *, cost: str | None = None, ago: timedelta = timedelta(0)
         ) -> None:
    """Usage of `key` in the hour that holds now - ago."""
    hour = (timezone.now() - ago).replace(minute=0, second=0, microsecond=0)
    UsageSnapshot.objects.create(api_key=key, model="m", hour=hour, requests=1,
                                 total_tokens=tokens,
                                 cost=None if cost is None else Decimal(cost))


def limit(obj, **limits) -> None:
    type(obj).objects.filter(pk=obj.pk).update(**limits)
    obj.refresh_from_db()


def day_end() -> str:
    return windows_at(timezone.now())["day"].end.strftime("%Y-%m-%d %H:%M UTC")


def post_json(client, url: str, body: dict, **headers):
    return client.post(url, json.dumps(body), content_type="application/json", headers=headers)


@pytest.fixture
def ann_over(ann, ready_keys) -> ApiKey:
    """Ann, with a daily token limit of 100, has used 150 tokens today through her key."""
    key = key_assign(user=ann, label="laptop").key
    limit(ann, limit_tokens_day=100)
    used(key, 150)
    return key


def pool_left() -> int:
    return ApiKey.objects.filter(status=Status.POOL).count()


# --- the check itself ------------------------------------------------------------------------


def test_a_person_over_a_limit_is_refused_with_the_limit_and_its_reset(ann, ann_over):
    before = pool_left()
    with pytest.raises(KeyRefused) as refused:
        key_assign(user=ann, label="second")
    assert refused.value.reason == "person_tokens_day"
    assert refused.value.until == windows_at(timezone.now())["day"].end
    assert str(refused.value) == (
        f"You have reached your daily token limit (150 of 100), so no new key can be added "
        f"until it resets at {day_end()}.")
    assert pool_left() == before and ApiKey.objects.filter(owner=ann).count() == 1
    assert not AuditEvent.objects.filter(action=Action.KEY_ISSUED, detail="second").exists()


def test_under_the_limit_or_over_it_only_yesterday_a_key_is_issued(ann, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    limit(ann, limit_tokens_day=100, limit_tokens_month=10_000)
    used(key, 99)
    assert key_assign(user=ann, label="two").key.owner == ann
    UsageSnapshot.objects.all().delete()
    used(key, 500, ago=timedelta(days=1))  # over the day limit, but yesterday
    assert key_assign(user=ann, label="three").key.owner == ann


def test_a_key_over_its_own_limit_keeps_its_holder_from_a_fresh_one(ann, ready_keys):
    key = key_assign(user=ann, label="ci").key
    limit(key, limit_cost_month=Decimal("2"))
    used(key, 10, cost="2.50")
    refusal = key_issue_refusal(user=ann)
    assert refusal is not None and refusal.reason == "key_cost_month"
    assert f"Your key “ci” ({key.masked}) has reached its monthly cost limit ($2.50 of " \
           f"$2.00)" in str(refusal)
    assert refusal.until == windows_at(timezone.now())["month"].end
    # A revoked key's own limit no longer matters: it cannot be used again.
    ApiKey.objects.filter(pk=key.pk).update(status=Status.REVOKED)
    assert key_issue_refusal(user=ann) is None


def test_the_limit_that_resets_last_is_named(ann, ann_over):
    limit(ann, limit_tokens_month=120)
    reached = limit_reached(person=ann)
    assert reached.reason == "person_tokens_month"
    assert reached.until == windows_at(timezone.now())["month"].end


def test_a_deactivated_person_gets_no_key(ann, ready_keys):
    User.objects.filter(pk=ann.pk).update(is_active=False)
    ann.refresh_from_db()
    with pytest.raises(KeyRefused) as refused:
        key_assign(user=ann, label="x")
    assert refused.value.reason == Reason.PERSON_INACTIVE and refused.value.until is None


# --- /my-keys ----------------------------------------------------------------------------------


def test_the_add_form_refuses_and_says_why_without_javascript(client, ann, ann_over):
    client.force_login(ann)
    before = pool_left()
    response = client.post("/my-keys/add", {"label": "second"})
    assert response.status_code == 403
    page = response.content.decode()
    assert "no new key can be added until it resets at" in page and day_end() in page
    assert 'id="limit-banner"' in page
    assert "key-value" not in page  # no key shown
    assert pool_left() == before and ApiKey.objects.filter(owner=ann).count() == 1


def test_the_add_form_refuses_in_place_with_htmx(client, ann, ann_over):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "second"}, headers={"HX-Request": "true"})
    assert response.status_code == 200  # htmx swaps only 2xx answers
    assert response["HX-Retarget"] == "#add-form" and response["HX-Reswap"] == "outerHTML"
    page = response.content.decode()
    assert 'id="add-form"' in page and "daily token limit" in page and day_end() in page
    assert ApiKey.objects.filter(owner=ann).count() == 1


def test_someone_else_under_no_limit_still_adds_keys(client, ann_over, bob):
    client.force_login(bob)
    response = client.post("/my-keys/add", {"label": "mine"}, follow=True)
    assert response.status_code == 200 and 'id="key-value"' in response.content.decode()
    assert ApiKey.objects.filter(owner=bob).count() == 1


def test_anonymous_add_goes_to_sign_in(client, ann_over):
    before = pool_left()
    response = client.post("/my-keys/add", {"label": "x"})
    assert response.status_code == 302 and "/login" in response["Location"]
    assert pool_left() == before


def test_a_suspended_person_sees_a_banner_with_the_limit_and_its_return(client, ann, ann_over):
    limits_enforce(now=timezone.now(), reconcile=False)
    ann_over.refresh_from_db()
    assert ann_over.status == Status.SUSPENDED
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    banner = page[page.index('id="limit-banner"'):]
    banner = banner[:banner.index("</section>")]
    assert "You have reached your daily token limit: your keys are suspended until " \
           f"{day_end()}, and no new key can be added before then." in banner
    # At the top: before the quota bars and the add form.
    assert page.index('id="limit-banner"') < page.index('id="add-form"')
    # The htmx branch swaps the table only; the banner is not part of it.
    partial = client.get("/my-keys", headers={"HX-Request": "true"}).content.decode()
    assert "limit-banner" not in partial


def test_no_banner_for_someone_under_their_limits(client, ann, ready_keys):
    key = key_assign(user=ann, label="laptop").key
    limit(ann, limit_tokens_day=100)
    used(key, 50)
    client.force_login(ann)
    assert "limit-banner" not in client.get("/my-keys").content.decode()


def test_the_banner_names_a_key_held_by_its_own_limit(client, ann, ready_keys):
    key = key_assign(user=ann, label="ci").key
    limit(key, limit_tokens_day=10)
    used(key, 10)
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    assert f"Your key “ci” ({key.masked}) has reached its daily token limit: it is suspended " \
           f"until {day_end()}" in page


def test_a_registration_link_of_someone_over_a_limit_issues_nothing(client, ann, ann_over):
    client.post("/register", {"email": ann.email, "name": "Ann", "label": "ci"})
    path = emailed_path()
    response = client.post(path)
    assert response.status_code == 403
    assert "daily token limit" in response.content.decode()
    assert ApiKey.objects.filter(owner=ann).count() == 1
    # The link was not used up: it works once the limit no longer holds.
    limit(ann, limit_tokens_day=None)
    assert client.post(path, follow=True).status_code == 200
    assert ApiKey.objects.filter(owner=ann, label="ci").count() == 1


# --- the JSON API --------------------------------------------------------------------------------


@pytest.fixture
def token(db) -> str:
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    raw = api_token_new()
    item = ApiToken(user=staff, name="automation")
    item.set_token(raw)
    item.save()
    return raw


def test_the_api_refuses_a_session_over_a_limit_with_a_json_403(client, ann, ann_over):
    client.force_login(ann)
    response = post_json(client, "/api/register-key", {"label": "script"})
    assert response.status_code == 403
    body = response.json()
    assert body["error"].startswith("You have reached your daily token limit (150 of 100)")
    assert body["reason"] == "person_tokens_day"
    assert body["resets_at"] == windows_at(timezone.now())["day"].end.isoformat()
    assert "key" not in body and ApiKey.objects.filter(owner=ann).count() == 1


def test_the_api_refuses_a_staff_token_acting_for_someone_over_a_limit(client, ann, ann_over,
                                                                      token):
    response = post_json(client, "/api/register-key", {"email": ann.email, "label": "ci"},
                         Authorization=f"Bearer {token}")
    assert response.status_code == 403 and response.json()["reason"] == "person_tokens_day"
    assert ApiKey.objects.filter(owner=ann).count() == 1
    # A person under their limits still gets one through the same token.
    ok = post_json(client, "/api/register-key", {"email": "bob@example.com", "label": "ci"},
                   Authorization=f"Bearer {token}")
    assert ok.status_code == 201


def test_the_api_refuses_anonymous_callers(client, ann_over):
    assert post_json(client, "/api/register-key", {"label": "x"}).status_code == 401


# --- raising or removing a limit brings the keys back at once ----------------------------


def person_form(person: User, **limits: str) -> dict[str, str]:
    form = {"email": person.email, "name": person.name, "is_active": "on",
            "limit_tokens_day": "", "limit_tokens_month": "", "limit_cost_day": "",
            "limit_cost_month": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    return form | limits


def key_form(key: ApiKey, **limits: str) -> dict[str, str]:
    form = {"label": key.label, "expires_at_0": "", "expires_at_1": "",
            "limit_tokens_day": "", "limit_tokens_month": "", "limit_cost_day": "",
            "limit_cost_month": ""}
    for name in ("limit_tokens_day", "limit_tokens_month", "limit_cost_day", "limit_cost_month"):
        value = getattr(key, name)
        form[name] = "" if value is None else str(value)
    return form | limits


@pytest.fixture
def ann_at_proxy(fake_proxy, ann) -> tuple[ApiKey, str]:
    """Ann's key at the fake proxy, next to an operator's key and pool keys: (key, value)."""
    from io import StringIO

    from django.core.management import call_command

    fake_proxy.api_keys = ["operator-own-key"]
    call_command("generate_keys", "--count", "3", stdout=StringIO())
    key = ApiKey.objects.order_by("id").first()
    value = key.value
    ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE, owner=ann, value=None,
                                            label="laptop")
    key.refresh_from_db()
    return key, value


def suspend_over(key: ApiKey, fake_proxy, proxy_accepts, value: str) -> None:
    """Enforce now: the key leaves the proxy (its value kept in escrow)."""
    report = limits_enforce(now=timezone.now())
    assert report.suspended == 1
    key.refresh_from_db()
    assert key.status == Status.SUSPENDED and key.proxy_state == State.REMOVED
    assert not proxy_accepts(value)


@pytest.mark.django_db(transaction=True)  # the proxy follows when the admin's edit commits
def test_raising_a_persons_limit_in_the_admin_brings_the_keys_back_at_once(
    admin_client, admin_user, ann, ann_at_proxy, fake_proxy, proxy_accepts
):
    key, value = ann_at_proxy
    limit(ann, limit_tokens_day=100)
    used(key, 150)
    suspend_over(key, fake_proxy, proxy_accepts, value)
    assert key_issue_refusal(user=ann) is not None

    page = admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                             person_form(ann, limit_tokens_day="1000"), follow=True)

    assert page.status_code == 200
    assert "1 key suspended by a limit is active again: it returns to the proxy now." in \
        page.content.decode()
    key.refresh_from_db()
    assert (key.status, key.suspended_for, key.suspended_until) == (Status.ACTIVE, "", None)
    assert key.proxy_state == State.PUSHED and proxy_accepts(value)
    assert "operator-own-key" in fake_proxy.api_keys
    [back] = AuditEvent.objects.filter(action=Action.KEY_RESTORED)
    assert (back.actor_id, back.target_id) == (admin_user.pk, str(key.pk))
    assert "person_tokens_day raised or removed" in back.detail
    # The limit change itself is audited as before.
    assert AuditEvent.objects.filter(action=Action.LIMITS_CHANGED, target_id=str(ann.pk)).exists()
    ann.refresh_from_db()
    assert key_issue_refusal(user=ann) is None


@pytest.mark.django_db(transaction=True)
def test_removing_a_keys_limit_in_the_admin_brings_it_back_at_once(
    admin_client, ann, ann_at_proxy, fake_proxy, proxy_accepts
):
    key, value = ann_at_proxy
    limit(key, limit_tokens_day=100)
    used(key, 150)
    suspend_over(key, fake_proxy, proxy_accepts, value)

    page = admin_client.post(f"/admin/pool/apikey/{key.pk}/change/",
                             key_form(key, limit_tokens_day=""), follow=True)

    assert page.status_code == 200
    key.refresh_from_db()
    assert key.status == Status.ACTIVE and key.limit_tokens_day is None
    assert proxy_accepts(value)
    assert AuditEvent.objects.filter(action=Action.KEY_RESTORED, target_id=str(key.pk)).count() == 1


def test_a_raise_that_still_leaves_the_person_over_changes_nothing(admin_client, ann, ann_over):
    limits_enforce(now=timezone.now(), reconcile=False)
    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                      person_form(ann, limit_tokens_day="120"))
    ann_over.refresh_from_db()
    assert ann_over.status == Status.SUSPENDED
    assert not AuditEvent.objects.filter(action=Action.KEY_RESTORED).exists()


def test_lifting_the_month_limit_leaves_the_key_to_the_day_limit(admin_client, ann, ann_over):
    limit(ann, limit_tokens_month=120)
    limits_enforce(now=timezone.now(), reconcile=False)
    ann_over.refresh_from_db()
    windows = windows_at(timezone.now())
    assert (ann_over.suspended_for, ann_over.suspended_until) == (
        "person_tokens_month", windows["month"].end)

    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                      person_form(ann, limit_tokens_day="100"))

    ann_over.refresh_from_db()
    assert ann_over.status == Status.SUSPENDED
    assert (ann_over.suspended_for, ann_over.suspended_until) == (
        "person_tokens_day", windows["day"].end)
    assert AuditEvent.objects.filter(action=Action.KEY_SUSPENDED,
                                     detail__contains="person_tokens_day holds").count() == 1


def test_a_staff_suspension_is_not_lifted_by_a_limit_change(admin_client, ann, ann_over):
    from pool.services import key_suspend

    key_suspend(key=ann_over, reason=Reason.STAFF)
    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/", person_form(ann))
    ann_over.refresh_from_db()
    assert (ann_over.status, ann_over.suspended_for) == (Status.SUSPENDED, Reason.STAFF)


def test_a_limit_raised_outside_the_admin_frees_the_keys_at_the_next_sync(ann, ann_over):
    limits_enforce(now=timezone.now(), reconcile=False)
    limit(ann, limit_tokens_day=None)  # the shell, SQL: nothing runs at once

    report = limits_enforce(now=timezone.now(), reconcile=False)

    assert report.released == 1
    assert "1 suspended keys active again (their limit was raised or removed)." in report.lines()
    ann_over.refresh_from_db()
    assert ann_over.status == Status.ACTIVE
    assert AuditEvent.objects.get(action=Action.KEY_RESTORED).actor_kind == "system"
