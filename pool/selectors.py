"""Reads on keys shared by several callers."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connections
from django.db.models import Count, Q
from django.utils import timezone
from django.utils.translation import get_language
from django.utils.translation import gettext as _

from pool.models import ON_CLIPROXYAPI, ApiKey, Upstream
from pool.upstream import ProxyClient, UpstreamError, UpstreamNotConfigured, UpstreamRefused
from pool.upstreams.base import Health
from pool.upstreams.registry import cliproxyapi_endpoint, driver_for, endpoint, upstreams

log = logging.getLogger(__name__)

Status = ApiKey.Status


@dataclass(frozen=True)
class PoolStatus:
    unused: int  # unissued keys in the pool (at the proxy or about to be)
    ready: int  # of those, the ones already at the proxy: what sign-ups can be given
    assigned: int  # keys people hold: active, suspended or expired (revoked ones excluded)

    @property
    def total(self) -> int:
        return self.unused + self.assigned


def pool_status() -> PoolStatus:
    counts = ApiKey.objects.aggregate(
        unused=Count("id", filter=Q(status=Status.POOL)),
        ready=Count("id", filter=Q(status=Status.POOL, proxy_state=ApiKey.ProxyState.PUSHED)),
        # The pool is the CLIProxyAPI's: keys held at other upstreams are not its.
        assigned=Count(
            "id", filter=Q(status__in=[Status.ACTIVE, Status.SUSPENDED, Status.EXPIRED])
            & ON_CLIPROXYAPI
        ),
    )
    return PoolStatus(**counts)


@dataclass(frozen=True)
class UpstreamHealth:
    upstream: Upstream
    health: Health
    keys: int  # keys people hold there (revoked ones excluded)
    public_url: str


def _health_of(upstream: Upstream) -> Health:
    """One upstream's health in a worker thread: never raises, and closes the thread's own
    database connection (a driver may read the shared cache)."""
    try:
        driver = driver_for(upstream)
        try:
            return driver.health()
        finally:
            driver.close()
    except Exception as exc:  # a page must show the others whatever one driver does
        log.warning("Health of %s failed: %s", upstream.name, type(exc).__name__)
        return Health(False, _("The portal could not ask it (%(error)s).")
                      % {"error": type(exc).__name__})
    finally:
        connections.close_all()


def health_within(upstream: Upstream, *, budget: float) -> Health:
    """One upstream's health, waited for at most `budget` seconds (a page's budget: a save in
    the admin must not hang on a relay that drips its answer)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
    future = pool.submit(_health_of, upstream)
    pool.shutdown(wait=False)
    wait([future], timeout=budget)
    if future.done():
        return future.result()
    return Health(False, _("It did not answer within %(s)g seconds.") % {"s": budget})


class HealthCheck:
    """Each enabled upstream's health, asked all at once in worker threads as soon as it is
    made, so a page can do its other work meanwhile; `results()` waits for what is left of
    `budget` (seconds from the start) and reports an upstream that has not answered by then
    as slow, leaving its question to finish in the background. The CLIProxyAPI is skipped
    by default: the proxy page reads it in more detail (usage.pages)."""

    def __init__(self, *, budget: float, skip_cliproxyapi: bool = True,
                 rows: list[Upstream] | None = None) -> None:
        self.budget = budget
        self.started = time.monotonic()
        rows = list(upstreams()) if rows is None else rows  # given: the caller has them
        self.rows = [u for u in rows if not (skip_cliproxyapi and u.is_cliproxyapi)]
        self.futures = []
        if self.rows:
            pool = ThreadPoolExecutor(max_workers=min(len(self.rows), 8),
                                      thread_name_prefix="health")
            self.futures = [pool.submit(_health_of, u) for u in self.rows]
            pool.shutdown(wait=False)  # the threads end with their question

    def results(self) -> list[UpstreamHealth]:
        if not self.rows:
            return []
        held = dict(
            ApiKey.objects.filter(upstream__in=self.rows).exclude(status=Status.REVOKED)
            .values("upstream").annotate(n=Count("id")).values_list("upstream", "n")
        )
        left = max(0.0, self.budget - (time.monotonic() - self.started))
        wait(self.futures, timeout=left)
        found = []
        for upstream, future in zip(self.rows, self.futures, strict=True):
            if future.done():
                health = future.result()
            else:
                health = Health(False, _("It did not answer within %(s)g seconds.")
                                % {"s": self.budget})
            found.append(UpstreamHealth(upstream, health, held.get(upstream.id, 0),
                                        endpoint(upstream).public_url))
        return found


# --- the getting-started checklist's look at the upstreams ----------------------------------

# The admin index asks the upstreams at most once a minute (the shared cache holds the
# answer for every portal process), and within a short budget: a proxy that is down or drips
# its answer must not make the index hang, and a wrong management key must not be retried on
# every visit (CLIProxyAPI bans an address after 5 refusals).
PROBE_CACHE_KEY = "getting-started:probe"
PROBE_SECONDS = 60


@dataclass(frozen=True)
class ProxyProbe:
    """What the CLIProxyAPI answered to GET /usage-statistics-enabled: it is reachable, with
    the right management key (refused: the key is wrong), and its statistics are on or off."""

    reachable: bool
    refused: bool
    statistics: bool | None  # None: not known (unreachable or refused)
    error: str  # the UpstreamError's sentence: never carries the key
    no_key: bool = False  # no management key is configured: nothing was sent


@dataclass(frozen=True)
class UpstreamProbe:
    upstream_id: int
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Probes:
    proxy: ProxyProbe | None  # None: the portal has no CLIProxyAPI configured
    relays: list[UpstreamProbe]


def _proxy_probe(budget: float) -> ProxyProbe | None:
    if not cliproxyapi_endpoint().management_url:
        return None
    try:
        with ProxyClient.from_settings(budget=budget) as client:
            statistics = client.usage_statistics_enabled()
    except UpstreamNotConfigured as exc:
        return ProxyProbe(reachable=False, refused=False, statistics=None, error=str(exc),
                          no_key=True)
    except UpstreamRefused as exc:
        return ProxyProbe(reachable=True, refused=True, statistics=None, error=str(exc))
    except UpstreamError as exc:
        return ProxyProbe(reachable=False, refused=False, statistics=None, error=str(exc))
    except Exception as exc:  # the admin index must render whatever the client does
        log.warning("The getting-started probe of the proxy failed: %s", type(exc).__name__)
        return ProxyProbe(reachable=False, refused=False, statistics=None,
                          error=_("The portal could not ask it (%(error)s).")
                          % {"error": type(exc).__name__})
    return ProxyProbe(reachable=True, refused=False, statistics=statistics, error="")


def upstream_probes(*, rows: list[Upstream], budget: float | None = None) -> Probes:
    """Each of `rows` (the enabled upstreams) asked once (relays in worker threads, all
    within `budget` seconds: the page's proxy budget by default), the answer kept
    PROBE_SECONDS in the shared cache. A relay whose last known health (health_known: the
    proxy page's or the dashboard's) is under a minute old is not asked again."""
    # Per language: the sentences in the answer are translated when they are made.
    key = f"{PROBE_CACHE_KEY}:{get_language() or ''}"
    cached = cache.get(key)
    if isinstance(cached, Probes):
        return cached
    budget = settings.PORTAL_REQUEST_PROXY_BUDGET if budget is None else budget
    now = timezone.now()
    known = {h.upstream.pk: h for h in health_known(
        rows=[u for u in rows if not u.is_cliproxyapi], stored=cache.get(HEALTH_CACHE_KEY))}
    stale = [u for u in rows if u.is_cliproxyapi or known[u.pk].stale(now=now)]
    check = HealthCheck(budget=budget, rows=stale)  # the relays, asked while the proxy is
    proxy = _proxy_probe(budget)
    answered = check.results()
    asked = {row.upstream.pk: row.health for row in answered}
    relays = [
        UpstreamProbe(u.id, u.name, *((asked[u.pk].ok, asked[u.pk].detail) if u.pk in asked
                                      else (bool(known[u.pk].ok), known[u.pk].detail)))
        for u in rows if not u.is_cliproxyapi
    ]
    probes = Probes(proxy=proxy, relays=relays)
    cache.set(key, probes, PROBE_SECONDS)
    _remember_as_health(rows=rows, relays=answered, proxy=proxy)
    return probes


def _remember_as_health(*, rows: list[Upstream], relays: list[Any], proxy: ProxyProbe | None
                        ) -> None:
    """What the checklist just asked is also each upstream's last known health (the staff
    dashboard's, health_known): the dashboard's own refresh is skipped for the minute, so one
    index visit asks each upstream once, not twice."""
    from pool.services import upstream_health_remember  # services build on the selectors

    now = timezone.now()
    found = [(row.upstream, row.health) for row in relays]
    if proxy is not None:
        ok = proxy.reachable and not proxy.refused
        health = Health(ok, proxy.error or _("It answers, with the right management key."))
        found += [(u, health) for u in rows if u.is_cliproxyapi]
    upstream_health_remember(found=found, now=now)
    cache.add(HEALTH_REFRESH_LOCK, now.isoformat(), HEALTH_EVERY)


def upstream_probes_forget() -> None:
    """After staff change what the probe reads (an upstream, a proxy setting): the next
    index visit asks again instead of showing a minute-old answer."""
    cache.delete_many([f"{PROBE_CACHE_KEY}:{code}" for code in ("", *dict(settings.LANGUAGES))])
# --- the last known health (the staff dashboard's) --------------------------------------------

# Each upstream's last answer, kept in the shared cache as {upstream id: {"ok", "detail",
# "at"}} so that every portal process shows the same, and the admin index reads it in the
# same cache read as its other flags. Written by pool.services.upstream_health_refresh (at
# most once per HEALTH_EVERY seconds, from the index) and by the proxy status page, which
# asks anyway.
HEALTH_CACHE_KEY = "pool:upstream-health"
HEALTH_REFRESH_LOCK = "pool:upstream-health:refreshing"
HEALTH_EVERY = 60  # seconds between two checks, across processes
HEALTH_KEEP = 24 * 3600  # a day-old answer still beats none; its age is shown


@dataclass(frozen=True)
class KnownHealth:
    upstream: Upstream
    ok: bool | None  # None: not checked yet
    detail: str
    checked_at: datetime | None

    def stale(self, *, now: datetime) -> bool:
        return self.checked_at is None or (now - self.checked_at).total_seconds() >= HEALTH_EVERY


def health_known(*, rows: list[Upstream], stored: dict[Any, Any] | None) -> list[KnownHealth]:
    """`rows`' last known health from what the cache held under HEALTH_CACHE_KEY (read by
    the caller, with its other keys)."""
    stored = stored or {}
    found = []
    for upstream in rows:
        entry = stored.get(upstream.pk)
        if entry is None:
            found.append(KnownHealth(upstream, None, "", None))
        else:
            found.append(KnownHealth(upstream, bool(entry["ok"]), str(entry["detail"]),
                                     datetime.fromisoformat(entry["at"])))
    return found
