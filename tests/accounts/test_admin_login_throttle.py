"""The admin's password sign-in is throttled per client address and per account."""

from __future__ import annotations

import pytest

from accounts.models import User
from keyportal.models import AuditEvent

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-password-1"
Action = AuditEvent.Action


@pytest.fixture(autouse=True)
def _small_limit(settings) -> None:
    settings.PORTAL_ADMIN_LOGIN_FAILURES = 3
    settings.PORTAL_ADMIN_LOGIN_WINDOW_SECONDS = 900


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", PASSWORD)


def attempt(client, email: str, password: str, ip: str = "10.0.0.5"):
    return client.post("/admin/login/?next=/admin/", {"username": email, "password": password},
                       REMOTE_ADDR=ip)


def test_one_address_is_refused_after_the_limit_even_with_the_right_password(client, boss):
    for n in range(3):
        assert attempt(client, f"nobody{n}@example.com", "wrong").status_code == 200
    refused = attempt(client, boss.email, PASSWORD)
    assert refused.status_code == 429
    assert b"Too many failed sign-ins. Please wait 15 minutes" in refused.content
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/").status_code == 302
    # another address is not affected
    assert attempt(client, boss.email, PASSWORD, ip="10.0.0.6").status_code == 302


def test_one_account_is_refused_after_the_limit_from_any_address(client, boss):
    for n in range(3):
        assert attempt(client, "Boss@Example.com", "wrong", ip=f"10.0.1.{n}").status_code == 200
    assert attempt(client, boss.email, PASSWORD, ip="10.0.2.1").status_code == 429
    assert "_auth_user_id" not in client.session


def test_failures_below_the_limit_do_not_stop_the_right_password(client, boss):
    for _ in range(2):
        attempt(client, boss.email, "wrong")
    assert attempt(client, boss.email, PASSWORD).status_code == 302


def test_refusals_are_audited_once_per_address_and_account_per_window(client, boss):
    for _ in range(3):
        attempt(client, boss.email, "wrong")
    assert not AuditEvent.objects.exists()
    for _ in range(5):
        assert attempt(client, boss.email, "wrong").status_code == 429
    [event] = AuditEvent.objects.all()
    assert (event.action, event.ip, event.target_label) == (
        Action.ADMIN_LOGIN_THROTTLED, "10.0.0.5", "boss@example.com")
    assert event.actor is None and event.target_id == str(boss.pk)
    assert PASSWORD not in str(AuditEvent.objects.values().get())


def test_the_window_ends_and_the_counts_live_in_the_shared_cache(client, boss):
    from django.core.cache import cache

    for _ in range(3):
        attempt(client, boss.email, "wrong")
    assert attempt(client, boss.email, PASSWORD).status_code == 429
    cache.clear()  # what the window's end does
    assert attempt(client, boss.email, PASSWORD).status_code == 302
