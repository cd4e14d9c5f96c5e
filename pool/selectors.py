"""Reads on keys shared by several callers."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.models import Count, Q
from django.utils.translation import gettext as _

from pool.models import ON_CLIPROXYAPI, ApiKey, Upstream
from pool.upstreams.base import Health
from pool.upstreams.registry import driver_for, endpoint, upstreams

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

    def __init__(self, *, budget: float, skip_cliproxyapi: bool = True) -> None:
        self.budget = budget
        self.started = time.monotonic()
        self.rows = [u for u in upstreams() if not (skip_cliproxyapi and u.is_cliproxyapi)]
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
