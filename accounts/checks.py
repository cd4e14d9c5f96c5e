"""System checks of the sign-in settings (`manage.py check`, and at every start)."""

from __future__ import annotations

import importlib.util
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register

from keyportal.checks import is_loopback


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
    if importlib.util.find_spec("ldap") is None or importlib.util.find_spec("django_auth_ldap") is None:
        return [Error(
            "PORTAL_LDAP_URL is set but the LDAP packages are not installed.",
            hint="Run `make ldap` (installs requirements-ldap.txt, and the headers python-ldap "
                 "builds against; docs/sign-in.md).",
            id="accounts.E002",
        )]
    if parts.scheme == "ldap" and not settings.PORTAL_LDAP_START_TLS and not is_loopback(url):
        # A simple bind carries the person's password as it is.
        return [Warning(
            "People's company passwords go to the LDAP directory unencrypted.",
            hint="Use an ldaps:// PORTAL_LDAP_URL or set PORTAL_LDAP_START_TLS=true "
                 "(docs/sign-in.md).",
            id="accounts.W001",
        )]
    return []
