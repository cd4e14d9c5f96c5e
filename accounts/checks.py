"""System checks of the sign-in settings (`manage.py check`, and at every start)."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@register()
def ldap_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    url = settings.PORTAL_LDAP_URL
    if not url:
        return []
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        return [Error(
            f"PORTAL_LDAP_URL must be ldap://host[:port] or ldaps://host[:port], not {url!r}.",
            id="accounts.E001",
        )]
    if parts.scheme == "ldap" and not settings.PORTAL_LDAP_START_TLS and not _loopback(
        parts.hostname.lower()
    ):
        # A simple bind carries the person's password as it is.
        return [Warning(
            "People's company passwords go to the LDAP directory unencrypted.",
            hint="Use an ldaps:// PORTAL_LDAP_URL or set PORTAL_LDAP_START_TLS=true "
                 "(docs/sign-in.md).",
            id="accounts.W001",
        )]
    return []
