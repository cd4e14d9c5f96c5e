"""Writes on usage: ingesting rows from either proxy generation, syncing from the proxy, and
recomputing cost.

How a sync survives the proxy, kills and bad data (../shared/docs/cliproxyapi-contract.md):
- queue (`/usage-queue`, destructive): each popped body is sealed and committed as a
  UsageBatch the moment it arrives, before it is parsed; counting marks the batch applied
  (and drops the body) in the same transaction that adds its counts. A run killed anywhere
  after the body arrived leaves a pending batch that the next run counts first: nothing lost,
  nothing counted twice. Only the network read itself can lose a pop (the proxy removed it
  before answering): that is the proxy's limit.
- snapshot (`/usage`, cumulative): per (key, model) cursors say how much of each list of
  details is already counted (see SnapshotCursor); counts and cursors move in one transaction,
  fenced by the sync lease.
- a record that cannot be counted is quarantined (QuarantinedRecord) and the rest of its
  batch is counted: first by the checks in usage.records, then, for anything the database
  still refuses, by splitting the batch until the refused rows are found.
- one sync at a time across processes (the `usage-sync` lease, which dies with its holder),
  and every counter moves by an upsert that adds (`ON CONFLICT ... DO UPDATE SET n = n +
  excluded.n`), never a read-modify-write in Python. On PostgreSQL a batch is a handful of
  statements over arrays (`unnest`), not one statement per row.
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
from django.core.cache import cache
from django.db import DataError, IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from keyportal.locks import Held, LeaseHeld, LeaseLost, lease
from keyportal.notify import staff_alert
from pool.escrow import EscrowUnreadable, body_open, body_seal
from pool.models import ApiKey
from pool.services import keys_lock
from pool.upstream import ProxyClient, UpstreamError, UpstreamTooLarge, UpstreamUnexpected
from usage import records as R
from usage.models import (
    QuarantinedRecord, SnapshotCursor, SyncRun, UnissuedKeyUsage, UsageBatch, UsageDay,
    UsageSnapshot,
)
from usage.limits import LimitsReport, limits_enforce
from usage.pricing import PriceBook, cost_of
from usage.rollups import local_day_of, usage_days_rebuild

SYNC_LEASE = "usage-sync"
SYNC_LEASE_TTL = timedelta(seconds=30)  # renewed by a heartbeat; a dead holder frees it
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
    quarantined: int = 0
    people: set[int] = field(default_factory=set)
    answer_error: str = ""  # the popped answer as a whole was not a list of records
    flagged: list[int] = field(default_factory=list)  # pool keys flagged for the first time

    def add(self, other: IngestResult) -> None:
        self.read += other.read
        self.stored += other.stored
        self.foreign += other.foreign
        self.unissued += other.unissued
        self.quarantined += other.quarantined
        self.answer_error = self.answer_error or other.answer_error
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
            "records_quarantined": self.result.quarantined,
            "people_touched": len(self.result.people), "duration_seconds": round(self.duration, 3),
            "keys_suspended": self.limits.suspended if self.limits else 0,
        }


# --- ingesting rows ---------------------------------------------------------------------------


_UPSERT_COLUMNS = (
    "api_key_id", "model", "hour", "requests", "failures", "input_tokens", "output_tokens",
    "reasoning_tokens", "cached_tokens", "cache_creation_tokens", "total_tokens", "cost",
)
_COUNTERS = _UPSERT_COLUMNS[3:11]
_DAY_COLUMNS = ("person_id", "day", "requests", "total_tokens", "cost", "unpriced_requests")


def _upsert_sql(table: str, columns: Sequence[str], conflict: Sequence[str],
                adds: Sequence[str], *, arrays: Sequence[str] = ()) -> str:
    """`INSERT ... ON CONFLICT (...) DO UPDATE SET n = n + excluded.n`, which SQLite (3.24+)
    and PostgreSQL both run. A NULL cost (unknown price) stays NULL when added to, which is
    what "unknown" means. With `arrays` (PostgreSQL), the rows come as one array per column
    through `unnest`: one statement and one round trip for a whole batch."""
    q = connection.ops.quote_name
    table = q(table)
    add = ", ".join(f"{q(c)} = {table}.{q(c)} + excluded.{q(c)}" for c in adds)
    if arrays:
        source = "SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in arrays) + ")"
    else:
        source = f"VALUES ({', '.join(['%s'] * len(columns))})"
    return (
        f"INSERT INTO {table} ({', '.join(q(c) for c in columns)}) {source} "
        f"ON CONFLICT ({', '.join(q(c) for c in conflict)}) DO UPDATE SET {add}"
    )


_PG_TYPES = {
    "usage": ("bigint", "text", "timestamptz", *["bigint"] * 8, "numeric"),
    "day": ("bigint", "date", "bigint", "bigint", "numeric", "bigint"),
}


def _pg_array(values: Iterable[Any], kind: str = "text") -> str:
    """A PostgreSQL array literal of numbers, dates, times or text (None is NULL), built
    here because the driver's per-element adaptation costs more than the whole upsert. Text
    is quoted and escaped; the texts here passed usage.records' checks (no NUL). Integers,
    dates and ISO times need no quotes."""
    if kind in ("bigint", "date", "timestamptz"):
        return "{" + ",".join(map(str, values)) + "}"
    items = []
    for v in values:
        if v is None:
            items.append("NULL")
        elif type(v) is int:
            items.append(str(v))
        else:
            text = str(v)
            if '"' in text or "\\" in text:
                text = text.replace("\\", "\\\\").replace('"', '\\"')
            items.append(f'"{text}"')
    return "{" + ",".join(items) + "}"


def _write(cursor: Any, kind: str, params: list[tuple[Any, ...]]) -> None:
    """Adds `params` (one tuple per row) to UsageSnapshot (`kind` "usage") or UsageDay."""
    if kind == "usage":
        table, columns = UsageSnapshot._meta.db_table, _UPSERT_COLUMNS
        conflict, adds = ("api_key_id", "model", "hour"), (*_COUNTERS, "cost")
    else:
        table, columns = UsageDay._meta.db_table, _DAY_COLUMNS
        conflict, adds = ("person_id", "day"), _DAY_COLUMNS[2:]
    if connection.vendor == "postgresql":
        sql = _upsert_sql(table, columns, conflict, adds, arrays=_PG_TYPES[kind])
        cursor.execute(sql, [
            _pg_array(column, pg_type)
            for column, pg_type in zip(zip(*params), _PG_TYPES[kind])
        ])
    else:
        cursor.executemany(_upsert_sql(table, columns, conflict, adds), params)


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
    reader: R.QueueReader = field(default_factory=R.QueueReader)

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
    to_db = _hour_for(connection.vendor)
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
            hour_value = hour_values[hour] = to_db(hour_dt)
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
    as_db = _db_datetime_for(connection.vendor)
    used = {keys[h][0]: as_db(ts) for h, ts in last_seen.items() if h in keys}
    if params:
        with connection.cursor() as cursor:
            _write(cursor, "usage", params)
            if days:
                day_of = connection.ops.adapt_datefield_value
                _write(cursor, "day", [
                    (p, day if connection.vendor == "postgresql" else day_of(day), r, t,
                     str(cost), u)
                    for (p, day), (r, t, cost, u) in days.items()
                ])
    # Last in the transaction, after the lock every multi-row key writer takes first (see
    # pool.services.keys_lock): a revoke's reconcile and a sync never wait on each other in
    # a circle, and the lock is held only until this batch commits.
    _last_used_forward(used)
    result.flagged = _flag_unissued(
        [pk for h, (pk, status, _o) in keys.items() if status == ApiKey.Status.POOL]
    )
    return result


def _hour_for(vendor: str) -> Callable[[datetime], Any]:
    if vendor == "postgresql":
        return lambda dt: dt.isoformat()  # an element of an array literal (see _pg_array)
    return connection.ops.adapt_datetimefield_value


def _last_used_forward(used: dict[int, Any]) -> None:
    """`last_used_at` only moves forward, whatever order batches arrive in: the comparison is
    in the UPDATE itself, not a read-compare-write. Raw SQL because a batch touches hundreds
    of keys and building one ORM expression per key costs more than the whole ingest."""
    if not used:
        return
    keys_lock()
    q = connection.ops.quote_name
    table = q(ApiKey._meta.db_table)
    column = q(ApiKey._meta.get_field("last_used_at").column)
    pk = q(ApiKey._meta.pk.column)
    ordered = sorted(used.items())
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"UPDATE {table} AS k SET {column} = v.ts "
                "FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, ts) "
                f"WHERE k.{pk} = v.id AND (k.{column} IS NULL OR k.{column} < v.ts)",
                [_pg_array((i for i, _ts in ordered), "bigint"),
                 _pg_array((ts for _i, ts in ordered), "timestamptz")],
            )
        else:
            cursor.executemany(
                f"UPDATE {table} SET {column} = %s "
                f"WHERE {pk} = %s AND ({column} IS NULL OR {column} < %s)",
                [(ts, i, ts) for i, ts in ordered],
            )


def _db_datetime_for(vendor: str) -> Callable[[str], Any]:
    """Turns a row's UTC timestamp (fixed-width RFC 3339, see usage.records) into what the
    database takes. SQLite gets the text Django itself stores, built by slicing: the generic
    adapter costs more per key than the rest of the ingest."""
    if vendor == "sqlite":
        return lambda ts: f"{ts[:10]} {ts[11:26]}"
    return lambda ts: f"{ts[:26]}Z"  # an element of an array literal (see _pg_array)


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


# What the database may still refuse in a row that passed usage.records' checks (a counter
# that a sum would push past int64, text a backend will not take): the row is quarantined.
# Anything else (the database away or locked, a bug) leaves the batch pending for a retry.
_REFUSED = (DataError, IntegrityError, OverflowError, UnicodeError)


def _ingest_guarded(
    rows: list[R.Row], *, books: Books, aside: list[R.Quarantined]
) -> IngestResult:
    """`_ingest_rows`, where a batch the database refuses is split in halves (each in its own
    savepoint) until the refused rows are found; they go to `aside`, the rest is counted."""
    try:
        with transaction.atomic():
            return _ingest_rows(rows, books=books)
    except _REFUSED as exc:
        if len(rows) <= 1:
            reason = f"refused by the database ({type(exc).__name__})"
            aside.extend(R.Quarantined(reason, R.record_text(row), row[0]) for row in rows)
            return IngestResult(read=len(rows))
    # Key lookups made in the rolled-back savepoint stay valid: they were reads.
    half = len(rows) // 2
    result = _ingest_guarded(rows[:half], books=books, aside=aside)
    result.add(_ingest_guarded(rows[half:], books=books, aside=aside))
    return result


def _quarantine(aside: list[R.Quarantined], *, source: str, batch_id: int | None = None) -> None:
    QuarantinedRecord.objects.bulk_create(
        [QuarantinedRecord(source=source, batch_id=batch_id, reason=q.reason[:200],
                           key_hash=q.key_hash, record=q.record) for q in aside],
        batch_size=LOOKUP_CHUNK,
    )


def usage_ingest(*, rows: Sequence[R.Row]) -> IngestResult:
    """Adds already-hashed rows (see usage.records) to the hourly counters, in one transaction."""
    with transaction.atomic():
        return _ingest_rows(rows, books=Books.load())


# --- queue generation -------------------------------------------------------------------------


def usage_pop_store(*, body: bytes) -> int:
    """The first thing done with a popped body, before parsing it: sealed and committed.
    Returns the batch's id."""
    with transaction.atomic():
        return UsageBatch.objects.create(raw=body_seal(body), size=len(body)).pk


def _queue_rows(
    body: bytes, reader: R.QueueReader | None = None
) -> tuple[list[R.Row], list[R.Quarantined], str]:
    """Rows, records set aside, and why the answer as a whole could not be read (if so)."""
    try:
        return (*R.queue_rows(body, reader), "")
    except UpstreamUnexpected as exc:
        # Nothing in it can be told apart; it is not kept either, as it may hold keys.
        return [], [R.Quarantined(f"{exc} ({len(body)} bytes, not kept)"[:200], "")], str(exc)


def usage_batch_apply(
    *, batch_id: int, now: datetime, body: bytes | None = None, books: Books | None = None,
) -> IngestResult:
    """Counts a stored batch once: the batch is claimed (applied_at set and its body dropped,
    only if still unset) in the same transaction that adds its counts and files what had to
    be set aside. `body` spares re-reading and opening what was just stored. Raises
    EscrowUnreadable when the stored body was sealed with another secret."""
    rows: list[R.Row]
    if body is None:
        raw, legacy = UsageBatch.objects.values_list("raw", "rows").get(pk=batch_id)
        if raw is not None:
            body = body_open(raw)
    books = books or Books.load()
    if body is None:
        rows, aside, answer_error = legacy or [], [], ""
    else:
        rows, aside, answer_error = _queue_rows(body, books.reader)
    with transaction.atomic():
        claimed = UsageBatch.objects.filter(pk=batch_id, applied_at__isnull=True).update(
            applied_at=now, raw=None, rows=None, error="", record_count=len(rows) + len(aside),
        )
        if not claimed:
            return IngestResult()
        unread = len(aside)  # set aside before counting; the rest are in `rows`
        result = _ingest_guarded(rows, books=books, aside=aside)
        if aside:
            _quarantine(aside, source=QuarantinedRecord.Source.QUEUE, batch_id=batch_id)
            UsageBatch.objects.filter(pk=batch_id).update(quarantined=len(aside))
    result.read += unread
    result.quarantined = len(aside)
    result.answer_error = answer_error
    return result


def _apply_pending(now: datetime, books: Books) -> tuple[IngestResult, int]:
    """Counts what earlier runs stored but did not count. Returns the result and how many
    stored bodies cannot be opened (the escrow secret changed): those stay pending, so that
    they are counted once the secret is put back."""
    # Applied batches are kept a while for inspection, then dropped: their counts are in
    # UsageSnapshot.
    keep = timedelta(days=settings.USAGE_BATCH_KEEP_DAYS)
    UsageBatch.objects.filter(applied_at__lt=now - keep).delete()
    result, sealed = IngestResult(), 0
    pending = UsageBatch.objects.filter(applied_at__isnull=True).order_by("pk")
    for batch_id in pending.values_list("pk", flat=True):
        try:
            result.add(_apply_or_note(batch_id, now=now, books=books))
        except EscrowUnreadable:
            sealed += 1
            UsageBatch.objects.filter(pk=batch_id).update(error=str(BODY_SEALED))
    return result, sealed


BODY_SEALED = gettext_lazy(
    "This stored pop was sealed with another PORTAL_ESCROW_KEY (or SECRET_KEY); put that "
    "secret back and the next sync counts it."
)


def _apply_or_note(
    batch_id: int, *, now: datetime, books: Books, body: bytes | None = None
) -> IngestResult:
    try:
        return usage_batch_apply(batch_id=batch_id, now=now, body=body, books=books)
    except EscrowUnreadable:
        raise
    except Exception as exc:
        # The batch stays pending (its body is safe) and is retried on the next run.
        UsageBatch.objects.filter(pk=batch_id).update(error=f"{type(exc).__name__}: {exc}"[:500])
        raise SyncFailed(
            _("Usage popped from the proxy was saved but could not be counted yet (%(error)s); "
              "it will be counted on the next run.") % {"error": type(exc).__name__}
        ) from exc


# The pop size in use when it had to shrink below USAGE_QUEUE_BATCH (shared by every sync
# process; forgotten after a day, when USAGE_QUEUE_BATCH is tried again).
POP_SIZE_CACHE_KEY = "usage:queue:pop-size"
POP_SIZE_KEEP = 24 * 60 * 60


def usage_pop_size() -> int:
    """Records to ask for in the next /usage-queue pop: USAGE_QUEUE_BATCH, or less when pops
    had to shrink to stay under CLIPROXY_MAX_ANSWER_BYTES."""
    shrunk = cache.get(POP_SIZE_CACHE_KEY)
    if isinstance(shrunk, int) and 0 < shrunk < settings.USAGE_QUEUE_BATCH:
        return shrunk
    return settings.USAGE_QUEUE_BATCH


def _pop_size_after(*, count: int, read: int, size: int) -> int:
    """The next pop's size, at the bytes per record this pop showed: at most what keeps an
    answer under half of CLIPROXY_MAX_ANSWER_BYTES. A pop refused over the cap is lost (the
    proxy removed its records when it answered), so the size shrinks before that happens:
    records that grow (long fail bodies, new fields) make the pops smaller, not lost."""
    if read <= 0 or size <= 0:
        return count
    fits = max(1, settings.CLIPROXY_MAX_ANSWER_BYTES // 2 * read // size)
    if fits < count:
        cache.set(POP_SIZE_CACHE_KEY, fits, POP_SIZE_KEEP)
        return fits
    return count


def _sync_queue(client: ProxyClient, now: datetime, books: Books, result: IngestResult,
                held: Held | None) -> None:
    """Drains the queue into `result` (kept up to date, so a failure reports what was done)."""
    count = usage_pop_size()
    for _pop in range(MAX_POPS_PER_PASS):
        if held is not None and held.lost.is_set():
            raise LeaseLost(SYNC_LEASE)  # another sync took over: it drains from here
        try:
            body = client.usage_queue_pop_raw(count=count)
        except UpstreamTooLarge as exc:
            smaller = max(1, count // 4)
            cache.set(POP_SIZE_CACHE_KEY, smaller, POP_SIZE_KEEP)
            raise SyncFailed(_(
                "%(reason)s The records of that pop of %(count)d are gone from the proxy; the "
                "next pops ask for %(smaller)d records at a time."
            ) % {"reason": exc, "count": count, "smaller": smaller}) from None
        popped = usage_queue_body_ingest(body=body, now=now, books=books)
        result.add(popped)
        if popped.answer_error:
            raise SyncFailed(_(
                "%(reason)s It was set aside (Usage → Quarantined usage records); usage already "
                "counted is safe, and the next sync starts afresh."
            ) % {"reason": popped.answer_error})
        if popped.read < count:
            break
        count = _pop_size_after(count=count, read=popped.read, size=len(body))


def usage_queue_body_ingest(*, body: bytes, now: datetime, books: Books) -> IngestResult:
    """One popped `/usage-queue` answer: stored (committed) first, then counted."""
    if body.strip() == b"[]":
        return IngestResult()  # an empty pop holds nothing to keep
    batch_id = usage_pop_store(body=body)
    return _apply_or_note(batch_id, now=now, books=books, body=body)


# --- snapshot generation ----------------------------------------------------------------------


def usage_snapshot_ingest(*, apis: Any, fence: Callable[[], None] | None = None) -> IngestResult:
    """Counts what is new in a cumulative `/usage` snapshot since the cursors, and moves the
    cursors, in one transaction: a second run right after finds nothing new, and a restarted
    proxy (lists shorter, or a different detail where the cursor points) is read from zero.
    `fence` (the sync lease's) runs inside that transaction: a sync that lost its lease
    commits nothing, so two syncs never count the same tail."""
    books = Books.load()
    with transaction.atomic():
        if fence is not None:
            fence()
        # The cursors are read inside the fenced transaction: a sync that took the lease
        # over from a frozen one sees what that one committed, never a stale plan.
        cursors = {
            (c.key_hash, c.model): (c.seen, c.last_timestamp)
            for c in SnapshotCursor.objects.all()
        }
        plan: list[tuple[str, str, list[Any], int, str, str]] = []
        moved: list[SnapshotCursor] = []
        for key_hash, model, details, key, reason in R.snapshot_entries(apis):
            n = len(details)
            seen, last_ts = cursors.get((key_hash, model), (0, ""))
            start = 0
            if 0 < seen <= n and _timestamp_of(details[seen - 1]) == last_ts:
                start = seen
            if start == n:
                continue
            plan.append((key_hash, model, details, start, key, reason))
            moved.append(SnapshotCursor(
                key_hash=key_hash, model=model, seen=n,
                last_timestamp=_timestamp_of(details[-1]),
            ))
        aside: list[R.Quarantined] = []
        try:
            with transaction.atomic():
                # Rows are made as they are counted: a snapshot can hold millions of details.
                result = _ingest_rows(R.snapshot_rows(plan, aside), books=books)
            unread = len(aside)
        except _REFUSED:
            aside = []
            rows = list(R.snapshot_rows(plan, aside))
            unread = len(aside)
            result = _ingest_guarded(rows, books=books, aside=aside)
        result.read += unread
        result.quarantined = len(aside)
        _quarantine(aside, source=QuarantinedRecord.Source.SNAPSHOT)
        SnapshotCursor.objects.bulk_create(
            moved, batch_size=LOOKUP_CHUNK // 5, update_conflicts=True,
            unique_fields=["key_hash", "model"],
            update_fields=["seen", "last_timestamp", "updated_at"],
        )
    return result


def _timestamp_of(detail: Any) -> str:
    ts = detail.get("timestamp") if type(detail) is dict else None
    if not isinstance(ts, str):
        return ""
    try:
        return R.check_text(ts[:64], "timestamp")
    except R.BadRecord:
        return ascii(ts)[1:65]  # a form any database stores, compared the same way each run


def _sync_snapshot(client: ProxyClient, held: Held | None) -> IngestResult:
    snapshot = client.usage_snapshot()
    return usage_snapshot_ingest(apis=snapshot.apis, fence=held.fence if held else None)


# --- the sync ---------------------------------------------------------------------------------


@contextmanager
def sync_lease() -> Iterator[Held]:
    """Holds the sync lease (never waits) for the block, renewed by its heartbeat."""
    try:
        with lease(SYNC_LEASE, ttl=SYNC_LEASE_TTL) as held:
            yield held
    except LeaseHeld:
        raise SyncBusy(_("Another usage sync is running; not starting a second one.")) from None


def usage_sync(*, mode: str | None = None) -> SyncReport:
    """One sync, under the lease. Raises SyncBusy when another sync runs, SyncFailed (after
    recording the failure) when this one could not finish."""
    with sync_lease() as held:
        return usage_sync_pass(mode=mode, held=held)


def usage_sync_pass(
    *, mode: str | None = None, now: datetime | None = None, held: Held | None = None
) -> SyncReport:
    """One pass; the caller holds the lease (usage_sync, or the --follow loop) and passes it
    as `held`. After the usage is stored, limits are enforced as of `now` (default: the
    clock; tests freeze it)."""
    started, clock = timezone.now(), time.monotonic()
    mode = mode or settings.CLIPROXY_USAGE_MODE
    result = IngestResult()
    try:
        books = Books.load()
        # What an earlier run popped but did not count comes first, and needs no proxy.
        pending, sealed = _apply_pending(started, books)
        result.add(pending)
        with ProxyClient.from_settings() as client:
            # First call: a wrong management key stops here, after one request.
            enabled = client.usage_statistics_enabled()
            if mode not in MODES:
                mode = client.usage_mode()
            if mode == "queue":
                _sync_queue(client, started, books, result, held)
            else:
                result.add(_sync_snapshot(client, held))
    except LeaseLost:
        message = _("Another usage sync took over the lease while this one ran; it stopped "
                    "and left the rest to that one.")
        _record(started, clock, mode, False, message, result)
        raise SyncFailed(message) from None
    except (UpstreamError, SyncFailed) as exc:
        _record(started, clock, mode, False, str(exc), result)
        raise SyncFailed(str(exc)) from exc
    finally:
        _notify_unissued()
    ok, messages = True, []
    if not enabled:
        ok = False
        messages.append(str(STATISTICS_OFF))
    if sealed:
        ok = False
        messages.append(_("%(n)d stored pops cannot be opened: %(why)s")
                        % {"n": sealed, "why": BODY_SEALED})
    if result.quarantined:
        messages.append(_(
            "%(n)d usage records could not be counted and were set aside (Usage → Quarantined "
            "usage records in the admin); the rest was counted."
        ) % {"n": result.quarantined})
    message = " ".join(messages)
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
        records_unissued=result.unissued, records_quarantined=result.quarantined,
        people=len(result.people), duration_ms=int((time.monotonic() - clock) * 1000),
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

