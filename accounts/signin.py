"""How a session signed in. An emailed link proves only that someone reads the inbox, so a
session that came from one is a person's session: the admin, the /staff/ pages and the staff
API ask for a password sign-in first, even when the person is staff."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import login
from django.http import HttpRequest
from django.utils import translation

from accounts.models import User
from accounts.services import person_language_set

SIGNIN_METHOD_KEY = "keyportal_signin_method"
BY_LINK = "link"
BY_PASSWORD = "password"


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


def mark_password_signin(request: HttpRequest) -> None:
    """Marks the session as a password sign-in (the admin's), which opens the staff pages and
    the admin: it lasts PORTAL_STAFF_SESSION_SECONDS, not a person's SESSION_COOKIE_AGE."""
    request.session[SIGNIN_METHOD_KEY] = BY_PASSWORD
    request.session.set_expiry(settings.PORTAL_STAFF_SESSION_SECONDS)


def signed_in_by_link(request: HttpRequest) -> bool:
    session = getattr(request, "session", None)
    return session is not None and session.get(SIGNIN_METHOD_KEY) == BY_LINK


def staff_with_password(request: HttpRequest) -> bool:
    """Active staff whose session did not come from an emailed link."""
    user = request.user
    return bool(user.is_active and user.is_staff) and not signed_in_by_link(request)
