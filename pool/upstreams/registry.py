"""Which upstreams the portal has, where each is, and its driver.

The environment may declare one upstream of each kind (CLIPROXY_*, CRS_*, CCH_*): each becomes
an `Upstream` row marked `from_environment`, made the first time it is needed, whose address and
credentials are read from the settings at every use (so changing the environment and
restarting is all it takes; nothing secret is stored). Staff add others in the admin, with the
secret sealed in the database.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet

from pool.models import ApiKey, Upstream

if TYPE_CHECKING:
    from accounts.models import User
    from pool.upstreams.base import Driver

Kind = Upstream.Kind

# The name an environment-declared upstream gets (staff may rename it).
ENV_NAMES = {
    Kind.CLIPROXYAPI: "CLIProxyAPI",
    Kind.CRS: "claude-relay-service",
    Kind.CCH: "Claude Code Hub",
}


@dataclass(frozen=True)
class Endpoint:
    """Where an upstream is and how the portal signs in there. Never logged: `secret` is the
    management key, admin password or admin token."""

    management_url: str
    public_url: str
    username: str
    secret: str

    def __repr__(self) -> str:  # no secret in tracebacks or logs
        return f"Endpoint({self.management_url!r})"


def _declared() -> dict[str, Endpoint]:
    """The upstreams the environment declares, by kind."""
    found: dict[str, Endpoint] = {}
    if settings.CLIPROXY_URL:
        found[Kind.CLIPROXYAPI] = Endpoint(
            settings.CLIPROXY_URL, settings.CLIPROXY_PUBLIC_URL or settings.CLIPROXY_URL,
            "", settings.CLIPROXY_MANAGEMENT_KEY,
        )
    if settings.CRS_URL:
        found[Kind.CRS] = Endpoint(
            settings.CRS_URL, settings.CRS_PUBLIC_URL or settings.CRS_URL,
            settings.CRS_ADMIN_USERNAME, settings.CRS_ADMIN_PASSWORD,
        )
    if settings.CCH_URL:
        found[Kind.CCH] = Endpoint(
            settings.CCH_URL, settings.CCH_PUBLIC_URL or settings.CCH_URL,
            "", settings.CCH_ADMIN_TOKEN,
        )
    return found


# The environment variable that sets each kind's public URL.
PUBLIC_URL_SETTINGS = {
    Kind.CLIPROXYAPI: "CLIPROXY_PUBLIC_URL",
    Kind.CRS: "CRS_PUBLIC_URL",
    Kind.CCH: "CCH_PUBLIC_URL",
}


def public_url_from_environment(kind: str) -> str:
    """The public URL the environment sets for `kind` ("" when unset): when set it wins over
    the one staff typed in the admin."""
    value = getattr(settings, PUBLIC_URL_SETTINGS.get(kind, ""), "") or ""
    if kind == Kind.CLIPROXYAPI and value == settings.CLIPROXY_URL.rstrip("/"):
        # keyportal.settings fills an unset CLIPROXY_PUBLIC_URL with CLIPROXY_URL: that is
        # no choice of anyone's (W008 reads it the same way).
        return ""
    return value


def endpoint(upstream: Upstream) -> Endpoint:
    """The upstream's address and credentials: from the settings for the environment's
    upstreams (empty when the environment no longer declares it), else from its row. An
    environment upstream's public URL may come from its row (staff set it in the admin, so
    that no shell step is needed) when the environment does not set one."""
    if upstream.from_environment:
        declared = _declared().get(upstream.kind)
        if declared is None:
            return Endpoint("", "", "", "")
        if upstream.public_url and not public_url_from_environment(upstream.kind):
            return replace(declared, public_url=upstream.public_url.rstrip("/"))
        return declared
    url = upstream.management_url.rstrip("/")
    return Endpoint(url, (upstream.public_url or url).rstrip("/"), upstream.username,
                    upstream.secret or "")


def environment_sync() -> None:
    """Makes the row of each upstream the environment declares (one query when they exist).
    A kind the environment no longer declares keeps its row (its keys keep their history)."""
    declared = _declared()
    if not declared:
        return
    have = set(Upstream.objects.filter(from_environment=True).values_list("kind", flat=True))
    for kind, where in declared.items():
        if kind in have:
            continue
        name = ENV_NAMES[kind]
        if Upstream.objects.filter(name=name).exists():
            name = f"{name} (environment)"
        try:
            with transaction.atomic():
                Upstream.objects.create(
                    name=name, kind=kind, management_url=where.management_url,
                    from_environment=True,
                )
        except IntegrityError:
            # Another process made it meanwhile, or staff already added a CLIProxyAPI in the
            # admin (one per portal): that one stands.
            pass


def upstreams(*, enabled_only: bool = True) -> QuerySet[Upstream]:
    """Every upstream the portal has (the environment's included), oldest first; the
    environment's ones count only while it still declares them."""
    environment_sync()
    declared = list(_declared())
    rows = Upstream.objects.filter(Q(from_environment=False) | Q(kind__in=declared))
    return rows.filter(enabled=True) if enabled_only else rows


def relays() -> list[Upstream]:
    """The enabled upstreams that make their own keys (all but CLIProxyAPI)."""
    return [u for u in upstreams() if not u.is_cliproxyapi]


def cliproxyapi() -> Upstream | None:
    """The portal's CLIProxyAPI (at most one), enabled or not."""
    return upstreams(enabled_only=False).filter(kind=Kind.CLIPROXYAPI).first()


def cliproxyapi_endpoint() -> Endpoint:
    """Where the CLIProxyAPI is: CLIPROXY_* when set (no database query), else the one staff
    added in the admin; empty fields when there is none."""
    if settings.CLIPROXY_URL:
        return _declared()[Kind.CLIPROXYAPI]
    row = Upstream.objects.filter(kind=Kind.CLIPROXYAPI, from_environment=False,
                                  enabled=True).first()
    return endpoint(row) if row else Endpoint("", "", "", "")


def cliproxyapi_in_use(*, rows: list[Upstream] | None = None) -> bool:
    """Whether the portal has a CLIProxyAPI (and so a pool, the proxy pages, the pool alerts):
    one is configured, or no upstream is declared at all (as before upstreams existed, the
    portal is a CLIProxyAPI portal waiting for its address). False on a portal with only
    claude-relay-service or Claude Code Hub."""
    if settings.CLIPROXY_URL:
        return True  # no query: pages call this on every visit
    if rows is None:  # `rows`: the enabled upstreams, when the caller has them already
        rows = list(upstreams())  # one query: a CLIProxyAPI staff added, or no relay at all
    return any(u.is_cliproxyapi for u in rows) or not rows


def open_to(person: User) -> list[Upstream]:
    """The upstreams `person` may add a key at, oldest first. CLIProxyAPI counts only when it
    is configured (its keys come from the pool)."""
    # Empty when no upstream is declared anywhere: the portal's pool (CLIProxyAPI) is the
    # one then, as before upstreams existed (keys without an upstream are its keys). One
    # query (pages list the choices on every visit).
    rows = upstreams().filter(Q(open_to_everyone=True) | Q(open_to=person)).distinct()
    return list(rows)


def open_to_everyone() -> list[Upstream]:
    """The upstreams anyone may add a key at (a person who does not exist yet included)."""
    return list(upstreams().filter(open_to_everyone=True))


def upstream_of(key: ApiKey) -> Upstream | None:
    """The key's upstream; None for keys of the CLIProxyAPI when it has no row."""
    if key.upstream_id is not None:
        return key.upstream
    return cliproxyapi()


def cliproxyapi_public_url() -> str:
    """The base URL people's tools use for the CLIProxyAPI's (the pool's) keys:
    CLIPROXY_PUBLIC_URL when set to its own value (no query), else the public URL staff gave
    its row in the admin, else its management URL."""
    chosen = public_url_from_environment(Kind.CLIPROXYAPI)
    if chosen:
        # It may be set alone (the proxy's address for people, while the portal reaches it
        # elsewhere or not yet).
        return chosen
    if settings.CLIPROXY_URL:
        # One query: the environment's row may not exist yet (made at its first use), and
        # then nobody has typed a public URL for it.
        typed = (Upstream.objects.filter(kind=Kind.CLIPROXYAPI, from_environment=True)
                 .values_list("public_url", flat=True).first())
        return (typed or settings.CLIPROXY_URL).rstrip("/")
    return cliproxyapi_endpoint().public_url


def public_url_is_set(upstream: Upstream) -> bool:
    """Whether someone chose the address people's tools get (in the environment or in the
    admin), rather than it defaulting to the management URL."""
    if upstream.from_environment and public_url_from_environment(upstream.kind):
        return True
    return bool(upstream.public_url)


def public_url(key: ApiKey) -> str:
    """The base URL people's tools use for `key`."""
    upstream = key.upstream if key.upstream_id is not None else None
    if upstream is None:
        return cliproxyapi_public_url()
    return endpoint(upstream).public_url


def driver_for(upstream: Upstream) -> Driver:
    if upstream.kind == Kind.CRS:
        from pool.upstreams.crs_driver import CrsDriver

        return CrsDriver(upstream)
    if upstream.kind == Kind.CCH:
        from pool.upstreams.cch_driver import CchDriver

        return CchDriver(upstream)
    from pool.upstreams.cliproxyapi import CliproxyDriver

    return CliproxyDriver(upstream)
