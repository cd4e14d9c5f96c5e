"""The audit log: one row per change, written by the services; read-only in the admin."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from keyportal.models import AuditEvent

pytestmark = pytest.mark.django_db
Action = AuditEvent.Action
LIST = "/admin/keyportal/auditevent/"


def run(*args: str) -> None:
    call_command(*args, stdout=StringIO())


def test_generating_from_a_command_leaves_one_system_row(fake_proxy):
    run("generate_keys", "--count", "4")
    [event] = AuditEvent.objects.all()
    assert (event.action, event.actor_kind, event.actor) == (Action.POOL_GENERATED, "system", None)
    assert event.after == {"created": 4, "pushed": True, "proxy_keys": 4}


def test_generating_from_the_admin_names_the_staff_member_and_address(admin_client, admin_user, fake_proxy):
    admin_client.post("/admin/pool/apikey/generate/", {"count": "3"}, REMOTE_ADDR="10.1.2.3")
    [event] = AuditEvent.objects.all()
    assert event.actor == admin_user and event.actor_kind == "staff"
    assert event.ip == "10.1.2.3" and event.actor_label == admin_user.email


def test_a_failed_push_is_recorded_too(fake_proxy):
    fake_proxy.config_read_only = True
    with pytest.raises(CommandError, match="not pushed"):
        run("generate_keys", "--count", "2")
    [event] = AuditEvent.objects.all()
    assert event.after == {"created": 2, "pushed": False}
    assert "read-only" in event.detail


def test_reconcile_leaves_a_row_only_when_it_changed_something(fake_proxy):
    run("generate_keys", "--count", "2")
    run("reconcile_keys")
    assert not AuditEvent.objects.filter(action=Action.RECONCILE_RUN).exists()
    fake_proxy.api_keys = fake_proxy.api_keys[:1]
    run("reconcile_keys")
    [event] = AuditEvent.objects.filter(action=Action.RECONCILE_RUN)
    assert event.after["pushed"] == 1 and event.before == {"proxy_keys": 1}


def test_dry_run_leaves_no_row(fake_proxy):
    run("generate_keys", "--count", "2")
    fake_proxy.api_keys = fake_proxy.api_keys[:1]
    run("reconcile_keys", "--dry-run")
    assert not AuditEvent.objects.filter(action=Action.RECONCILE_RUN).exists()


def test_staff_read_and_search_the_log_but_cannot_change_it(admin_client, fake_proxy):
    run("generate_keys", "--count", "1")
    event = AuditEvent.objects.get()
    assert admin_client.get(LIST).status_code == 200
    assert "pool keys generated" in admin_client.get(LIST, {"q": "system"}).content.decode()
    assert admin_client.get(f"{LIST}add/").status_code == 403
    assert admin_client.post(f"{LIST}{event.pk}/delete/", {"post": "yes"}).status_code == 403
    admin_client.post(f"{LIST}{event.pk}/change/", {"detail": "rewritten"})
    event.refresh_from_db()
    assert event.detail == ""
    page = admin_client.get(f"{LIST}{event.pk}/change/").content.decode()
    assert 'name="detail"' not in page  # shown, not editable


# --- self-service actions -------------------------------------------------------------------


def _ready_key() -> None:
    from pool.services import pool_keys_create
    from pool.models import ApiKey

    keys = pool_keys_create(count=2)
    ApiKey.objects.filter(pk__in=[k.pk for k in keys]).update(proxy_state=ApiKey.ProxyState.PUSHED)


def test_registration_leaves_a_sign_in_and_a_key_issued_row(client):
    from tests.accounts.mailbox import emailed_path

    _ready_key()
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    assert not AuditEvent.objects.exists()  # asking for a link changes nothing yet
    client.post(emailed_path(), REMOTE_ADDR="10.9.8.7")
    events = {e.action: e for e in AuditEvent.objects.all()}
    assert set(events) == {Action.SIGN_IN, Action.KEY_ISSUED}
    issued = events[Action.KEY_ISSUED]
    assert issued.actor_label == "new@example.com" and issued.actor_kind == "person"
    assert issued.ip == "10.9.8.7" and issued.after == {"owner": "new@example.com", "label": "laptop"}
    assert issued.target_label.startswith("sk-kp-…")


def test_sign_in_by_link_leaves_one_row(client, ann):
    from tests.accounts.mailbox import emailed_path

    client.post("/login", {"email": "ann@example.com"})
    client.post(emailed_path())
    [event] = AuditEvent.objects.all()
    assert (event.action, event.actor) == (Action.SIGN_IN, ann)
    assert event.after == {"method": "link"}


def test_revoking_leaves_one_row_and_a_second_revoke_none(client, ann):
    _ready_key()
    client.force_login(ann)
    client.post("/my-keys/add", {"label": "x"})
    key = ann.api_keys.get()
    client.post(f"/my-keys/{key.pk}/revoke")
    client.post(f"/my-keys/{key.pk}/revoke")
    [event] = AuditEvent.objects.filter(action=Action.KEY_REVOKED)
    assert event.before == {"status": "active"} and event.after == {"status": "revoked"}
    assert event.actor == ann


def test_api_tokens_created_and_revoked_in_the_admin_leave_rows(admin_client, admin_user):
    from accounts.models import ApiToken

    admin_client.post("/admin/accounts/apitoken/add/", {"user": admin_user.pk, "name": "ci"})
    token = ApiToken.objects.get()
    admin_client.post("/admin/accounts/apitoken/", {
        "action": "revoke_tokens", "_selected_action": [token.pk]})
    admin_client.post("/admin/accounts/apitoken/", {
        "action": "revoke_tokens", "_selected_action": [token.pk]})
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions == [Action.TOKEN_CREATED, Action.TOKEN_REVOKED]


def test_a_staff_password_sign_in_to_the_admin_leaves_one_row(client):
    from accounts.models import User

    boss = User.objects.create_superuser("boss@example.com", "a-long-password-1")
    client.post("/admin/login/?next=/admin/", {"username": "boss@example.com",
                                                "password": "wrong-password"})
    assert not AuditEvent.objects.exists()
    response = client.post("/admin/login/?next=/admin/", {
        "username": "boss@example.com", "password": "a-long-password-1"}, REMOTE_ADDR="10.0.0.5")
    assert response.status_code == 302
    [event] = AuditEvent.objects.all()
    assert (event.action, event.actor, event.ip) == (Action.SIGN_IN, boss, "10.0.0.5")
    assert event.detail == "admin password"
    assert event.after == {"method": "password"}
