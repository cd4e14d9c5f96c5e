"""What the clock decides: expiry, expiry warnings, keys coming back when a limit's window
resets or staff extend an expiry; and staff alerts by email and webhook."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone as tz

import pytest
import responses
from django.core import mail

from accounts.models import LimitDefaults
from keyportal.models import AuditEvent
from keyportal.notify import deliver_due, staff_alert
from pool.models import ApiKey
from pool.services import key_assign, keys_lifecycle

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=tz.utc)


@pytest.fixture
def key(ann, make_ready_keys) -> ApiKey:
    make_ready_keys(1)
    return key_assign(user=ann, label="laptop").key


def test_a_key_expires_at_its_time_and_not_before(key):
    ApiKey.objects.filter(pk=key.pk).update(expires_at=NOW)
    assert keys_lifecycle(now=NOW - timedelta(seconds=1)).expired == 0
    assert keys_lifecycle(now=NOW).expired == 1
    key.refresh_from_db()
    assert (key.status, key.proxy_state) == (Status.EXPIRED, State.REMOVAL_PENDING)
    assert keys_lifecycle(now=NOW).expired == 0
    [event] = AuditEvent.objects.filter(action=AuditEvent.Action.KEY_EXPIRED)
    assert event.actor_kind == "system" and event.after == {"status": "expired"}


def test_extending_an_expired_key_brings_it_back(key):
    ApiKey.objects.filter(pk=key.pk).update(status=Status.EXPIRED, expires_at=NOW - timedelta(days=1))
    assert keys_lifecycle(now=NOW).unexpired == 0
    ApiKey.objects.filter(pk=key.pk).update(expires_at=NOW + timedelta(days=30))
    assert keys_lifecycle(now=NOW).unexpired == 1
    key.refresh_from_db()
    assert key.status == Status.ACTIVE


def test_a_suspended_key_returns_when_its_window_resets(key):
    until = NOW + timedelta(hours=3)
    ApiKey.objects.filter(pk=key.pk).update(
        status=Status.SUSPENDED, suspended_for="key_tokens_day", suspended_until=until)
    assert keys_lifecycle(now=until - timedelta(seconds=1)).restored == 0
    assert keys_lifecycle(now=until).restored == 1
    key.refresh_from_db()
    assert (key.status, key.suspended_for, key.suspended_until) == (Status.ACTIVE, "", None)
    [event] = AuditEvent.objects.filter(action=AuditEvent.Action.KEY_RESTORED)
    assert "window reset" in event.detail


def test_a_key_suspended_by_staff_stays_suspended(key):
    ApiKey.objects.filter(pk=key.pk).update(
        status=Status.SUSPENDED, suspended_for="staff", suspended_until=NOW - timedelta(days=1))
    assert keys_lifecycle(now=NOW).restored == 0


def test_owners_are_warned_once_before_a_key_expires(key, ann, settings):
    settings.PORTAL_EXPIRY_WARNING_DAYS = 7
    ApiKey.objects.filter(pk=key.pk).update(expires_at=NOW + timedelta(days=8))
    assert keys_lifecycle(now=NOW).warned == 0
    later = NOW + timedelta(days=2)
    assert keys_lifecycle(now=later).warned == 1
    assert keys_lifecycle(now=later + timedelta(hours=1)).warned == 0
    [message] = mail.outbox
    assert message.to == [ann.email] and key.masked in message.body and "2026-11-30" in message.body
    assert key.last4 in message.subject and "sk-kp-" in message.subject
    # The link to the keys page and whom to ask, as in limit emails.
    assert "https://keys.example.com/my-keys" in message.body
    assert "ask the portal's staff." in message.body


def test_new_keys_get_the_default_lifetime(ann, make_ready_keys):
    LimitDefaults.objects.create(id=1, key_valid_days=90)
    make_ready_keys(1)
    issued = key_assign(user=ann, label="x")
    assert issued.key.expires_at is not None
    assert timedelta(days=89) < issued.key.expires_at - issued.key.issued_at <= timedelta(days=90)


def test_without_a_default_lifetime_keys_do_not_expire(ann, make_ready_keys):
    make_ready_keys(1)
    assert key_assign(user=ann, label="x").key.expires_at is None


def test_staff_alerts_go_by_email_and_webhook(admin_user, settings):
    settings.PORTAL_STAFF_WEBHOOK_URL = "http://127.0.0.1:9/hook"
    with responses.RequestsMock() as rsps:
        hook = rsps.post("http://127.0.0.1:9/hook", json={})
        assert staff_alert(event="pool_empty", subject="Pool empty", body="refill it",
                           data={"unused": 0})
        assert not hook.calls  # queued in the outbox, sent by a worker (keyportal.notify)
        assert deliver_due().sent == 1
        payload = json.loads(hook.calls[0].request.body)
    assert payload["event"] == "pool_empty" and payload["data"] == {"unused": 0}
    assert mail.outbox[0].to == [admin_user.email]


def test_a_failing_webhook_does_not_stop_the_email(admin_user, settings):
    settings.PORTAL_STAFF_WEBHOOK_URL = "http://127.0.0.1:9/hook"
    with responses.RequestsMock() as rsps:
        rsps.post("http://127.0.0.1:9/hook", status=500)
        assert staff_alert(event="x", subject="s", body="b")
        assert deliver_due().retrying == 1
    assert len(mail.outbox) == 1


def test_the_owner_sees_why_a_key_is_suspended_and_when_it_returns(client, ann, key):
    ApiKey.objects.filter(pk=key.pk).update(
        status=Status.SUSPENDED, suspended_for="person_cost_day",
        suspended_until=datetime(2026, 11, 23, 0, 0, tzinfo=tz.utc))
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    assert "over your daily cost limit" in page
    assert 'datetime="2026-11-23T00:00:00+00:00"' in page and "back on its own" in page


def test_the_owner_sees_when_a_key_expires(client, ann, key):
    ApiKey.objects.filter(pk=key.pk).update(expires_at=datetime(2027, 1, 5, 9, 30, tzinfo=tz.utc))
    client.force_login(ann)
    assert 'expires <time datetime="2027-01-05T09:30:00+00:00"' in client.get("/my-keys").content.decode()
