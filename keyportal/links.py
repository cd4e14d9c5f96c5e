"""The portal's own address and whom people ask, for what is written outside a request: the
sync's limit emails have no request to build an absolute URL from."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils.translation import gettext as _

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass(frozen=True)
class PortalAddress:
    base: str  # scheme://host[:port][/prefix], no trailing slash; "" when unknown
    guessed: bool  # True: from ALLOWED_HOSTS (PORTAL_BASE_URL unset); the system check says so


def portal_address() -> PortalAddress:
    """PORTAL_BASE_URL; unset, the first ALLOWED_HOSTS name people can reach (not a wildcard,
    not loopback: the defaults would send people to their own machine), with the scheme of
    PORTAL_HTTPS. Neither: unknown, and emails say whom to ask instead of linking."""
    configured = settings.PORTAL_BASE_URL.strip().rstrip("/")
    if configured:
        return PortalAddress(configured, guessed=False)
    for host in settings.ALLOWED_HOSTS:
        if host and host != "*" and not host.startswith(".") and host not in _LOOPBACK_HOSTS:
            scheme = "https" if settings.PORTAL_HTTPS else "http"
            return PortalAddress(f"{scheme}://{host}", guessed=True)
    return PortalAddress("", guessed=False)


def portal_url(name: str) -> str:
    """The absolute URL of the named route, or "" when the portal's address is unknown."""
    base = portal_address().base
    return f"{base}{reverse(name)}" if base else ""


def support_contact() -> str:
    """Whom people ask about their keys and limits: PORTAL_SUPPORT_CONTACT (an address, a chat
    channel, a URL; free text); unset, the addresses of the active staff (they set the limits),
    at most three; "" when there is no staff either (the caller says "the portal's staff")."""
    if settings.PORTAL_SUPPORT_CONTACT.strip():
        return settings.PORTAL_SUPPORT_CONTACT.strip()
    staff = (get_user_model().objects.filter(is_staff=True, is_active=True)
             .order_by("email").values_list("email", flat=True)[:3])
    return ", ".join(staff)


def where_to_look() -> list[str]:
    """The closing lines of an email to a person about their keys (limits, expiry), read far
    from the portal: where they see their keys, and whom they ask. In the active language."""
    url = portal_url("my-keys")
    contact = support_contact()
    return [
        _("Your keys, their usage and limits: %(url)s") % {"url": url} if url
        else _("Your keys, their usage and limits are on the portal's My keys page."),
        _("Questions, or a higher limit: ask %(contact)s.") % {"contact": contact} if contact
        else _("Questions, or a higher limit: ask the portal's staff."),
    ]
