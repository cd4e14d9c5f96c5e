"""Fixed-window counters in the shared cache, so every portal process counts the same hits."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.cache import cache

from accounts.models import mailbox_email


def _key(scope: str, ident: str) -> str:
    # The identity is hashed: cache keys never hold an address in clear.
    digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
    return f"rate:{scope}:{digest}"


# Wrong admin passwords and wrong authenticator codes, counted together (admin_site, totp).
ADMIN_FAILED_BY_IP = "admin-login-failed:ip"
ADMIN_FAILED_BY_ACCOUNT = "admin-login-failed:account"


def rate_hit(*, scope: str, ident: str, window: int) -> int:
    """Counts one hit for `ident` in `scope`; the hits in the current window, this one
    included."""
    key = _key(scope, ident)
    # add() starts the window only if none is running; incr() then counts. On the database
    # cache incr is a read and a write, so two processes may both count one less now and then:
    # a limit a few hits loose, never a person locked out wrongly.
    if cache.add(key, 1, timeout=window):
        return 1
    try:
        return cache.incr(key)
    except ValueError:  # the window ended between add() and incr()
        cache.add(key, 1, timeout=window)
        return 1


def rate_hits(*, scope: str, ident: str) -> int:
    """The hits counted for `ident` in `scope`'s current window, counting none."""
    return cache.get(_key(scope, ident), 0)


def rate_reset(*, scope: str, ident: str) -> None:
    cache.delete(_key(scope, ident))


def rate_limited(*, scope: str, ident: str, limit: int, window: int) -> bool:
    """Counts one hit for `ident` in `scope`; True once more than `limit` hits fell in the
    current window."""
    return rate_hit(scope=scope, ident=ident, window=window) > limit


def link_requests_limited(*, form_name: str, ip: str | None, email: str) -> bool:
    """Counts one request for a sign-in or registration link; True when it is refused. The
    client address is counted first, and an address over its limit stops there: counting the
    email too would let one address spend a victim's email budget and lock them out. (An
    email over its limit still spends the address's budget: an address asking too often for
    anything should run out.)"""
    window = settings.PORTAL_RATE_WINDOW_SECONDS
    if rate_limited(
        scope=f"{form_name}:ip", ident=ip or "", limit=settings.PORTAL_RATE_PER_IP, window=window
    ):
        return True
    # Per mailbox: links for ann+1@, ann+2@ ... all land in ann@'s inbox.
    return rate_limited(
        scope=f"{form_name}:email", ident=mailbox_email(email), limit=settings.PORTAL_RATE_PER_EMAIL,
        window=window,
    )


# The company-account (LDAP) form on /login: every attempt counts per client address, as on
# the link forms; per username only the refused passwords count, so that a person signing in
# again and again is never stopped, while guessing stops well before the directory's own
# lockout (Active Directory locks the account itself after a few wrong passwords).
LDAP_BY_IP = "ldap-login:ip"
LDAP_FAILED_BY_USERNAME = "ldap-login-failed:username"


def ldap_attempt_limited(*, ip: str | None, username: str) -> bool:
    """Counts one attempt; True when this address, or this username's wrong passwords, are over
    their limits in the current window (then the directory is not asked)."""
    window = settings.PORTAL_RATE_WINDOW_SECONDS
    if rate_limited(scope=LDAP_BY_IP, ident=ip or "", limit=settings.PORTAL_RATE_PER_IP,
                    window=window):
        return True
    return rate_hits(scope=LDAP_FAILED_BY_USERNAME, ident=username.strip().lower()) >= (
        settings.PORTAL_RATE_PER_EMAIL
    )


def ldap_failure_count(*, username: str) -> None:
    rate_hit(scope=LDAP_FAILED_BY_USERNAME, ident=username.strip().lower(),
             window=settings.PORTAL_RATE_WINDOW_SECONDS)
