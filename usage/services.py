"""Writes on usage: ingesting rows from either proxy generation, syncing from the proxy, and
recomputing cost.

How a sync survives the proxy (../shared/docs/cliproxyapi-contract.md):
- queue (`/usage-queue`, destructive): each pop is reduced to rows (keys hashed) and
  committed as a UsageBatch *before* it is counted; counting marks the batch applied in the
  same transaction that adds its counts. A run killed between the two leaves a pending batch
  that the next run applies first: nothing lost, nothing counted twice.
- snapshot (`/usage`, cumulative): per (key, model) cursors say how much of each list of
  details is already counted (see SnapshotCursor); counts and cursors move in one transaction.
- one sync at a time across processes (the `usage-sync` lease), and every counter moves by an
  upsert that adds (`ON CONFLICT ... DO UPDATE SET n = n + excluded.n`), never a read-modify-
  write in Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from keyportal.locks import LeaseHeld, lease, lease_renew
from keyportal.notify import staff_alert
from pool.models import ApiKey
from pool.upstream import ProxyClient, UpstreamError
from usage import records as R
from usage.models import (
    SnapshotCursor, SyncRun, UnissuedKeyUsage, UsageBatch, UsageDay, UsageSnapshot,
)
from usage.limits import LimitsReport, limits_enforce
from usage.pricing import PriceBook, cost_of
from usage.rollups import local_day_of, usage_days_rebuild

SYNC_LEASE = "usage-sync"
SYNC_LEASE_TTL = timedelta(minutes=10)
LOOKUP_CHUNK = 500  # stays under SQLite's bound-parameter limit whatever its version
MAX_POPS_PER_PASS = 10_000  # a proxy filling faster than we drain must not pin one pass
KEEP_SYNC_RUNS = 1000
MODES = ("queue", "snapshot")

STATISTICS_OFF = gettext_lazy(
    "Usage statistics are off at the proxy, so it records no usage: turn them on with "
    'PUT /v0/management/usage-statistics-enabled {"value": true}, or set '
    "`usage-statistics-enabled: true` in the proxy's config.yaml."
)


class SyncFailed(Exception):
    """A sync that could not finish; str() is one sentence for a person (never a key)."""


class SyncBusy(SyncFailed):
    """Another sync holds the lease."""


@dataclass
class IngestResult:
    read: int = 0
    stored: int = 0
    foreign: int = 0
    unissued: int = 0
    unreadable: int = 0
    people: set[int] = field(default_factory=set)
    flagged: list[int] = field(default_factory=list)  # pool keys flagged for the first time

    def add(self, other: IngestResult) -> None:
        self.read += other.read
        self.stored += other.stored
        self.foreign += other.foreign
        self.unissued += other.unissued
        self.unreadable += other.unreadable
        self.people |= other.people
        self.flagged += other.flagged


@dataclass
class SyncReport:
    mode: str
    ok: bool
    message: str
    result: IngestResult
    duration: float
    limits: LimitsReport | None = None  # what enforcement did after the pass

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "mode": self.mode, "message": self.message,
            "records_read": self.result.read, "records_stored": self.result.stored,
            "records_foreign": self.result.foreign, "records_unissued": self.result.unissued,
            "records_unreadable": self.result.unreadable,
            "people_touched": len(self.result.people), "duration_seconds": round(self.duration, 3),
            "keys_suspended": self.limits.suspended if self.limits else 0,
        }


# --- ingesting rows ---------------------------------------------------------------------------


_UPSERT_COLUMNS = (
    "api_key_id", "model", "hour", "requests", "failures", "input_tokens", "output_tokens",
    "reasoning_tokens", "cached_tokens", "cache_creation_tokens", "total_tokens", "cost",
)
_COUNTERS = _UPSERT_COLUMNS[3:11]


def _upsert_sql() -> str:
    """One statement both SQLite (3.24+) and PostgreSQL run: add to the row if it exists.
    A NULL cost (unknown price) stays NULL when added to, which is what "unknown" means."""
    q = connection.ops.quote_name
    table = q(UsageSnapshot._meta.db_table)
    columns = ", ".join(q(c) for c in _UPSERT_COLUMNS)
    values = ", ".join(["%s"] * len(_UPSERT_COLUMNS))
    adds = ", ".join(f"{q(c)} = {table}.{q(c)} + excluded.{q(c)}" for c in (*_COUNTERS, "cost"))
    conflict = ", ".join(q(c) for c in ("api_key_id", "model", "hour"))
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({values}) "
        f"ON CONFLICT ({conflict}) DO UPDATE SET {adds}"
    )


def _day_upsert_sql() -> str:
    """The UsageDay twin of `_upsert_sql`: add a person's hour to their local day."""
    q = connection.ops.quote_name
    table = q(UsageDay._meta.db_table)
    columns = ("person_id", "day", "requests", "total_tokens", "cost", "unpriced_requests")
    adds = ", ".join(f"{q(c)} = {table}.{q(c)} + excluded.{q(c)}" for c in columns[2:])
    return (
        f"INSERT INTO {table} ({', '.join(q(c) for c in columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({q('person_id')}, {q('day')}) DO UPDATE SET {adds}"
    )


class KeyIndex:
    """key hash -> (pk, status, owner id) for the portal's keys, looked up once per pass: a
    queue drain sees the same keys in every pop. Misses (foreign keys) are remembered too."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, str, int | None] | None] = {}

    def lookup(self, hashes: Iterable[str]) -> dict[str, tuple[int, str, int | None]]:
        missing = [h for h in hashes if h not in self._known]
        for i in range(0, len(missing), LOOKUP_CHUNK):
            chunk = missing[i : i + LOOKUP_CHUNK]
            self._known.update(dict.fromkeys(chunk))
            for key_hash, pk, status, owner_id in ApiKey.objects.filter(
                key_hash__in=chunk
            ).values_list("key_hash", "pk", "status", "owner_id"):
                self._known[key_hash] = (pk, status, owner_id)
        known = self._known
        return {h: known[h] for h in hashes if known.get(h) is not None}  # type: ignore[misc]


@dataclass
class Books:
    """What one sync pass looks things up in: prices and keys."""

    prices: PriceBook
    keys: KeyIndex

    @classmethod
    def load(cls) -> Books:
        return cls(PriceBook.load(), KeyIndex())


def _ingest_rows(rows: Iterable[R.Row], *, books: Books) -> IngestResult:
    """Adds rows to UsageSnapshot; the caller holds the transaction."""
    result = IngestResult()
    groups: dict[tuple[str, str, str], list[int]] = {}
    last_seen: dict[str, str] = {}
    read = 0
    for row in rows:
        read += 1
        key_hash = row[0]
        group_key = (key_hash, row[1], row[2])
        c = groups.get(group_key)
        if c is None:
            c = groups[group_key] = [0, 0, 0, 0, 0, 0, 0, 0]
        # Unrolled on purpose: this loop runs once per request the proxy served.
        c[0] += 1
        c[1] += row[3]
        c[2] += row[4]
        c[3] += row[5]
        c[4] += row[6]
        c[5] += row[7]
        c[6] += row[8]
        c[7] += row[9]
        if row[10] > last_seen.get(key_hash, ""):
            last_seen[key_hash] = row[10]
    result.read = read
    if not read:
        return result

    keys = books.keys.lookup(last_seen)
    ops = connection.ops
    hour_values: dict[str, Any] = {}
    params = []
    # The person × day rollup moves in the same transaction as the rows it sums.
    days: dict[tuple[int, date], list[Any]] = {}
    local_days: dict[str, date] = {}
    for (key_hash, model, hour), c in groups.items():
        key = keys.get(key_hash)
        if key is None:  # not the portal's key: counted, never stored against anyone
            result.foreign += c[0]
            continue
        pk, status, owner_id = key
        result.stored += c[0]
        if status == ApiKey.Status.POOL:
            result.unissued += c[0]
        elif owner_id is not None:
            result.people.add(owner_id)
        hour_value = hour_values.get(hour)
        if hour_value is None:
            hour_dt = datetime.fromisoformat(hour + ":00:00+00:00")
            hour_value = hour_values[hour] = ops.adapt_datetimefield_value(hour_dt)
            local_days[hour] = local_day_of(hour_dt)
        cost = cost_of(
            books.prices.price_for(model), input_tokens=c[2], output_tokens=c[3],
            cached_tokens=c[5], cache_creation_tokens=c[6], total_tokens=c[7],
        )
        params.append((pk, model, hour_value, *c, None if cost is None else str(cost)))
        if owner_id is not None:
            day_key = (owner_id, local_days[hour])
            d = days.get(day_key)
            if d is None:
                d = days[day_key] = [0, 0, Decimal(0), 0]
            d[0] += c[0]
            d[1] += c[7]
            if cost is None:
                d[3] += c[0]
            else:
                d[2] += cost
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(_upsert_sql(), params)
            if days:
                cursor.executemany(
                    _day_upsert_sql(),
                    [(p, ops.adapt_datefield_value(day), r, t, str(cost), u)
                     for (p, day), (r, t, cost, u) in days.items()],
                )

    as_db = _db_datetime_for(connection.vendor)
    used = {keys[h][0]: as_db(ts) for h, ts in last_seen.items() if h in keys}
    _last_used_forward(used)
    result.flagged = _flag_unissued(
        [pk for h, (pk, status, _o) in keys.items() if status == ApiKey.Status.POOL]
    )
    return result


def _last_used_forward(used: dict[int, Any]) -> None:
    """`last_used_at` only moves forward, whatever order batches arrive in: the comparison is
    in the UPDATE itself, not a read-compare-write. Raw SQL because a batch touches hundreds
    of keys and building one ORM expression per key costs more than the whole ingest."""
    if not used:
        return
    q = connection.ops.quote_name
    column = q(ApiKey._meta.get_field("last_used_at").column)
    sql = (
        f"UPDATE {q(ApiKey._meta.db_table)} SET {column} = %s "
        f"WHERE {q(ApiKey._meta.pk.column)} = %s AND ({column} IS NULL OR {column} < %s)"
    )
    with connection.cursor() as cursor:
        cursor.executemany(sql, [(ts, pk, ts) for pk, ts in used.items()])


def _db_datetime_for(vendor: str) -> Callable[[str], Any]:
    """Turns a row's UTC timestamp (fixed-width RFC 3339, see usage.records) into what the
    database takes. SQLite gets the text Django itself stores, built by slicing: the generic
    adapter costs more per key than the rest of the ingest."""
    if vendor == "sqlite":
        return lambda ts: f"{ts[:10]} {ts[11:26]}"
    return lambda ts: datetime.fromisoformat(f"{ts[:26]}+00:00")


def _flag_unissued(key_ids: list[int]) -> list[int]:
    if not key_ids:
        return []
    known = set(
        UnissuedKeyUsage.objects.filter(api_key_id__in=key_ids).values_list("api_key_id", flat=True)
    )
    fresh = [pk for pk in key_ids if pk not in known]
    UnissuedKeyUsage.objects.bulk_create(
        [UnissuedKeyUsage(api_key_id=pk) for pk in fresh], ignore_conflicts=True
    )
    return fresh


def usage_ingest(*, rows: Sequence[R.Row]) -> IngestResult:
    """Adds already-hashed rows (see usage.records) to the hourly counters, in one transaction."""
    with transaction.atomic():
        return _ingest_rows(rows, books=Books.load())


# --- queue generation -------------------------------------------------------------------------


def usage_batch_store(*, rows: list[R.Row]) -> UsageBatch:
    """Makes a pop durable; committed on return (the first thing done with what was popped)."""
    with transaction.atomic():
        return UsageBatch.objects.create(record_count=len(rows), rows=rows)


def usage_batch_apply(
    *, batch_id: int, now: datetime, rows: list[R.Row] | None = None,
    books: Books | None = None,
) -> IngestResult:
    """Counts a stored batch once: the batch is claimed (applied_at set, only if still unset)
    in the same transaction that adds its counts. `rows` spares re-reading what was just
    stored."""
    with transaction.atomic():
        claimed = UsageBatch.objects.filter(pk=batch_id, applied_at__isnull=True).update(
            applied_at=now, error=""
        )
        if not claimed:
            return IngestResult()
        if rows is None:
            rows = UsageBatch.objects.values_list("rows", flat=True).get(pk=batch_id)
        return _ingest_rows(rows, books=books or Books.load())


def _apply_pending(now: datetime, books: Books) -> IngestResult:
    # Applied batches are kept a while for inspection, then dropped: their counts are in
    # UsageSnapshot, and a busy proxy pops about 150 bytes a request.
    keep = timedelta(days=settings.USAGE_BATCH_KEEP_DAYS)
    UsageBatch.objects.filter(applied_at__lt=now - keep).delete()
    result = IngestResult()
    pending = UsageBatch.objects.filter(applied_at__isnull=True).order_by("pk")
    for batch_id in pending.values_list("pk", flat=True):
        result.add(_apply_or_note(batch_id, now=now, books=books))
    return result


def _apply_or_note(
    batch_id: int, *, now: datetime, books: Books, rows: list[R.Row] | None = None
) -> IngestResult:
    try:
        return usage_batch_apply(batch_id=batch_id, now=now, rows=rows, books=books)
    except Exception as exc:
        # The batch stays pending (its rows are safe) and is retried on the next run.
        UsageBatch.objects.filter(pk=batch_id).update(error=f"{type(exc).__name__}: {exc}"[:500])
        raise SyncFailed(
            _("Usage popped from the proxy was saved but could not be counted yet (%(error)s); "
              "it will be counted on the next run.") % {"error": type(exc).__name__}
        ) from exc


def _sync_queue(client: ProxyClient, now: datetime, books: Books, result: IngestResult) -> None:
    """Drains the queue into `result` (kept up to date, so a failure reports what was done)."""
    count = settings.USAGE_QUEUE_BATCH
    for _pop in range(MAX_POPS_PER_PASS):
        popped = usage_queue_body_ingest(
            body=client.usage_queue_pop_raw(count=count), now=now, books=books
        )
        result.add(popped)
        if popped.read + popped.unreadable < count:
            break


def usage_queue_body_ingest(*, body: bytes, now: datetime, books: Books) -> IngestResult:
    """One popped `/usage-queue` answer: stored (committed) first, then counted."""
    try:
        rows, bad = R.queue_rows(body)
    except UpstreamError as exc:
        raise SyncFailed(
            _("%(reason)s What it popped (%(size)d bytes) could not be read and is gone "
              "from the proxy.") % {"reason": exc, "size": len(body)}
        ) from None
    result = IngestResult(unreadable=bad)
    if rows:
        batch = usage_batch_store(rows=rows)
        result.add(_apply_or_note(batch.pk, now=now, books=books, rows=rows))
    return result


# --- snapshot generation ----------------------------------------------------------------------


def usage_snapshot_ingest(*, apis: Any) -> IngestResult:
    """Counts what is new in a cumulative `/usage` snapshot since the cursors, and moves the
    cursors, in one transaction: a second run right after finds nothing new, and a restarted
    proxy (lists shorter, or a different detail where the cursor points) is read from zero."""
    cursors = {
        (c.key_hash, c.model): (c.seen, c.last_timestamp) for c in SnapshotCursor.objects.all()
    }
    plan: list[tuple[str, str, list[Any], int]] = []
    moved: list[SnapshotCursor] = []
    for key_hash, model, details in R.snapshot_entries(apis):
        n = len(details)
        if not n:
            continue
        seen, last_ts = cursors.get((key_hash, model), (0, ""))
        start = 0
        if 0 < seen <= n and _timestamp_of(details[seen - 1]) == last_ts:
            start = seen
        if start == n:
            continue
        plan.append((key_hash, model, details, start))
        moved.append(SnapshotCursor(
            key_hash=key_hash, model=model, seen=n, last_timestamp=_timestamp_of(details[-1])
        ))
    with transaction.atomic():
        # Rows are made as they are counted: a snapshot can hold millions of details.
        result = _ingest_rows(R.snapshot_rows(plan), books=Books.load())
        SnapshotCursor.objects.bulk_create(
            moved, batch_size=LOOKUP_CHUNK // 5, update_conflicts=True,
            unique_fields=["key_hash", "model"],
            update_fields=["seen", "last_timestamp", "updated_at"],
        )
    return result


def _timestamp_of(detail: Any) -> str:
    ts = detail.get("timestamp") if type(detail) is dict else None
    return ts[:64] if isinstance(ts, str) else ""


def _sync_snapshot(client: ProxyClient) -> IngestResult:
    snapshot = client.usage_snapshot()
    return usage_snapshot_ingest(apis=snapshot.apis)


# --- the sync ---------------------------------------------------------------------------------


@contextmanager
def sync_lease() -> Iterator[Callable[[], None]]:
    """Holds the sync lease (never waits); yields a function that renews it, for loops."""
    try:
        with lease(SYNC_LEASE, ttl=SYNC_LEASE_TTL) as holder:
            yield lambda: lease_renew(name=SYNC_LEASE, holder=holder, ttl=SYNC_LEASE_TTL)
    except LeaseHeld:
        raise SyncBusy(_("Another usage sync is running; not starting a second one.")) from None


def usage_sync(*, mode: str | None = None) -> SyncReport:
    """One sync, under the lease. Raises SyncBusy when another sync runs, SyncFailed (after
    recording the failure) when this one could not finish."""
    with sync_lease():
        return usage_sync_pass(mode=mode)


def usage_sync_pass(*, mode: str | None = None, now: datetime | None = None) -> SyncReport:
    """One pass; the caller holds the lease (usage_sync, or the --follow loop). After the
    usage is stored, limits are enforced as of `now` (default: the clock; tests freeze it)."""
    started, clock = timezone.now(), time.monotonic()
    mode = mode or settings.CLIPROXY_USAGE_MODE
    result = IngestResult()
    try:
        books = Books.load()
        # What an earlier run popped but did not count comes first, and needs no proxy.
        result.add(_apply_pending(started, books))
        with ProxyClient.from_settings() as client:
            # First call: a wrong management key stops here, after one request.
            enabled = client.usage_statistics_enabled()
            if mode not in MODES:
                mode = client.usage_mode()
            if mode == "queue":
                _sync_queue(client, started, books, result)
            else:
                result.add(_sync_snapshot(client))
    except (UpstreamError, SyncFailed) as exc:
        _record(started, clock, mode, False, str(exc), result)
        raise SyncFailed(str(exc)) from exc
    finally:
        _notify_unissued()
    ok, message = True, ""
    if not enabled:
        ok, message = False, str(STATISTICS_OFF)
    elif result.unreadable:
        ok, message = False, _(
            "%(n)d usage records from the proxy were malformed and could not be counted."
        ) % {"n": result.unreadable}
    # Enforced only on what a finished pass stored, and before the run is recorded so that
    # the status page's "last sync" includes it. The suspensions are committed in the portal
    # before the proxy is asked; a proxy that does not answer follows at the next reconcile.
    limits = limits_enforce(now=now or timezone.now())
    report = SyncReport(mode, ok, message, result, time.monotonic() - clock, limits)
    _record(started, clock, mode, ok, message, result)
    return report


def _record(
    started: datetime, clock: float, mode: str, ok: bool, message: str, result: IngestResult
) -> None:
    run = SyncRun.objects.create(
        started_at=started, finished_at=timezone.now(), ok=ok,
        mode=mode if mode in MODES else "", message=message, records_read=result.read,
        records_stored=result.stored, records_foreign=result.foreign,
        records_unissued=result.unissued, people=len(result.people),
        duration_ms=int((time.monotonic() - clock) * 1000),
    )
    SyncRun.objects.filter(pk__lte=run.pk - KEEP_SYNC_RUNS).delete()


def _notify_unissued() -> None:
    """Tells staff (email and webhook), once per key, that a key nobody was given is used."""
    pending = list(
        UnissuedKeyUsage.objects.filter(notified_at__isnull=True).values_list("pk", "api_key_id")
    )
    if not pending:
        return
    masked = [k.masked for k in ApiKey.objects.filter(pk__in=[key for _pk, key in pending])]
    delivered = staff_alert(
        event="unissued_key_used",
        subject=_("Key Portal: usage on keys nobody was given"),
        body=_(
            "sync_usage found usage on pool keys that have not been handed to anyone:\n\n"
            "%(keys)s\n\nSomebody holds a copy of these keys. Consider revoking them in the "
            "admin (API keys, filtered by status \"in the pool\")."
        ) % {"keys": "\n".join(f"  {m}" for m in masked)},
        data={"keys": masked},  # masked: the webhook never sees a whole key
    )
    if not delivered:
        return  # told as soon as a channel (somebody to email, the webhook) takes it
    UnissuedKeyUsage.objects.filter(pk__in=[pk for pk, _key in pending]).update(
        notified_at=timezone.now()
    )


# --- cost -------------------------------------------------------------------------------------


def usage_cost_recompute(*, models: Sequence[str] | None = None) -> int:
    """Recomputes the cost of past usage from the current price table (after a price
    change): every row, or the rows of the given models. Returns how many rows changed."""
    prices = PriceBook.load()
    rows = UsageSnapshot.objects.all()
    if models is not None:
        rows = rows.filter(model__in=list(models))
    changed = 0
    with transaction.atomic():
        for model in rows.values_list("model", flat=True).distinct().order_by():
            price = prices.price_for(model)
            for chunk in _chunks(rows.filter(model=model).values_list(
                "pk", "input_tokens", "output_tokens", "cached_tokens", "cache_creation_tokens",
                "total_tokens", "cost",
            ).iterator(chunk_size=2000)):
                updates = []
                for pk, inp, out, cached, creation, total, old in chunk:
                    new = cost_of(
                        price, input_tokens=inp, output_tokens=out, cached_tokens=cached,
                        cache_creation_tokens=creation, total_tokens=total,
                    )
                    if new != old:
                        updates.append(UsageSnapshot(pk=pk, cost=new))
                UsageSnapshot.objects.bulk_update(updates, ["cost"], batch_size=LOOKUP_CHUNK)
                changed += len(updates)
        if changed:
            # The per-person × day rollup sums cost too: rebuilt with the rows it sums, so
            # the leaderboard never shows the old prices.
            usage_days_rebuild()
    return changed


def _chunks(items: Any, size: int = 2000) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

