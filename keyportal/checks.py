"""System checks: every missing or wrong setting named in plain words at start-up
(`manage.py check`, and before migrate/runserver)."""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def proxy_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    problems: list[Any] = []
    url = settings.CLIPROXY_URL
    if not (url or settings.CRS_URL or settings.CCH_URL):
        # Staff may still add upstreams in the admin (a check never reads the database: it
        # runs before migrate), so a warning, not an error.
        problems.append(
            Warning(
                "No upstream is set in the environment (CLIPROXY_URL, CRS_URL or CCH_URL): the "
                "portal runs, but it cannot hand out keys or read usage until staff add an "
                "upstream in the admin.",
                hint="Set CLIPROXY_URL (e.g. http://127.0.0.1:8317), or CRS_URL with "
                     "CRS_ADMIN_USERNAME and CRS_ADMIN_PASSWORD, or CCH_URL with CCH_ADMIN_TOKEN.",
                id="keyportal.W001",
            )
        )
    problems.extend(_relay_settings())
    problems.extend(_public_urls())
    if url and _bad_url(url):
        problems.append(
            Error(
                f"CLIPROXY_URL must be an http(s) URL such as http://127.0.0.1:8317, not {url!r}.",
                id="keyportal.E001",
            )
        )
    if url and not settings.CLIPROXY_MANAGEMENT_KEY:
        problems.append(
            Warning(
                "CLIPROXY_MANAGEMENT_KEY is not set: every call to the proxy's management API "
                "will be refused.",
                hint="Set it to the proxy's remote-management secret-key.",
                id="keyportal.W002",
            )
        )
    if settings.CLIPROXY_TIMEOUT <= 0:
        problems.append(Error("CLIPROXY_TIMEOUT must be a positive number of seconds.", id="keyportal.E002"))
    if settings.PORTAL_REQUEST_PROXY_BUDGET <= 0:
        problems.append(Error("PORTAL_REQUEST_PROXY_BUDGET must be a positive number of seconds.",
                              id="keyportal.E006"))
    if not 0 < settings.PORTAL_RECONCILE_MAX_LOSS < 1:
        problems.append(Error("PORTAL_RECONCILE_MAX_LOSS must be a share between 0 and 1, "
                              "e.g. 0.5.", id="keyportal.E007"))
    prefix = settings.PORTAL_KEY_PREFIX
    if not prefix:
        problems.append(
            Warning(
                "PORTAL_KEY_PREFIX is empty: the portal's keys will not be recognisable.",
                id="keyportal.W003",
            )
        )
    if prefix.lower().startswith("your-api-key"):
        problems.append(
            Error(
                "PORTAL_KEY_PREFIX looks like the proxy's config template; the proxy refuses all "
                "traffic while such keys are configured.",
                id="keyportal.E003",
            )
        )
    if settings.PORTAL_ESCROW_KEY:
        from cryptography.fernet import Fernet

        try:
            Fernet(settings.PORTAL_ESCROW_KEY.encode())
        except ValueError:
            problems.append(
                Error(
                    "PORTAL_ESCROW_KEY is not a Fernet key (32 url-safe base64-encoded bytes).",
                    hint="Generate one with Fernet.generate_key(), or leave it empty.",
                    id="keyportal.E005",
                )
            )
    if settings.PORTAL_POOL_MIN < 0:
        problems.append(Error("PORTAL_POOL_MIN cannot be negative.", id="keyportal.E004"))
    return problems


def _bad_url(url: str) -> bool:
    parts = urlparse(url)
    return parts.scheme not in ("http", "https") or not parts.netloc


def is_loopback(url: str) -> bool:
    """Whether `url` points at this machine only (localhost, 127.0.0.0/8, ::1)."""
    host = (urlparse(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_urls() -> list[Any]:
    """The address people paste into their tools is each upstream's public URL, which
    defaults to its management URL: a loopback one there means every snippet handed out works
    only on the portal's own machine, and nothing else would say so."""
    problems: list[Any] = []
    for prefix, url, public in (
        ("CLIPROXY", settings.CLIPROXY_URL, settings.CLIPROXY_PUBLIC_URL),
        ("CRS", settings.CRS_URL, settings.CRS_PUBLIC_URL),
        ("CCH", settings.CCH_URL, settings.CCH_PUBLIC_URL),
    ):
        given = public or url
        if url and not _bad_url(given) and is_loopback(given):
            unset = "" if public and public != url else f" ({prefix}_PUBLIC_URL is not set)"
            problems.append(Warning(
                f"People's tools are given {given}{unset}, a loopback address: the settings "
                "they copy work only on this machine.",
                # A check runs before migrate and never reads the database, so it cannot see
                # a public URL staff typed in the admin: the hint says so, and the admin
                # index's getting-started checklist judges the value in use.
                hint=f"Set {prefix}_PUBLIC_URL to the address their tools reach, e.g. "
                     "https://relay.example.com, or set the upstream's public URL in the admin "
                     "(Upstreams; this check cannot see that one: the admin index's "
                     "getting-started checklist does).",
                id="keyportal.W008",
            ))
    return problems


def _relay_settings() -> list[Any]:
    """claude-relay-service and Claude Code Hub declared in the environment: an address
    without its credentials (or the reverse) would fail at every call, so say it at start."""
    problems: list[Any] = []
    declared = (
        ("CRS", settings.CRS_URL,
         {"CRS_ADMIN_USERNAME": settings.CRS_ADMIN_USERNAME,
          "CRS_ADMIN_PASSWORD": settings.CRS_ADMIN_PASSWORD}, "E008", "W006"),
        ("CCH", settings.CCH_URL, {"CCH_ADMIN_TOKEN": settings.CCH_ADMIN_TOKEN}, "E009", "W007"),
    )
    for prefix, url, credentials, bad_id, missing_id in declared:
        missing = [name for name, value in credentials.items() if not value]
        if url and _bad_url(url):
            problems.append(Error(
                f"{prefix}_URL must be an http(s) URL such as http://127.0.0.1:3000, not {url!r}.",
                id=f"keyportal.{bad_id}",
            ))
        if url and missing:
            problems.append(Warning(
                f"{prefix}_URL is set but {' and '.join(missing)} is not: every call to its "
                "admin API will be refused.",
                hint=f"Set {' and '.join(missing)}, or unset {prefix}_URL.",
                id=f"keyportal.{missing_id}",
            ))
        elif not url and len(missing) < len(credentials):
            problems.append(Warning(
                f"{' / '.join(n for n in credentials if n not in missing)} is set but "
                f"{prefix}_URL is not: that upstream is not used.",
                hint=f"Set {prefix}_URL to its address.",
                id=f"keyportal.{missing_id}",
            ))
    if settings.UPSTREAM_TIMEOUT <= 0:
        problems.append(Error("UPSTREAM_TIMEOUT must be a positive number of seconds.",
                              id="keyportal.E010"))
    return problems


FILE_BACKEND = "django.core.mail.backends.filebased.EmailBackend"


@register()
def email_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """django-environ reads `filemail:///var/mail/kp` as the relative path var/mail/kp (and
    `filemail://var/mail/kp` as just `mail`): links would land in a folder below wherever the
    portal happened to start. An absolute path needs four slashes."""
    if getattr(settings, "EMAIL_BACKEND", "") != FILE_BACKEND:
        return []
    path = str(getattr(settings, "EMAIL_FILE_PATH", "") or "")
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute():
        return []
    return [
        Warning(
            f"EMAIL_URL names a file-based email backend with a relative folder ({path!r}): "
            "emails would be written below the directory the portal was started from.",
            hint="Give an absolute folder with four slashes: filemail:////var/mail/keyportal",
            id="keyportal.W004",
        )
    ]


@register()
def sqlite_file_mode(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """A SQLite file that group or others may read hands them the sessions, password hashes
    and escrowed keys in it (the portal creates its file 0600; an older one may be 0644)."""
    from keyportal.sqlite_file import exposed_files, sqlite_files

    problems: list[Any] = []
    for alias, path in sqlite_files(settings.DATABASES):
        exposed = exposed_files(path)
        if exposed:
            problems.append(Warning(
                f"The SQLite database file {str(path)!r} ({alias}) can be read or written by "
                "users other than its owner: it holds sessions, password hashes and escrowed "
                "keys.",
                hint="chmod 600 " + " ".join(str(p) for p in exposed),
                id="keyportal.W005",
            ))
    return problems


@register()
def portal_address_setting(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Limit emails link to the portal: without PORTAL_BASE_URL the link is a guess (or
    missing), which nothing else would say."""
    from keyportal.links import portal_address

    if settings.PORTAL_BASE_URL.strip():
        if _bad_url(settings.PORTAL_BASE_URL.strip()):
            return [Error("PORTAL_BASE_URL must be a full http(s) address, e.g. "
                          "https://keys.example.com.", id="keyportal.E030")]
        return []
    address = portal_address()
    found = (f"they link to {address.base}, guessed from ALLOWED_HOSTS" if address.base
             else "they carry no link (ALLOWED_HOSTS names no host people can reach)")
    return [Warning(
        f"PORTAL_BASE_URL is not set: limit emails cannot know the portal's address, so {found}.",
        hint="Set PORTAL_BASE_URL to the address people open the portal at, e.g. "
             "https://keys.example.com.",
        id="keyportal.W030",
    )]


@register()
def signin_methods(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """With the emailed link off, an identity provider is the only way in: without one, no
    person could sign in at all."""
    if getattr(settings, "PORTAL_EMAIL_LINK_SIGNIN", True):
        return []
    from accounts.ldap import ldap_enabled
    from accounts.oidc import signin_providers

    if signin_providers() or ldap_enabled():
        return []
    return [Error(
        "PORTAL_EMAIL_LINK_SIGNIN is off but no identity provider is on: nobody could sign in.",
        hint="Turn on a provider (PORTAL_OIDC_DISCOVERY_URL, PORTAL_DINGTALK_CLIENT_ID or "
             "PORTAL_FEISHU_APP_ID, PORTAL_LDAP_URL; docs/sign-in.md) or set PORTAL_EMAIL_LINK_SIGNIN=true.",
        id="keyportal.E018",
    )]
