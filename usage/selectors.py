"""Reads on usage shared by the API, the admin, the pages and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import Count, Max, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, ExtractHour, TruncDate
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from accounts.models import User
from keyportal.checks import is_loopback
from keyportal.models import AuditEvent
from keyportal.notify import failing_webhooks
from pool.models import ApiKey, Upstream
from pool.selectors import (
    HEALTH_CACHE_KEY, KnownHealth, Probes, health_known, pool_status, upstream_probes,
)
from pool.services import IMPLAUSIBLE_NOTIFIED, upstream_health_refresh
from pool.upstream import ProxyClient
from pool.upstreams.registry import (
    PUBLIC_URL_SETTINGS, cliproxyapi_in_use, endpoint,
    public_url_from_environment, public_url_is_set, upstreams,
)
from usage.models import (
    QuarantinedRecord, SyncRun, UsageBatch, UsageDay, UsageModelDay, UsageSnapshot,
)
from usage.pricing import PriceBook

_ZERO = 0


def usage_totals(rows: QuerySet[UsageSnapshot]) -> dict[str, int | Decimal | None]:
    """Sums of a set of usage rows in one query (`sum_<field>`). `unpriced_requests` counts
    requests whose cost is unknown (a model without a price): `cost` is then only the known part."""
    return rows.aggregate(
        sum_requests=Coalesce(Sum("requests"), _ZERO),
        sum_failures=Coalesce(Sum("failures"), _ZERO),
        sum_input_tokens=Coalesce(Sum("input_tokens"), _ZERO),
        sum_output_tokens=Coalesce(Sum("output_tokens"), _ZERO),
        sum_reasoning_tokens=Coalesce(Sum("reasoning_tokens"), _ZERO),
        sum_cached_tokens=Coalesce(Sum("cached_tokens"), _ZERO),
        sum_cache_creation_tokens=Coalesce(Sum("cache_creation_tokens"), _ZERO),
        sum_total_tokens=Coalesce(Sum("total_tokens"), _ZERO),
        sum_cost=Sum("cost"),
        unpriced_requests=Coalesce(Sum("requests", filter=Q(cost__isnull=True)), _ZERO),
        incomplete_requests=Coalesce(Sum("incomplete_requests"), _ZERO),
    )


def people_with_usage() -> QuerySet[User]:
    """Everyone who holds a key, with their totals, biggest users first; one query. Usage
    rows join keys one-to-one, so the sums are not multiplied by the join."""
    return (
        User.objects.filter(api_keys__isnull=False)
        .annotate(
            key_count=Count("api_keys", distinct=True),
            total_requests=Coalesce(Sum("api_keys__usage__requests"), _ZERO),
            total_tokens=Coalesce(Sum("api_keys__usage__total_tokens"), _ZERO),
            total_cost=Sum("api_keys__usage__cost"),
            unpriced_requests=Coalesce(
                Sum("api_keys__usage__requests", filter=Q(api_keys__usage__cost__isnull=True)),
                _ZERO,
            ),
            incomplete_requests=Coalesce(Sum("api_keys__usage__incomplete_requests"), _ZERO),
        )
        .order_by("-total_tokens", "email")
    )


def keys_with_usage(*, owner: User) -> QuerySet[ApiKey]:
    return (
        ApiKey.objects.filter(owner=owner)
        .select_related("upstream")  # each key says where it is, in the same query
        .annotate(
            total_requests=Coalesce(Sum("usage__requests"), _ZERO),
            total_tokens=Coalesce(Sum("usage__total_tokens"), _ZERO),
            total_cost=Sum("usage__cost"),
            unpriced_requests=Coalesce(
                Sum("usage__requests", filter=Q(usage__cost__isnull=True)), _ZERO
            ),
            incomplete_requests=Coalesce(Sum("usage__incomplete_requests"), _ZERO),
            uncached_input=Coalesce(Sum("usage__input_tokens"), _ZERO),
            cache_read=Coalesce(Sum("usage__cached_tokens"), _ZERO),
            cache_write=Coalesce(Sum("usage__cache_creation_tokens"), _ZERO),
        )
        .order_by("-created_at", "-id")
    )


def last_sync() -> SyncRun | None:
    return SyncRun.objects.order_by("-started_at", "-id").first()


@dataclass(frozen=True)
class SyncBacklog:
    """What the sync holds aside: records it could not count, and pops it stored but has not
    counted yet (they are counted first by the next run)."""

    quarantined: int
    quarantined_week: int
    pending: int


def sync_backlog(*, now: datetime) -> SyncBacklog:
    aside = QuarantinedRecord.objects.aggregate(
        all=Count("id"), week=Count("id", filter=Q(created_at__gte=now - timedelta(days=7)))
    )
    return SyncBacklog(
        quarantined=aside["all"], quarantined_week=aside["week"],
        pending=UsageBatch.objects.filter(applied_at__isnull=True).count(),
    )


# --- pages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Sums shown on top of a page. `cost` is the known part; `unpriced_requests` > 0 means
    some usage has no price, and `incomplete_requests` > 0 that the proxy lost some counts
    (usage.accounting): either way the cost shown is a lower bound (or unknown when nothing is
    priced). The input split (uncached, cache read, cache write) is filled where a page shows
    it."""

    requests: int = 0
    tokens: int = 0
    cost: Decimal = Decimal(0)
    unpriced_requests: int = 0
    incomplete_requests: int = 0
    uncached_input: int = 0
    cache_read: int = 0
    cache_write: int = 0

    @property
    def cost_status(self) -> str:
        """"known", "partial" (some usage has no price, or lost counts at the proxy) or
        "unknown" (none has a price)."""
        if not self.unpriced_requests:
            return "partial" if self.incomplete_requests else "known"
        return "unknown" if self.unpriced_requests >= self.requests else "partial"

    @property
    def cache_hit_share(self) -> float | None:
        """Percent of the input read from the prompt cache; None without input."""
        prompt = self.uncached_input + self.cache_read + self.cache_write
        return round(100 * self.cache_read / prompt, 1) if prompt else None

    @property
    def uses_cache(self) -> bool:
        return bool(self.cache_read or self.cache_write)


def totals_of_keys(keys: list[ApiKey]) -> Totals:
    """The totals of a keys_with_usage() list, added up in Python: no second query."""
    return Totals(
        requests=sum(k.total_requests for k in keys),
        tokens=sum(k.total_tokens for k in keys),
        cost=sum((k.total_cost or Decimal(0) for k in keys), Decimal(0)),
        unpriced_requests=sum(k.unpriced_requests for k in keys),
        incomplete_requests=sum(k.incomplete_requests for k in keys),
        uncached_input=sum(k.uncached_input for k in keys),
        cache_read=sum(k.cache_read for k in keys),
        cache_write=sum(k.cache_write for k in keys),
    )


@dataclass(frozen=True)
class Bar:
    """One row of a chart: a label, its totals, and its length relative to the largest."""

    label: Any
    totals: Totals
    percent: float


def _bars(rows: list[tuple[Any, Totals]], *, by: str = "tokens") -> list[Bar]:
    top = max((getattr(t, by) for _l, t in rows), default=0)
    return [Bar(label, t, round(100 * getattr(t, by) / top, 1) if top else 0.0)
            for label, t in rows]


_SUMS = {
    "r": Coalesce(Sum("requests"), _ZERO),
    "t": Coalesce(Sum("total_tokens"), _ZERO),
    "c": Sum("cost"),
    "u": Coalesce(Sum("requests", filter=Q(cost__isnull=True)), _ZERO),
    "i": Coalesce(Sum("incomplete_requests"), _ZERO),
    "in": Coalesce(Sum("input_tokens"), _ZERO),
    "cr": Coalesce(Sum("cached_tokens"), _ZERO),
    "cw": Coalesce(Sum("cache_creation_tokens"), _ZERO),
}


def _totals(row: dict[str, Any]) -> Totals:
    return Totals(row["r"], row["t"], row["c"] or Decimal(0), row["u"], row["i"], row["in"],
                  row["cr"], row["cw"])


@dataclass(frozen=True)
class KeyUsage:
    totals: Totals
    by_day: list[Bar]  # every day of the window, oldest first, empty days included
    by_hour: list[Bar]  # hours of the day 0-23 in TIME_ZONE, over the same window
    by_model: list[Bar]  # all time, biggest first
    recent: list[UsageSnapshot]  # the latest hourly rows
    since: date


def key_usage(*, key: ApiKey, days: int = 30, recent: int = 24) -> KeyUsage:
    """One key's usage for its page, in five queries whatever its history: day and hour of
    day are computed by the database in the portal's time zone."""
    tz = timezone.get_current_timezone()
    today = timezone.localdate()
    since = today - timedelta(days=days - 1)
    start = datetime.combine(since, time.min, tzinfo=tz)
    rows = UsageSnapshot.objects.filter(api_key=key)
    window = rows.filter(hour__gte=start)
    per_day = {
        r["d"]: _totals(r)
        for r in window.annotate(d=TruncDate("hour", tzinfo=tz)).values("d").annotate(**_SUMS)
        .order_by()
    }
    per_hour = {
        r["h"]: _totals(r)
        for r in window.annotate(h=ExtractHour("hour", tzinfo=tz)).values("h")
        .annotate(**_SUMS).order_by()
    }
    per_model = [
        (r["model"], _totals(r))
        for r in rows.values("model").annotate(**_SUMS).order_by("-t", "model")
    ]
    return KeyUsage(
        totals=_totals(rows.aggregate(**_SUMS)),
        by_day=_bars([(since + timedelta(days=n), per_day.get(since + timedelta(days=n), Totals()))
                      for n in range(days)]),
        by_hour=_bars([(h, per_hour.get(h, Totals())) for h in range(24)]),
        by_model=_bars(per_model),
        recent=list(rows.order_by("-hour", "model")[:recent]),
        since=since,
    )


# --- the leaderboard ----------------------------------------------------------------------------

PERIODS: dict[str, int | None] = {"today": 1, "7d": 7, "30d": 30, "all": None}
RANKINGS = ("tokens", "requests", "cost")
_HELD = (ApiKey.Status.ACTIVE, ApiKey.Status.SUSPENDED, ApiKey.Status.EXPIRED)


@dataclass(frozen=True)
class Ranked:
    person: User
    totals: Totals
    share: float  # of the period's total by the ranking measure, in percent


@dataclass(frozen=True)
class Leaderboard:
    period: str
    by: str
    since: date | None
    totals: Totals  # over everyone active in the period, not only the rows shown
    active_people: int
    people_with_keys: int  # ever given a key
    keys_held: int  # active, suspended or expired: revoked keys and the pool left out
    rows: list[Ranked]


_BOARD_ORDER = {"tokens": "t", "requests": "r", "cost": "c"}


def _decimal(value: Any) -> Decimal:
    # SQLite sums decimals as floats: back to the 8 places cost is stored with.
    return Decimal(0) if value is None else Decimal(str(value)).quantize(Decimal("1e-8"))


def leaderboard(*, period: str, by: str, limit: int = 100) -> Leaderboard:
    """People ranked for a period, from the person × day rollup (UsageDay), never the hourly
    table. One pass over the rollup gives the top rows and, through window functions over
    the grouped rows (evaluated before LIMIT), the totals and head count of everyone."""
    if period not in PERIODS or by not in RANKINGS:
        raise ValueError(f"unknown period {period!r} or ranking {by!r}")
    days = PERIODS[period]
    since = timezone.localdate() - timedelta(days=days - 1) if days else None
    q = connection.ops.quote_name
    where, params = ("", []) if since is None else (
        f"WHERE {q('day')} >= %s", [connection.ops.adapt_datefield_value(since)])
    sql = (
        f"SELECT {q('person_id')}, SUM({q('requests')}) AS r, SUM({q('total_tokens')}) AS t, "
        f"SUM({q('cost')}) AS c, SUM({q('unpriced_requests')}) AS u, COUNT(*) OVER () AS n, "
        f"SUM(SUM({q('requests')})) OVER (), SUM(SUM({q('total_tokens')})) OVER (), "
        f"SUM(SUM({q('cost')})) OVER (), SUM(SUM({q('unpriced_requests')})) OVER (), "
        f"SUM({q('incomplete_requests')}) AS i, SUM(SUM({q('incomplete_requests')})) OVER () "
        f"FROM {q(UsageDay._meta.db_table)} {where} GROUP BY {q('person_id')} "
        f"ORDER BY {_BOARD_ORDER[by]} DESC, {q('person_id')} LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, limit])
        top = cursor.fetchall()
    first = top[0] if top else (None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    # int(): PostgreSQL sums bigints as numeric.
    active, totals = first[5], Totals(int(first[6] or 0), int(first[7] or 0),
                                      _decimal(first[8]), int(first[9] or 0), int(first[11] or 0))
    # Two small counts, each answered from an index alone (owner; status) rather than one
    # pass over the whole key table.
    given = ApiKey.objects.filter(owner__isnull=False).aggregate(n=Count("owner", distinct=True))
    held = ApiKey.objects.filter(status__in=_HELD).count()
    people = User.objects.in_bulk([row[0] for row in top])
    whole = getattr(totals, by)
    rows = []
    for person_id, requests, tokens, cost, unpriced, *_rest, incomplete, _all in top:
        mine = Totals(int(requests), int(tokens), _decimal(cost), int(unpriced), int(incomplete))
        share = round(float(100 * getattr(mine, by) / whole), 1) if whole else 0.0
        rows.append(Ranked(person=people[person_id], totals=mine, share=share))
    return Leaderboard(
        period=period, by=by, since=since, totals=totals, active_people=active,
        people_with_keys=given["n"], keys_held=held, rows=rows,
    )


# --- daily series for the charts ----------------------------------------------------------------

CHART_DAYS = (7, 30, 90)


@dataclass(frozen=True)
class Daily:
    """Usage per day of the portal's TIME_ZONE and per series (a model, or one series for
    everything), over `days` days ending today. `series` is the stacking order, bottom first:
    the biggest by tokens, then by name, so that the order is the same on every reload."""

    since: date
    days: list[date]
    series: list[str]
    cells: dict[tuple[date, str], Totals]
    per_day: dict[date, Totals]
    per_series: dict[str, Totals]
    total: Totals

    @property
    def empty(self) -> bool:
        return self.total.requests == 0 and self.total.tokens == 0


def _add(a: Totals, b: Totals) -> Totals:
    return Totals(a.requests + b.requests, a.tokens + b.tokens, a.cost + b.cost,
                  a.unpriced_requests + b.unpriced_requests,
                  a.incomplete_requests + b.incomplete_requests,
                  a.uncached_input + b.uncached_input, a.cache_read + b.cache_read,
                  a.cache_write + b.cache_write)


def _daily(since: date, days: int, cells: dict[tuple[date, str], Totals]) -> Daily:
    per_day: dict[date, Totals] = {}
    per_series: dict[str, Totals] = {}
    for (day, name), t in cells.items():
        per_day[day] = _add(per_day.get(day, Totals()), t)
        per_series[name] = _add(per_series.get(name, Totals()), t)
    total = Totals()
    for t in per_series.values():
        total = _add(total, t)
    return Daily(
        since=since, days=[since + timedelta(days=n) for n in range(days)],
        series=sorted(per_series, key=lambda name: (-per_series[name].tokens, name)),
        cells=cells, per_day=per_day, per_series=per_series, total=total,
    )


def _since(days: int) -> tuple[date, datetime]:
    zone = timezone.get_default_timezone()
    since = timezone.localdate(timezone=zone) - timedelta(days=days - 1)
    return since, datetime.combine(since, time.min, tzinfo=zone)


def daily_by_model(*, rows: QuerySet[UsageSnapshot], days: int) -> Daily:
    """`rows` (a person's or a key's usage) per local day and model over the last `days`
    days, in one grouped query: the day is computed by the database in TIME_ZONE, an hour
    counting for the day it starts in (as UsageDay does)."""
    zone = timezone.get_default_timezone()
    since, start = _since(days)
    # Grouped by the stored hour, and the hours folded into local days here: on SQLite a
    # day computed in the query is a Python function call per row (TruncDate with a zone).
    grouped = (
        rows.filter(hour__gte=start)
        .values("hour", "model").annotate(**_SUMS).order_by()
    )
    cells: dict[tuple[date, str], Totals] = {}
    for r in grouped:
        key = (timezone.localtime(r["hour"], zone).date(), r["model"])
        cells[key] = _add(cells.get(key, Totals()), _totals(r))
    return _daily(since, days, {k: Totals(t.requests, t.tokens, _decimal(t.cost),
                                          t.unpriced_requests, t.incomplete_requests)
                                for k, t in cells.items()})


ALL_USAGE = "*"  # the one series of daily_all_usage: everyone, every model


def daily_all_usage(*, days: int) -> Daily:
    """Everyone's usage per local day from the person × day rollup, in one query."""
    since, _start = _since(days)
    grouped = (
        UsageDay.objects.filter(day__gte=since).values("day")
        .annotate(r=Sum("requests"), t=Sum("total_tokens"), c=Sum("cost"),
                  u=Sum("unpriced_requests"), i=Sum("incomplete_requests"))
        .order_by()
    )
    cells = {(r["day"], ALL_USAGE): Totals(int(r["r"]), int(r["t"]), _decimal(r["c"]), int(r["u"]),
                                           int(r["i"]))
             for r in grouped}
    return _daily(since, days, cells)


def person_audit(*, person: User, keys: list[ApiKey], limit: int = 30) -> list[AuditEvent]:
    """The latest audit rows by or about a person and their keys, in one query."""
    return list(
        AuditEvent.objects.filter(
            Q(actor=person) | Q(target_type="user", target_id=str(person.pk))
            | Q(target_type="apikey", target_id__in=[str(k.pk) for k in keys])
        ).order_by("-at", "-id")[:limit]
    )


# --- the admin index dashboard ------------------------------------------------------------------

DASHBOARD_DAYS = 30  # top people and models, cache-hit share
DASHBOARD_TOP = 10


@dataclass(frozen=True)
class TopPerson:
    person_id: int
    email: str
    totals: Totals


def _change(now: int | Decimal, before: int | Decimal) -> str:
    """Today against yesterday in words: "+12 % vs yesterday", "same as yesterday" (within
    half a percent), "none yesterday", "" when neither day had any."""
    if not now and not before:
        return ""
    if not before:
        return _("none yesterday")
    percent = round(100 * (Decimal(now) - Decimal(before)) / Decimal(before))
    if percent == 0:
        return _("same as yesterday")
    sign = "+" if percent > 0 else "−"
    return _("%(change)s vs yesterday") % {"change": f"{sign}{abs(percent)} %"}


@dataclass(frozen=True)
class Dashboard:
    today: Totals  # people's usage today (portal's TIME_ZONE), from the model × day rollup
    pool_unused: int
    pool_ready: int
    pool_min: int
    sync: SyncRun | None
    unpriced_models: list[str]  # models used in the last 30 days with no price
    quarantined_week: int
    proxy_refused: bool  # the 401/403 latch is set: the management key was refused
    key_list_refused: bool  # reconcile refused the proxy's key list in the last half hour
    # False on a portal with no CLIProxyAPI (only relays that make their own keys): no pool
    # to keep above its low-water mark, no proxy pages.
    has_pool: bool = True
    yesterday: Totals = Totals()
    trend: Daily | None = None  # per day and model over the chart's period (default 30 days)
    month: Totals = Totals()  # the last DASHBOARD_DAYS days, with the input split
    top_people: list[TopPerson] = field(default_factory=list)
    top_models: list[tuple[str, Totals]] = field(default_factory=list)
    last_ok_sync: datetime | None = None  # when the last successful sync finished
    backlog: SyncBacklog | None = None
    upstreams: list[KnownHealth] = field(default_factory=list)
    now: datetime | None = None  # when it was read: the ages shown count from it
    # Staff webhooks whose latest delivery failed (keyportal.notify.failing_webhooks).
    webhooks_failing: list[str] = field(default_factory=list)

    @property
    def pool_low(self) -> bool:
        return self.has_pool and self.pool_unused < self.pool_min

    @property
    def alerts(self) -> bool:
        return bool(self.pool_low or (self.sync is not None and not self.sync.ok)
                    or self.quarantined_week or self.proxy_refused or self.key_list_refused
                    or self.unpriced_models or self.webhooks_failing)

    @property
    def changes(self) -> dict[str, str]:
        """Today against yesterday, per measure, in words (cost: the known part)."""
        return {
            "requests": _change(self.today.requests, self.yesterday.requests),
            "tokens": _change(self.today.tokens, self.yesterday.tokens),
            "cost": _change(self.today.cost, self.yesterday.cost),
        }


def unpriced_models_seen(*, since: date) -> list[str]:
    """Models used on people's keys since the local day `since` that had no price when
    counted and still have none (one priced since then needs a recompute, not a price): two
    small queries, the model × day rollup and the price book, as the admin's "Unpriced
    models seen" page decides. (The hourly table's hour index served this before: a third of
    the dashboard's database time at 2,000,000 rows.)"""
    seen = (
        UsageModelDay.objects.filter(day__gte=since, unpriced_requests__gt=0)
        .values_list("model", flat=True).distinct().order_by("model")
    )
    book = PriceBook.load()
    return [model for model in seen if book.price_for(model) is None]


def _model_days(*, since: date) -> dict[tuple[date, str], Totals]:
    """The model × day rollup from `since`, one query: a few rows per model and day."""
    rows = UsageModelDay.objects.filter(day__gte=since).values_list(
        "day", "model", "requests", "total_tokens", "cost", "unpriced_requests",
        "incomplete_requests", "input_tokens", "cached_tokens", "cache_creation_tokens",
    )
    return {(day, model): Totals(r, t, _decimal(c), u, i, n, cr, cw)
            for day, model, r, t, c, u, i, n, cr, cw in rows}


def _top_people(*, since: date, limit: int) -> list[TopPerson]:
    """The people who cost most since `since` (then most tokens), from the person × day
    rollup read through its (day, person, sums) covering index; one query with their emails."""
    grouped = (
        UsageDay.objects.filter(day__gte=since).values("person", "person__email")
        .annotate(r=Sum("requests"), t=Sum("total_tokens"), c=Sum("cost"),
                  u=Sum("unpriced_requests"), i=Sum("incomplete_requests"))
        .order_by("-c", "-t", "person")[:limit]
    )
    return [TopPerson(row["person"], row["person__email"],
                      Totals(int(row["r"]), int(row["t"]), _decimal(row["c"]), int(row["u"]),
                             int(row["i"])))
            for row in grouped]


def admin_dashboard(*, now: datetime, days: int = DASHBOARD_DAYS) -> Dashboard:
    """What the admin index shows, in a constant number of queries whatever the usage: the
    model × day rollup (today, yesterday, the trend, top models, cache-hit share), the person
    × day rollup (top people), pool, last sync and last good sync, unpriced models and the
    price book, the sync backlog (two), the upstreams, and one cache read for the refusal
    flags and the upstreams' last known health. `days` is the trend chart's period.

    No upstream is asked anything here, except once a minute at most across processes (see
    pool.services.upstream_health_refresh), within the page's proxy budget."""
    zone = timezone.get_default_timezone()
    today = timezone.localdate(now, timezone=zone)
    yesterday = today - timedelta(days=1)
    trend_since = today - timedelta(days=days - 1)
    month_since = today - timedelta(days=DASHBOARD_DAYS - 1)
    cells = _model_days(since=min(trend_since, month_since, yesterday))

    day_totals: dict[date, Totals] = {}
    month_cells: dict[str, Totals] = {}
    for (day, model), t in cells.items():
        day_totals[day] = _add(day_totals.get(day, Totals()), t)
        if day >= month_since:
            month_cells[model] = _add(month_cells.get(model, Totals()), t)
    month = Totals()
    for t in month_cells.values():
        month = _add(month, t)
    top_models = sorted(month_cells.items(), key=lambda mt: (-mt[1].cost, -mt[1].tokens, mt[0]))

    pool = pool_status()
    # As cliproxyapi_in_use(), from the one list of upstreams the health section needs too.
    rows = list(upstreams())
    has_pool = bool(settings.CLIPROXY_URL) or any(u.is_cliproxyapi for u in rows) or not rows
    latch_key = ""
    if settings.CLIPROXY_URL:
        # The refusal latch the client keeps in the shared cache (pool/upstream.py): read,
        # never probed, so that the index page sends nothing to the proxy.
        with ProxyClient.from_settings() as client:
            latch_key = client.refusal_cache_key
    flags = cache.get_many([k for k in (latch_key, IMPLAUSIBLE_NOTIFIED, HEALTH_CACHE_KEY) if k])
    health = health_known(rows=rows, stored=flags.get(HEALTH_CACHE_KEY))
    if any(h.stale(now=now) for h in health) and upstream_health_refresh(
            rows=rows, budget=settings.PORTAL_REQUEST_PROXY_BUDGET, now=now):
        health = health_known(rows=rows, stored=cache.get(HEALTH_CACHE_KEY))
    backlog = sync_backlog(now=now)
    last_ok = SyncRun.objects.filter(ok=True).aggregate(at=Max("finished_at"))["at"]
    return Dashboard(
        today=day_totals.get(today, Totals()),
        pool_unused=pool.unused, pool_ready=pool.ready, pool_min=settings.PORTAL_POOL_MIN,
        sync=last_sync(),
        unpriced_models=unpriced_models_seen(since=month_since),
        quarantined_week=backlog.quarantined_week,
        proxy_refused=bool(latch_key) and latch_key in flags,
        key_list_refused=IMPLAUSIBLE_NOTIFIED in flags,
        has_pool=has_pool,
        yesterday=day_totals.get(yesterday, Totals()),
        trend=_daily(trend_since, days, {k: t for k, t in cells.items() if k[0] >= trend_since}),
        month=month,
        top_people=_top_people(since=month_since, limit=DASHBOARD_TOP),
        top_models=top_models[:DASHBOARD_TOP],
        last_ok_sync=last_ok, backlog=backlog, upstreams=health, now=now,
        webhooks_failing=failing_webhooks().names,
    )


# --- the getting-started checklist --------------------------------------------------------------


@dataclass(frozen=True)
class ChecklistItem:
    """One step of a first run: done or not, in words, and what to do about it (a link, or a
    button that POSTs to `action_url`; a shell step only where there is no other way)."""

    name: str  # stable: staff, upstream, pool, statistics, sync, public_url
    title: str
    done: bool
    lines: list[str]
    action_label: str = ""
    action_url: str = ""
    action_post: bool = False


@dataclass(frozen=True)
class Checklist:
    items: list[ChecklistItem]

    @property
    def done(self) -> bool:
        return all(item.done for item in self.items)

    @property
    def remaining(self) -> int:
        return sum(not item.done for item in self.items)


def _change_url(upstream: Upstream) -> str:
    return reverse("admin:pool_upstream_change", args=[upstream.pk])


def _upstream_item(rows: list[Upstream], probes: Probes) -> ChecklistItem:
    title = _("An upstream the portal reaches with the right key")
    if not rows:
        return ChecklistItem("upstream", title, False,
                             [_("No relay is configured yet: the portal cannot make keys.")],
                             _("Add an upstream"), reverse("admin:pool_upstream_add"))
    problems: list[str] = []
    action_label, action_url = "", ""
    proxy_row = next((row for row in rows if row.is_cliproxyapi), None)
    proxy = probes.proxy
    if proxy_row is not None and proxy is not None and not (proxy.reachable and not proxy.refused):
        if proxy.refused or proxy.no_key:
            if proxy.refused:
                problems.append(_("%(name)s refused the portal's management key.")
                                % {"name": proxy_row.name})
            problems.append(proxy.error)
            problems.append(
                _("Set CLIPROXY_MANAGEMENT_KEY in the environment (.env) to the proxy's "
                  "remote-management secret-key and restart the portal.")
                if proxy_row.from_environment else
                _("Give the upstream the proxy's remote-management secret-key as its secret."))
            if not proxy_row.from_environment:
                action_label, action_url = _("Edit the upstream"), _change_url(proxy_row)
        else:
            problems.append(_("%(name)s does not answer: %(error)s")
                            % {"name": proxy_row.name, "error": proxy.error})
            action_label, action_url = _("Proxy status"), reverse("staff-proxy")
    for relay in probes.relays:
        if not relay.ok:
            problems.append(_("%(name)s does not answer as expected: %(detail)s")
                            % {"name": relay.name, "detail": relay.detail})
            action_label = action_label or _("Upstreams")
            action_url = action_url or reverse("admin:pool_upstream_changelist")
    if problems:
        return ChecklistItem("upstream", title, False, problems, action_label, action_url)
    return ChecklistItem("upstream", title, True, [
        ngettext("%(names)s answers.", "%(names)s answer.", len(rows))
        % {"names": ", ".join(row.name for row in rows)}])


def _public_url_item(rows: list[Upstream]) -> ChecklistItem:
    title = _("The address people's tools are given")
    if not rows:
        return ChecklistItem("public_url", title, False, [_("Add an upstream first.")])
    problems: list[str] = []
    fine: list[str] = []
    action_label, action_url = "", ""
    for row in rows:
        given = endpoint(row).public_url
        chosen = public_url_is_set(row)
        by_environment = row.from_environment and public_url_from_environment(row.kind)
        if chosen and not is_loopback(given):
            fine.append(_("%(name)s: people are given %(url)s.") % {"name": row.name, "url": given})
            continue
        if chosen:
            problems.append(_("%(name)s: people are given %(url)s, a loopback address: what they "
                              "paste works only on this machine.")
                            % {"name": row.name, "url": given})
        else:
            problems.append(_("%(name)s: no public URL is set, so people are given its "
                              "management URL %(url)s.")
                            % {"name": row.name, "url": given or "—"})
        if by_environment:
            problems.append(_("It is set by %(setting)s in the environment (.env): change it "
                              "there and restart the portal.")
                            % {"setting": PUBLIC_URL_SETTINGS[row.kind]})
        elif not action_url:
            action_label, action_url = _("Set the public URL"), _change_url(row)
    if problems:
        return ChecklistItem("public_url", title, False, problems + fine, action_label,
                             action_url)
    return ChecklistItem("public_url", title, True, fine)


def _pool_items(probes: Probes, index: str) -> list[ChecklistItem]:
    """The CLIProxyAPI's own steps: its pool and its statistics switch. Their buttons only
    once the portal knows where the proxy is (they would fail before)."""
    no_proxy = [_("The CLIProxyAPI comes first (see above).")]
    pool = pool_status()
    if pool.ready:
        pool_item = ChecklistItem("pool", _("The key pool"), True, [
            _("%(ready)d keys are ready for people; %(assigned)d are handed out.")
            % {"ready": pool.ready, "assigned": pool.assigned}])
    elif probes.proxy is None:
        pool_item = ChecklistItem("pool", _("The key pool"), False, no_proxy)
    else:
        # Handed-out keys are no help to the next person: a pool with none ready is not done.
        said = (_("All %(assigned)d keys are handed out and none is ready: people who register "
                  "now would get none. The button makes more and pushes them to CLIProxyAPI.")
                % {"assigned": pool.assigned} if pool.assigned else
                _("No key is in the pool yet: people who register now would get none. The "
                  "button makes the keys and pushes them to CLIProxyAPI."))
        pool_item = ChecklistItem(
            "pool", _("The key pool"), False, [said],
            _("Fill the pool"), f"{reverse('admin:pool_apikey_reconcile')}?next={index}",
            action_post=True)
    title = _("Usage statistics on at CLIProxyAPI")
    if probes.proxy is None:
        return [pool_item, ChecklistItem("statistics", title, False, no_proxy)]
    statistics = probes.proxy.statistics
    if statistics:
        return [pool_item, ChecklistItem("statistics", title, True, [
            _("CLIProxyAPI records every request for the portal to count.")])]
    lines = ([_("CLIProxyAPI's usage statistics are off: it records no usage, so usage pages, "
                "limits and the leaderboard would not move.")] if statistics is False
             else [_("Not known until CLIProxyAPI answers (see above).")])
    return [pool_item, ChecklistItem("statistics", title, False, lines, _("Proxy settings"),
                                     reverse("staff-proxy-settings"))]


def getting_started(*, user: User) -> Checklist:
    """The admin index's first-run checklist: each step done or not and what to do next.
    Reads the database (a few queries) and the upstreams through `upstream_probes`, which
    asks them at most once a minute within a short budget (a down proxy cannot make the index
    hang)."""
    rows = list(upstreams())
    has_pool = cliproxyapi_in_use(rows=rows)
    probes = upstream_probes(rows=rows)
    index = reverse("admin:index")
    items = [ChecklistItem("staff", _("A staff account"), True, [
        _("You are signed in as %(email)s. Give others staff status under People.")
        % {"email": user.email}])]
    items.append(_upstream_item(rows, probes))
    if has_pool:
        items.extend(_pool_items(probes, index))
    # One query: the latest good run when there is one, else the latest failed one.
    run = SyncRun.objects.order_by("-ok", "-started_at", "-id").first()
    synced = run if run is not None and run.ok else None
    if synced is not None:
        items.append(ChecklistItem("sync", _("A usage sync has run"), True, [
            _("The last good one started %(when)s. Keep usage flowing with `manage.py "
              "sync_usage --follow` as a service, or `sync_usage` from cron.")
            % {"when": date_format(timezone.localtime(synced.started_at), "DATETIME_FORMAT")}]))
    else:
        lines = ([_("The last sync failed: %(message)s") % {"message": run.message}]
                 if run is not None else [_("No usage sync has run yet.")])
        items.append(ChecklistItem("sync", _("A usage sync has run"), False, lines,
                                   _("Sync now"),
                                   f"{reverse('admin:usage_syncrun_sync')}?next={index}",
                                   action_post=True))
    items.append(_public_url_item(rows))
    return Checklist(items)
