"""Suspended and expired keys leave the proxy and come back on their own: reconcile keeps
their value encrypted while they are away, and the database never holds one in clear."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from pool.escrow import EscrowUnreadable, escrow_open, escrow_seal
from pool.models import ApiKey, key_digest

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState


def reconcile() -> str:
    out = StringIO()
    call_command("reconcile_keys", stdout=out)
    return out.getvalue()


def database_holds(value: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM pool_apikey WHERE value = %s OR escrow LIKE %s",
                       [value, f"%{value}%"])
        return cursor.fetchone()[0] > 0


PAST, FUTURE = timezone.now() - timedelta(hours=1), timezone.now() + timedelta(days=30)


@pytest.mark.parametrize(
    "away, back",
    [
        ({"status": Status.SUSPENDED, "suspended_for": "key_tokens_day"}, {"suspended_until": PAST}),
        ({"status": Status.SUSPENDED, "suspended_for": "staff"}, {"status": Status.ACTIVE}),
        ({"status": Status.EXPIRED, "expires_at": PAST}, {"expires_at": FUTURE}),
    ],
    ids=["limit-window-resets", "staff-resume", "expiry-extended"],
)
def test_a_key_taken_off_the_proxy_comes_back_on_its_own(
    fake_proxy, live_key, proxy_accepts, away, back
):
    key, value = live_key
    ApiKey.objects.filter(pk=key.pk).update(proxy_state=State.REMOVAL_PENDING, **away)

    reconcile()

    key.refresh_from_db()
    assert value not in fake_proxy.api_keys and not proxy_accepts(value)
    assert key.proxy_state == State.REMOVED and key.escrow
    assert not database_holds(value)
    assert escrow_open(key.escrow) == value

    assert "No change." in reconcile()  # still away: nothing brings it back early
    ApiKey.objects.filter(pk=key.pk).update(**back)
    out = reconcile()

    key.refresh_from_db()
    assert key.status == Status.ACTIVE
    assert "1 suspended or expired keys back at the proxy" in out
    assert value in fake_proxy.api_keys and proxy_accepts(value)
    assert (key.proxy_state, key.escrow) == (State.PUSHED, None)
    assert fake_proxy.api_keys[0] == "operator-own-key"
    assert "No change." in reconcile()


def test_revoking_a_suspended_key_drops_its_escrow(live_key, client, ann):
    key, _value = live_key
    ApiKey.objects.filter(pk=key.pk).update(status=Status.SUSPENDED, proxy_state=State.REMOVAL_PENDING)
    reconcile()
    client.force_login(ann)
    client.post(f"/my-keys/{key.pk}/revoke")
    key.refresh_from_db()
    assert key.status == Status.REVOKED and key.escrow is None


def test_an_unreadable_escrow_makes_the_key_missing(live_key, settings, fake_proxy):
    key, value = live_key
    ApiKey.objects.filter(pk=key.pk).update(status=Status.SUSPENDED, proxy_state=State.REMOVAL_PENDING)
    reconcile()
    settings.SECRET_KEY = "rotated-" + settings.SECRET_KEY  # the derived escrow key changes
    ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE)

    out = reconcile()

    key.refresh_from_db()
    assert key.proxy_state == State.MISSING and value not in fake_proxy.api_keys
    assert "1 issued keys found missing" in out


def test_escrow_with_a_configured_key_and_a_wrong_one(settings):
    from cryptography.fernet import Fernet

    settings.PORTAL_ESCROW_KEY = Fernet.generate_key().decode()
    sealed = escrow_seal("sk-kp-secret")
    assert "sk-kp-secret" not in sealed and escrow_open(sealed) == "sk-kp-secret"
    settings.PORTAL_ESCROW_KEY = Fernet.generate_key().decode()
    with pytest.raises(EscrowUnreadable):
        escrow_open(sealed)


def test_the_database_refuses_an_escrow_on_a_pool_or_revoked_key(live_key):
    key, _value = live_key
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiKey.objects.filter(pk=key.pk).update(status=Status.REVOKED, escrow="x")
    pool_key = ApiKey.objects.filter(status=Status.POOL).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiKey.objects.filter(pk=pool_key.pk).update(escrow="x")


def test_escrow_is_written_before_the_key_leaves_the_proxy(live_key, fake_proxy):
    """If the PUT fails, the key is still at the proxy and its escrow already safe."""
    key, value = live_key
    ApiKey.objects.filter(pk=key.pk).update(status=Status.SUSPENDED, proxy_state=State.REMOVAL_PENDING)
    fake_proxy.config_read_only = True
    with pytest.raises(CommandError, match="failed to save config"):
        reconcile()
    key.refresh_from_db()
    assert value in fake_proxy.api_keys
    assert escrow_open(key.escrow) == value and key.proxy_state == State.REMOVAL_PENDING
    assert key_digest(value) == key.key_hash
