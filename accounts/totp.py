"""Authenticator-app codes (TOTP, RFC 6238) as a second step of the staff password sign-in,
through django-otp's TOTP devices: setting one up, checking a code, removing one."""

from __future__ import annotations

import base64

import segno
from django.conf import settings
from django.db import transaction
from django.http import HttpRequest
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import User
from accounts.ratelimit import ADMIN_FAILED_BY_ACCOUNT, rate_hit, rate_hits, rate_reset
from accounts.signin import TOTP_SETUP, totp_step, totp_step_done
from keyportal.audit import Action, audit_record, client_ip

DEVICE_NAME = "authenticator"


def totp_throttled(user: User) -> bool:
    """Wrong codes count with wrong passwords: six digits must not be guessable either."""
    return rate_hits(scope=ADMIN_FAILED_BY_ACCOUNT, ident=user.email) >= (
        settings.PORTAL_ADMIN_LOGIN_FAILURES
    )


def totp_device(user: User) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=True).order_by("id").first()


def totp_device_pending(user: User) -> TOTPDevice:
    """The device being set up: a fresh secret, shown once on the set-up page until a code
    from it confirms it."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("id").first()
    return device or TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=False)


def totp_qr_svg(device: TOTPDevice) -> str:
    """The otpauth:// URI as an SVG QR code, drawn here (no image service sees the secret)."""
    return segno.make(device.config_url, error="m").svg_inline(
        scale=4, dark="#000", light="#fff", omitsize=True,
        svgclass="totp-qr", lineclass=None,
    )


def totp_secret_text(device: TOTPDevice) -> str:
    """The secret in base32, in groups of four, for typing into an app by hand."""
    secret = base64.b32encode(device.bin_key).decode().rstrip("=")
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


class TotpWait(Exception):
    """The device refuses codes for a moment after a wrong one (django-otp's own throttle:
    1, 2, 4… seconds)."""


def _check(request: HttpRequest, device: TOTPDevice, code: str) -> bool:
    user = request.user
    code = "".join(code.split())
    with transaction.atomic():
        device = TOTPDevice.objects.select_for_update().get(pk=device.pk)
        allowed, _data = device.verify_is_allowed()
        ok = allowed and code.isdigit() and device.verify_token(code)
    if not allowed:
        # Counted outside the transaction: the cache lives in the database too.
        _failed(request)
        raise TotpWait
    if ok:
        rate_reset(scope=ADMIN_FAILED_BY_ACCOUNT, ident=user.email)
        return True
    _failed(request)
    return False


def _failed(request: HttpRequest) -> None:
    user = request.user
    rate_hit(scope=ADMIN_FAILED_BY_ACCOUNT, ident=user.email,
             window=settings.PORTAL_ADMIN_LOGIN_WINDOW_SECONDS)
    audit_record(action=Action.TOTP_FAILED, actor=user, target=user, ip=client_ip(request),
                 detail="wrong authenticator code")


def totp_verify(request: HttpRequest, code: str) -> bool:
    """The second step of a password sign-in. True: the session is now verified."""
    device = totp_device(request.user)
    if device is None or not _check(request, device, code):
        return False
    request.session.cycle_key()
    otp_login(request, device)
    totp_step_done(request)
    audit_record(action=Action.SIGN_IN, actor=request.user, target=request.user,
                 ip=client_ip(request), detail="admin password + authenticator code",
                 after={"method": "password+totp"})
    return True


def totp_confirm(request: HttpRequest, code: str) -> bool:
    """Finishes setting up: a right code from the new device turns it on (replacing an
    older one) and verifies this session with it."""
    user = request.user
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("id").first()
    if device is None or not _check(request, device, code):
        return False
    with transaction.atomic():
        replaced = TOTPDevice.objects.filter(user=user).exclude(pk=device.pk).delete()[0]
        TOTPDevice.objects.filter(pk=device.pk).update(confirmed=True)
    device.confirmed = True
    # Set up as the sign-in's own second step (the portal requires an app): only now is the
    # staff member signed in (the password step audited "password accepted").
    signing_in = totp_step(request) == TOTP_SETUP
    otp_login(request, device)
    totp_step_done(request)
    audit_record(action=Action.TOTP_ENABLED, actor=user, target=user, ip=client_ip(request),
                 after={"replaced": bool(replaced)})
    if signing_in:
        audit_record(action=Action.SIGN_IN, actor=user, target=user, ip=client_ip(request),
                     detail="admin password + new authenticator code",
                     after={"method": "password+totp"})
    return True


def totp_remove(*, user: User, by: User, ip: str | None) -> bool:
    """Removes `user`'s authenticator (a lost phone: staff reset it for a colleague)."""
    removed = TOTPDevice.objects.filter(user=user).delete()[0]
    if removed:
        audit_record(action=Action.TOTP_DISABLED, actor=by, target=user, ip=ip)
    return bool(removed)
