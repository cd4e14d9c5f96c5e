"""A deactivated person's keys stop working at the proxy, and come back when the person is
active again: from the admin at once, and by the next reconcile or sync whichever way the
person was deactivated. Revoked keys stay revoked; keys held by a limit wait for their window."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from keyportal.models import AuditEvent
from pool.models import ApiKey
from pool.services import (
    key_resume,
    key_revoke,
    keys_lifecycle,
    keys_reconcile_quietly,
    person_set_active,
    pool_keys_create,
)
from usage.limits import limits_enforce, proxy_follow_due
from usage.models import UsageSnapshot
from usage.selectors import keys_with_usage

pytestmark = pytest.mark.django_db
Status, State, Reason, Action = (
    ApiKey.Status, ApiKey.ProxyState, ApiKey.SuspendedFor, AuditEvent.Action,
)
# Later than any clock the tests run on: reconcile's lifecycle uses the wall clock, and a
# window must not reset behind a test's back.
WINDOW_END = timezone.now() + timedelta(days=3650)


def reconcile() -> str:
    out = StringIO()
    call_command("reconcile_keys", stdout=out)
    return out.getvalue()


def sync() -> str:
    out = StringIO()
    call_command("sync_usage", stdout=out)
    return out.getvalue()


def person_form(person: User, *, active: bool) -> dict[str, str]:
    """The person's change form in the admin, as staff submit it."""
    form = {"email": person.email, "name": person.name, "limit_tokens_day": "",
            "limit_tokens_month": "", "limit_cost_day": "", "limit_cost_month": "",
            "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    return {**form, "is_active": "on"} if active else form


@pytest.fixture
def ann_keys(fake_proxy, ann) -> list[tuple[ApiKey, str]]:
    """Ann's two active keys at the fake proxy, next to an operator's own key and one unused
    pool key; each with its full value."""
    fake_proxy.api_keys = ["operator-own-key"]
    call_command("generate_keys", "--count", "3", stdout=StringIO())
    held = []
    for key in ApiKey.objects.order_by("id")[:2]:
        value = key.value
        ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE, owner=ann, value=None)
        key.refresh_from_db()
        held.append((key, value))
    return held


def assert_away(key: ApiKey, value: str, fake_proxy, proxy_accepts) -> None:
    key.refresh_from_db()
    assert (key.status, key.suspended_for, key.suspended_until) == (
        Status.SUSPENDED, Reason.PERSON_INACTIVE, None)
    assert key.proxy_state == State.REMOVED and key.escrow  # kept to come back
    assert value not in fake_proxy.api_keys and not proxy_accepts(value)


def assert_back(key: ApiKey, value: str, fake_proxy, proxy_accepts) -> None:
    key.refresh_from_db()
    assert (key.status, key.suspended_for, key.proxy_state, key.escrow) == (
        Status.ACTIVE, "", State.PUSHED, None)
    assert value in fake_proxy.api_keys and proxy_accepts(value)


# --- the admin: at once ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the proxy follows when the admin's edit commits
def test_deactivating_in_the_admin_takes_the_keys_off_the_proxy_at_once(
    admin_client, admin_user, ann, ann_keys, fake_proxy, proxy_accepts
):
    assert all(proxy_accepts(value) for _key, value in ann_keys)

    page = admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                             person_form(ann, active=False), follow=True)

    assert page.status_code == 200
    assert "2 keys suspended: they leave the proxy now." in page.content.decode()
    for key, value in ann_keys:
        assert_away(key, value, fake_proxy, proxy_accepts)
    assert fake_proxy.api_keys[0] == "operator-own-key" and len(fake_proxy.api_keys) == 2
    ann.refresh_from_db()
    assert not ann.is_active
    [who] = AuditEvent.objects.filter(action=Action.PERSON_DEACTIVATED)
    assert (who.actor_id, who.target_label, who.after) == (admin_user.pk, ann.email,
                                                            {"is_active": False})
    suspended = AuditEvent.objects.filter(action=Action.KEY_SUSPENDED, actor=admin_user)
    assert sorted(e.target_id for e in suspended) == sorted(str(k.pk) for k, _v in ann_keys)

    page = admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                             person_form(ann, active=True), follow=True)

    assert "2 keys active again: they return to the proxy now." in page.content.decode()
    for key, value in ann_keys:
        assert_back(key, value, fake_proxy, proxy_accepts)
    assert AuditEvent.objects.filter(action=Action.PERSON_REACTIVATED).count() == 1
    assert "No change." in reconcile()


def test_an_edit_that_leaves_active_alone_moves_no_key(admin_client, ann, ann_keys, fake_proxy):
    page = admin_client.get(f"/admin/accounts/user/{ann.pk}/change/").content.decode()
    assert "suspends all of this person's keys at the proxy" in page
    before = list(fake_proxy.api_keys)
    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/",
                      {**person_form(ann, active=True), "name": "Ann Lee"})
    assert fake_proxy.api_keys == before
    assert not AuditEvent.objects.filter(action__in=[Action.KEY_SUSPENDED,
                                                     Action.PERSON_DEACTIVATED]).exists()
    assert set(ApiKey.objects.filter(owner=ann).values_list("status", flat=True)) == {"active"}


def test_the_deactivate_and_reactivate_actions(
    admin_client, admin_user, ann, bob, ann_keys, fake_proxy, proxy_accepts,
    django_capture_on_commit_callbacks,
):
    action = {"_selected_action": [ann.pk, bob.pk, admin_user.pk]}
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post("/admin/accounts/user/",
                                 {**action, "action": "deactivate_people"}, follow=True)
    text = page.content.decode()
    assert "You cannot deactivate yourself" in text and "2 people deactivated." in text
    assert set(User.objects.filter(is_active=False).values_list("email", flat=True)) == {
        ann.email, bob.email}
    for key, value in ann_keys:
        assert_away(key, value, fake_proxy, proxy_accepts)

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post("/admin/accounts/user/", {**action, "action": "reactivate_people"})
    assert User.objects.filter(is_active=False).count() == 0
    for key, value in ann_keys:
        assert_back(key, value, fake_proxy, proxy_accepts)


def test_staff_cannot_resume_a_deactivated_persons_key(
    admin_client, ann, ann_keys, fake_proxy, proxy_accepts, django_capture_on_commit_callbacks
):
    (key, value), _other = ann_keys
    person_set_active(person=ann, active=False)
    reconcile()

    assert not key_resume(key=key)
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post("/admin/pool/apikey/", {
            "action": "resume_keys", "_selected_action": [key.pk]}, follow=True)

    assert "0 keys resumed." in page.content.decode()
    assert "its owner&#x27;s account is deactivated" in page.content.decode()
    assert_away(key, value, fake_proxy, proxy_accepts)


# --- deactivated any other way: the next reconcile or sync ----------------------------------


def test_a_person_deactivated_outside_the_admin_loses_their_keys_at_the_next_reconcile(
    ann, ann_keys, fake_proxy, proxy_accepts
):
    User.objects.filter(pk=ann.pk).update(is_active=False)  # the shell, SQL, a script
    assert all(proxy_accepts(value) for _key, value in ann_keys)  # nothing ran yet

    out = reconcile()

    assert "2 keys suspended (their owner's account is deactivated)." in out
    for key, value in ann_keys:
        assert_away(key, value, fake_proxy, proxy_accepts)
    system = AuditEvent.objects.filter(action=Action.KEY_SUSPENDED, actor_kind="system")
    assert system.count() == 2 and {e.detail for e in system} == {"owner deactivated"}

    User.objects.filter(pk=ann.pk).update(is_active=True)
    out = reconcile()

    assert "2 keys active again (their owner's account is active again)." in out
    for key, value in ann_keys:
        assert_back(key, value, fake_proxy, proxy_accepts)


def test_a_person_deactivated_outside_the_admin_loses_their_keys_at_the_next_sync(
    ann, ann_keys, fake_proxy, proxy_accepts
):
    User.objects.filter(pk=ann.pk).update(is_active=False)

    sync()

    for key, value in ann_keys:
        assert_away(key, value, fake_proxy, proxy_accepts)

    User.objects.filter(pk=ann.pk).update(is_active=True)
    sync()

    for key, value in ann_keys:
        assert_back(key, value, fake_proxy, proxy_accepts)


# --- what stays as it is --------------------------------------------------------------------


def test_a_key_revoked_while_its_owner_is_deactivated_stays_revoked(
    admin_user, ann, ann_keys, fake_proxy, proxy_accepts
):
    (revoked, revoked_value), (kept, kept_value) = ann_keys
    person_set_active(person=ann, active=False)
    reconcile()
    assert key_revoke(key=revoked, by=admin_user)
    reconcile()

    report = person_set_active(person=ann, active=True)
    reconcile()

    assert (report.changed, report.restored) == (True, 1)
    revoked.refresh_from_db()
    assert (revoked.status, revoked.escrow) == (Status.REVOKED, None)
    assert revoked_value not in fake_proxy.api_keys and not proxy_accepts(revoked_value)
    assert_back(kept, kept_value, fake_proxy, proxy_accepts)


def test_a_limit_suspended_key_of_a_reactivated_person_waits_for_its_window(
    ann, ann_keys, fake_proxy, proxy_accepts
):
    (limited, limited_value), (plain, plain_value) = ann_keys
    ApiKey.objects.filter(pk=limited.pk).update(
        status=Status.SUSPENDED, suspended_for=Reason.KEY_TOKENS_DAY,
        suspended_until=WINDOW_END, proxy_state=State.REMOVAL_PENDING)
    reconcile()

    person_set_active(person=ann, active=False)
    reconcile()
    limited.refresh_from_db()
    assert (limited.suspended_for, limited.suspended_until) == (Reason.KEY_TOKENS_DAY, WINDOW_END)

    person_set_active(person=ann, active=True)
    reconcile()

    limited.refresh_from_db()
    assert (limited.status, limited.suspended_for, limited.suspended_until) == (
        Status.SUSPENDED, Reason.KEY_TOKENS_DAY, WINDOW_END)
    assert limited_value not in fake_proxy.api_keys and not proxy_accepts(limited_value)
    assert_back(plain, plain_value, fake_proxy, proxy_accepts)

    assert keys_lifecycle(now=WINDOW_END).restored == 1  # its window, not the person, ends it
    limited.refresh_from_db()
    assert limited.status == Status.ACTIVE


def test_a_window_that_resets_while_the_person_is_deactivated_keeps_the_key_away(
    ann, ann_keys, fake_proxy, proxy_accepts
):
    (limited, limited_value), _plain = ann_keys
    ApiKey.objects.filter(pk=limited.pk).update(
        status=Status.SUSPENDED, suspended_for=Reason.PERSON_COST_DAY,
        suspended_until=WINDOW_END, proxy_state=State.REMOVAL_PENDING)
    person_set_active(person=ann, active=False)
    reconcile()

    report = keys_lifecycle(now=WINDOW_END)

    assert (report.restored, report.held) == (0, 1)
    limited.refresh_from_db()
    assert (limited.status, limited.suspended_for, limited.suspended_until) == (
        Status.SUSPENDED, Reason.PERSON_INACTIVE, None)
    assert not proxy_follow_due(now=WINDOW_END)  # nothing left for every sync to chase
    assert not proxy_accepts(limited_value)

    person_set_active(person=ann, active=True)
    reconcile()
    assert_back(limited, limited_value, fake_proxy, proxy_accepts)


def test_limits_neither_suspend_nor_email_a_deactivated_person(ann, ann_keys, fake_proxy):
    (key, _value), _other = ann_keys
    User.objects.filter(pk=ann.pk).update(is_active=False, limit_tokens_day=10)
    UsageSnapshot.objects.create(api_key=key, model="m", requests=1, total_tokens=50,
                                 hour=timezone.now().replace(minute=0, second=0, microsecond=0))

    report = limits_enforce(now=timezone.now())

    assert report.suspended == 0 and report.notices == 0 and not mail.outbox
    assert report.lifecycle.owner_inactive == 2
    assert set(ApiKey.objects.filter(owner=ann).values_list("suspended_for", flat=True)) == {
        Reason.PERSON_INACTIVE}


def test_an_extended_expiry_waits_for_the_person(ann, ann_keys):
    (key, _value), _other = ann_keys
    person_set_active(person=ann, active=False)
    ApiKey.objects.filter(pk=key.pk).update(status=Status.EXPIRED, suspended_for="",
                                            expires_at=WINDOW_END)

    assert keys_lifecycle(now=timezone.now()).unexpired == 0
    key.refresh_from_db()
    assert key.status == Status.EXPIRED

    person_set_active(person=ann, active=True)
    assert keys_lifecycle(now=timezone.now()).unexpired == 1


def test_a_key_that_expired_while_its_owner_was_away_comes_back_expired(ann, ann_keys):
    (key, _value), _other = ann_keys
    person_set_active(person=ann, active=False)
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(days=1))

    report = person_set_active(person=ann, active=True)

    assert (report.restored, report.expired) == (1, 1)
    key.refresh_from_db()
    assert (key.status, key.suspended_for) == (Status.EXPIRED, "")


def test_setting_the_state_a_person_already_has_changes_nothing(ann, ann_keys):
    report = person_set_active(person=ann, active=True)
    assert (report.changed, report.keys_moved) == (False, 0)
    assert list(AuditEvent.objects.values_list("action", flat=True)) == [Action.POOL_GENERATED]


def test_the_proxy_being_down_only_postpones_the_removal(ann, ann_keys, fake_proxy, settings):
    (key, value), _other = ann_keys
    settings.CLIPROXY_URL = "http://127.0.0.1:9"  # nothing listens there
    person_set_active(person=ann, active=False)
    assert keys_reconcile_quietly() is None
    key.refresh_from_db()
    assert (key.status, key.proxy_state) == (Status.SUSPENDED, State.REMOVAL_PENDING)
    assert value in fake_proxy.api_keys

    settings.CLIPROXY_URL = fake_proxy.url
    reconcile()
    assert value not in fake_proxy.api_keys


# --- who sees what --------------------------------------------------------------------------


def test_the_owner_and_staff_see_why_the_key_is_suspended(admin_client, ann, ann_keys):
    person_set_active(person=ann, active=False)
    (key, _value), _other = ann_keys

    row = render_to_string("pool/my_keys.html#key-row",
                           {"key": keys_with_usage(owner=ann).get(pk=key.pk)})
    assert "your account is deactivated; the key works again when staff reactivate it" in row
    assert "over your account" not in row

    page = admin_client.get("/admin/pool/apikey/", {"suspended_for__exact": "person_inactive"})
    text = page.content.decode()
    assert text.count('name="_selected_action"') == 2
    assert key.masked in text and "your account is deactivated" in text


def test_the_api_issues_no_key_to_a_deactivated_person(client, ann, fake_proxy, ann_keys):
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    raw = api_token_new()
    token = ApiToken(user=staff, name="automation")
    token.set_token(raw)
    token.save()
    person_set_active(person=ann, active=False)
    before = ApiKey.objects.filter(owner=ann).count()

    answer = client.post("/api/register-key", {"email": ann.email, "label": "x"},
                         content_type="application/json",
                         headers={"Authorization": f"Bearer {raw}"})

    assert answer.status_code == 409 and "deactivated" in answer.json()["error"]
    assert ApiKey.objects.filter(owner=ann).count() == before


# --- PostgreSQL: two staff members at once --------------------------------------------------


@pytest.mark.postgres
def test_a_reactivation_waits_for_a_deactivation_in_progress(transactional_db, ann):
    """The person's row lock orders the two: the keys end as the person ends (active), and
    neither change is lost to the other."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    keys = pool_keys_create(count=2)
    ApiKey.objects.filter(pk__in=[k.pk for k in keys]).update(
        status=Status.ACTIVE, owner=ann, value=None)
    deactivated, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def deactivate() -> None:
        try:
            with transaction.atomic():
                person_set_active(person=User.objects.get(pk=ann.pk), active=False)
                deactivated.set()
                release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    def reactivate() -> None:
        try:
            person_set_active(person=User.objects.get(pk=ann.pk), active=True)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    first = threading.Thread(target=deactivate)
    first.start()
    assert deactivated.wait(30)
    second = threading.Thread(target=reactivate)
    second.start()
    # The reactivation must be queued behind the deactivation's lock before that commits.
    deadline = time.monotonic() + 10
    while not _backends_waiting_on_a_lock() and time.monotonic() < deadline:
        time.sleep(0.05)
    waited = _backends_waiting_on_a_lock()
    release.set()
    first.join(30)
    second.join(30)

    assert errors == [] and waited == 1
    ann.refresh_from_db()
    assert ann.is_active
    assert set(ApiKey.objects.filter(owner=ann).values_list("status", flat=True)) == {"active"}
    assert list(AuditEvent.objects.filter(target_type="user").order_by("id").values_list(
        "action", flat=True)) == [Action.PERSON_DEACTIVATED, Action.PERSON_REACTIVATED]


def _backends_waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database()")
        return cursor.fetchone()[0]
