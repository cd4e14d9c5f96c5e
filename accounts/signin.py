"""How a session signed in. An emailed link proves only that someone reads the inbox, so a
session that came from one is a person's session: the admin, the /staff/ pages and the staff
API ask for a password sign-in first, even when the person is staff. A sign-in through the
company's identity provider (accounts/oidc.py) is a person's session too: the portal does not
know what the provider asked for (a second factor or not), unless the operator says so with
PORTAL_PROVIDER_OPENS_ADMIN (for providers that enforce MFA)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import login
from django.http import HttpRequest
from django.utils import translation
from django_otp import user_has_device

from accounts.models import User
from accounts.services import person_language_set

SIGNIN_METHOD_KEY = "keyportal_signin_method"
BY_LINK = "link"
BY_PASSWORD = "password"
# A sign-in through an identity provider stores its method ("oidc", later "dingtalk", ...).
BY_PROVIDER_PREFIX = "provider:"
# After the password, what the session still owes before the admin opens: a code from the
# authenticator app ("verify"), or setting one up when PORTAL_STAFF_TOTP_REQUIRED ("setup").
TOTP_STEP_KEY = "keyportal_totp_step"
TOTP_VERIFY = "verify"
TOTP_SETUP = "setup"
# Set once a code was given: from then on the session needs its device to still exist.
TOTP_VERIFIED_KEY = "keyportal_totp_verified"


def link_login(request: HttpRequest, user: User) -> None:
    """Signs `user` in after they used an emailed link, and marks the session as such."""
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    # login() keeps the session data when the same person was already signed in (it only
    # cycles the key): the mark must be written over, so it always says how they came last.
    request.session[SIGNIN_METHOD_KEY] = BY_LINK
    if not user.language:
        # Their first sign-in: the language the page was read in (the switch's cookie or the
        # browser's Accept-Language) is the one to email them in later.
        person_language_set(user=user, language=translation.get_language())


def provider_login(request: HttpRequest, user: User, *, method: str) -> None:
    """Signs `user` in after their identity provider vouched for them: a person's session,
    marked with the method, which opens the admin and the staff pages for staff only with
    PORTAL_PROVIDER_OPENS_ADMIN."""
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    request.session[SIGNIN_METHOD_KEY] = BY_PROVIDER_PREFIX + method
    if settings.PORTAL_PROVIDER_OPENS_ADMIN and user.is_staff:
        # This session opens the admin (staff_with_password): it lasts a staff session.
        request.session.set_expiry(settings.PORTAL_STAFF_SESSION_SECONDS)
    if not user.language:
        person_language_set(user=user, language=translation.get_language())


def mark_password_signin(request: HttpRequest) -> None:
    """Marks the session as a password sign-in (the admin's), which opens the staff pages and
    the admin: it lasts PORTAL_STAFF_SESSION_SECONDS, not a person's SESSION_COOKIE_AGE."""
    request.session[SIGNIN_METHOD_KEY] = BY_PASSWORD
    request.session.set_expiry(settings.PORTAL_STAFF_SESSION_SECONDS)
    request.session.pop(TOTP_VERIFIED_KEY, None)
    step = totp_step_for(request.user)
    if step:
        request.session[TOTP_STEP_KEY] = step
    else:
        request.session.pop(TOTP_STEP_KEY, None)


def totp_step_for(user: User) -> str | None:
    if user_has_device(user, confirmed=True):
        return TOTP_VERIFY
    if settings.PORTAL_STAFF_TOTP_REQUIRED and user.is_staff:
        return TOTP_SETUP
    return None


def totp_step(request: HttpRequest) -> str | None:
    """The second step this password session still owes, if any."""
    session = getattr(request, "session", None)
    return session.get(TOTP_STEP_KEY) if session is not None else None


def totp_step_done(request: HttpRequest, *, verified: bool = True) -> None:
    request.session.pop(TOTP_STEP_KEY, None)
    if verified:
        request.session[TOTP_VERIFIED_KEY] = True
    else:
        request.session.pop(TOTP_VERIFIED_KEY, None)


def password_signed_in_staff(request: HttpRequest) -> bool:
    """Active staff who gave their password in this session (a TOTP step may still be due)."""
    user = request.user
    return bool(user.is_active and user.is_staff) and (
        getattr(request, "session", None) is not None
        and request.session.get(SIGNIN_METHOD_KEY) == BY_PASSWORD
    )


def signed_in_by_link(request: HttpRequest) -> bool:
    session = getattr(request, "session", None)
    return session is not None and session.get(SIGNIN_METHOD_KEY) == BY_LINK


def signed_in_by_provider(request: HttpRequest) -> bool:
    session = getattr(request, "session", None)
    return session is not None and str(session.get(SIGNIN_METHOD_KEY, "")).startswith(
        BY_PROVIDER_PREFIX
    )


def staff_with_password(request: HttpRequest) -> bool:
    """Active staff whose session did not come from an emailed link or an identity provider and
    owes no TOTP step. A session verified with an authenticator whose device was removed since
    is refused too (django_otp's middleware finds no device for it)."""
    user = request.user
    if not (user.is_active and user.is_staff):
        return False
    if signed_in_by_link(request):
        return False
    if signed_in_by_provider(request):
        # PORTAL_PROVIDER_OPENS_ADMIN trusts the provider's own sign-in (and its MFA) in place
        # of the portal's password and authenticator app.
        return bool(settings.PORTAL_PROVIDER_OPENS_ADMIN)
    if totp_step(request):
        return False
    if request.session.get(TOTP_VERIFIED_KEY) and not user.is_verified():
        return False  # the device that verified this session was removed since
    return True
