"""Staff may add an authenticator app (TOTP) to their password sign-in: once set up, the
admin, the staff pages and the staff API open only after a code from it."""

from __future__ import annotations

import base64
import re
import time

import pytest
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import User
from keyportal.models import AuditEvent
from tests.accounts.test_staff_signin import PASSWORD, sign_in_by_link, sign_in_by_password

pytestmark = pytest.mark.django_db
Action = AuditEvent.Action


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", PASSWORD)


@pytest.fixture
def device(boss) -> TOTPDevice:
    return TOTPDevice.objects.create(user=boss, name="authenticator", confirmed=True)


def code(device: TOTPDevice, *, steps_back: int = 0) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() - steps_back * device.step
    return f"{totp.token():0{device.digits}d}"


def wrong(device: TOTPDevice) -> str:
    return f"{(int(code(device)) + 1) % 10**6:06d}"


def test_with_a_device_the_password_alone_does_not_open_the_admin(client, boss, device):
    response = sign_in_by_password(client, boss.email)

    assert response.status_code == 302
    assert response["Location"] == "/admin/totp/?next=%2Fadmin%2F"
    for page in ("/admin/", "/staff/export", "/staff/leaderboard"):
        assert client.get(page)["Location"].startswith("/admin/login/"), page
    # The admin's login page sends the half-signed-in session on to the code, not a loop.
    assert client.get("/admin/login/?next=/admin/")["Location"].startswith("/admin/totp/")
    api = client.get("/api/all-users-stats")
    assert api.status_code == 403 and "authenticator" in api.json()["error"]


def test_the_right_code_opens_the_admin_and_is_audited(client, boss, device):
    sign_in_by_password(client, boss.email)

    response = client.post("/admin/totp/", {"code": code(device), "next": "/admin/"})

    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200
    assert client.get("/staff/export").status_code == 200
    row = AuditEvent.objects.filter(action=Action.SIGN_IN).first()
    assert row.detail == "admin password + authenticator code" and row.actor == boss
    assert row.after == {"method": "password+totp"}


def test_a_wrong_code_is_refused_with_a_sentence_and_audited(client, boss, device):
    sign_in_by_password(client, boss.email)

    response = client.post("/admin/totp/", {"code": wrong(device)})

    assert response.status_code == 400
    assert b"That code is not right" in response.content
    assert client.get("/admin/").status_code == 302
    assert AuditEvent.objects.filter(action=Action.TOTP_FAILED, target_id=str(boss.pk)).exists()


def test_a_wrong_code_after_the_right_password_is_not_audited_as_a_sign_in(client, boss, device):
    sign_in_by_password(client, boss.email)
    client.post("/admin/totp/", {"code": wrong(device)})

    assert not AuditEvent.objects.filter(action=Action.SIGN_IN).exists()
    pending = AuditEvent.objects.get(action=Action.PASSWORD_ACCEPTED)
    assert pending.actor == boss and pending.detail == "admin password; authenticator verify next"

    device.refresh_from_db()
    device.throttle_reset()  # django-otp's own throttle (1 s after a wrong code), not timed here
    client.post("/admin/totp/", {"code": code(device), "next": "/admin/"})
    assert AuditEvent.objects.filter(action=Action.SIGN_IN, actor=boss).count() == 1


def test_a_code_cannot_be_used_twice(client, boss, device):
    sign_in_by_password(client, boss.email)
    used = code(device)
    assert client.post("/admin/totp/", {"code": used})["Location"] == "/admin/"
    client.post("/logout")

    sign_in_by_password(client, boss.email)
    assert client.post("/admin/totp/", {"code": used}).status_code == 400


def test_wrong_codes_are_throttled_with_the_passwords(client, boss, device, settings):
    settings.PORTAL_ADMIN_LOGIN_FAILURES = 3
    sign_in_by_password(client, boss.email)
    for _ in range(3):
        assert client.post("/admin/totp/", {"code": wrong(device)}).status_code == 400

    refused = client.post("/admin/totp/", {"code": code(device)})

    assert refused.status_code == 429 and b"Too many failed sign-ins" in refused.content
    assert client.get("/admin/").status_code == 302


def test_next_never_leaves_the_site(client, boss, device):
    sign_in_by_password(client, boss.email)
    response = client.post("/admin/totp/", {"code": code(device), "next": "https://evil.test/"})
    assert response["Location"] == "/admin/"


def test_a_link_session_cannot_reach_the_totp_pages(client, boss, device):
    sign_in_by_link(client, boss.email)
    for page in ("/admin/totp/", "/admin/totp/setup/"):
        assert client.get(page)["Location"].startswith("/admin/login/"), page


def test_setting_up_an_app_then_it_is_asked_for(client, boss):
    sign_in_by_password(client, boss.email)
    assert client.get("/admin/").status_code == 200  # optional until set up
    page = client.get("/admin/totp/setup/")
    assert page.status_code == 200 and b"<svg" in page.content
    secret = re.search(r"<code>([A-Z2-7 ]+)</code>", page.content.decode()).group(1)
    pending = TOTPDevice.objects.get(user=boss, confirmed=False)
    assert base64.b32decode(secret.replace(" ", "") + "=" * (-len(secret.replace(" ", "")) % 8)) \
        == pending.bin_key

    assert client.post("/admin/totp/setup/", {"code": wrong(pending)}).status_code == 400
    too_soon = client.post("/admin/totp/setup/", {"code": code(pending)})
    assert too_soon.status_code == 400 and b"wait a few seconds" in too_soon.content
    time.sleep(1.1)  # django-otp's own throttle: 1 s after the first wrong code
    done = client.post("/admin/totp/setup/", {"code": code(pending), "next": "/admin/"})

    assert done.status_code == 302 and client.get("/admin/").status_code == 200
    assert TOTPDevice.objects.get(user=boss).confirmed
    assert AuditEvent.objects.filter(action=Action.TOTP_ENABLED, actor=boss).exists()
    client.post("/logout")
    assert sign_in_by_password(client, boss.email)["Location"].startswith("/admin/totp/")


def test_required_totp_sends_staff_without_one_to_set_it_up(client, boss, settings):
    settings.PORTAL_STAFF_TOTP_REQUIRED = True

    response = sign_in_by_password(client, boss.email)

    assert response["Location"].startswith("/admin/totp/setup/")
    assert client.get("/admin/").status_code == 302
    assert client.get(response["Location"]).status_code == 200
    pending = TOTPDevice.objects.get(user=boss, confirmed=False)
    # Not signed in until the app is set up and its first code is right.
    assert not AuditEvent.objects.filter(action=Action.SIGN_IN).exists()
    client.post("/admin/totp/setup/", {"code": code(pending)})
    assert client.get("/admin/").status_code == 200
    assert AuditEvent.objects.get(action=Action.SIGN_IN).detail == \
        "admin password + new authenticator code"
    # ...and it cannot be removed while required.
    client.post("/admin/totp/setup/", {"action": "remove"})
    assert TOTPDevice.objects.filter(user=boss, confirmed=True).exists()


def test_staff_remove_a_colleagues_app_which_ends_its_verified_sessions(client, boss, device):
    colleague = User.objects.create_superuser("ops@example.com", PASSWORD)
    sign_in_by_password(client, boss.email)
    client.post("/admin/totp/", {"code": code(device)})
    assert client.get("/admin/").status_code == 200

    from django.test import Client

    other = Client()
    sign_in_by_password(other, colleague.email)
    listing = other.get("/admin/accounts/authenticator/")
    assert listing.status_code == 200
    assert device.key not in listing.content.decode()
    change = other.get(f"/admin/accounts/authenticator/{device.pk}/change/")
    assert device.key not in change.content.decode() and b"qrcode" not in change.content
    assert other.get("/admin/accounts/authenticator/add/").status_code == 403
    removed = other.post(f"/admin/accounts/authenticator/{device.pk}/delete/", {"post": "yes"})
    assert removed.status_code == 302

    assert not TOTPDevice.objects.filter(user=boss).exists()
    row = AuditEvent.objects.get(action=Action.TOTP_DISABLED)
    assert row.actor == colleague and row.target_id == str(boss.pk)
    assert client.get("/admin/").status_code == 302  # boss's verified session is over


def test_removing_ones_own_app_keeps_the_session_and_drops_the_step(client, boss, device):
    sign_in_by_password(client, boss.email)
    client.post("/admin/totp/", {"code": code(device)})
    assert b"/admin/totp/setup/" in client.get("/admin/").content  # linked from the admin

    client.post("/admin/totp/setup/", {"action": "remove"})

    assert not TOTPDevice.objects.filter(user=boss).exists()
    assert client.get("/admin/").status_code == 200
    client.post("/logout")
    assert sign_in_by_password(client, boss.email)["Location"] == "/admin/"
