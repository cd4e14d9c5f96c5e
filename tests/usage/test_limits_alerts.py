"""Staff alerts raised by the sync go through keyportal.notify: email and the webhook."""

from __future__ import annotations

import json

import pytest
import responses
from django.core import mail

from keyportal.notify import deliver_due
from pool.services import pool_keys_create
from tests.usage.conftest import sync
from usage.models import UnissuedKeyUsage

pytestmark = pytest.mark.django_db
HOOK = "http://127.0.0.1:9/hook"


def test_usage_on_an_unissued_key_reaches_the_webhook_masked(fake_proxy, settings):
    # No staff member to email: the webhook alone takes the alert.
    settings.PORTAL_STAFF_WEBHOOK_URL = HOOK
    [pool_key] = pool_keys_create(count=1)
    fake_proxy.add_usage(pool_key.value)
    with responses.RequestsMock() as rsps:
        rsps.add_passthru(fake_proxy.url)
        hook = rsps.post(HOOK, json={})
        sync()
        assert deliver_due().sent == 1
        [call] = hook.calls
    payload = json.loads(call.request.body)
    assert payload["event"] == "unissued_key_used"
    assert payload["data"] == {"keys": [pool_key.masked]}
    assert pool_key.value not in call.request.body.decode()
    assert UnissuedKeyUsage.objects.get().notified_at is not None
    assert not mail.outbox


def test_with_nobody_to_tell_the_alert_waits(fake_proxy, settings):
    settings.PORTAL_STAFF_WEBHOOK_URL = ""
    [pool_key] = pool_keys_create(count=1)
    fake_proxy.add_usage(pool_key.value)
    sync()
    assert UnissuedKeyUsage.objects.get().notified_at is None  # told once someone can be
