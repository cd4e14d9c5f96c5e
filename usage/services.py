"""Writes on usage: ingesting rows from either proxy generation, syncing from the proxy, and
recomputing cost.

How a sync survives the proxy, kills and bad data (../shared/docs/cliproxyapi-contract.md):
- queue (`/usage-queue`, destructive): each popped body streams into a spool file
  (usage/spool.py), sealed and fsynced before the database is touched; then it is stored as
  a sealed UsageBatch (named after its spool file, so a file is never stored twice) and
  counted, and the file is removed. Counting marks the batch applied (and drops the body) in
  the same transaction that adds its counts. A run killed anywhere after the body reached
  the spool leaves a file or a pending batch that the next run counts first: nothing lost,
  nothing counted twice. Only the part of an answer still on the wire can be lost.
- the database failing (locked past SQLite's busy timeout, a full disk, PostgreSQL down):
  writes are retried for USAGE_DB_RETRY_SECONDS, then pops go on into the spool only and the
  run ends with DatabaseUnavailable (one sentence: how many records wait in the spool).
- a stop request (`stop`, set by SIGTERM or Ctrl-C) ends a pass after the pop in hand.
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

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache import cache
from django.db import (
    DatabaseError, DataError, IntegrityError, InterfaceError, OperationalError, connection,
    transaction,
)
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from keyportal.locks import Held, LeaseHeld, LeaseLost, lease
from keyportal.notify import staff_alert
from pool.escrow import EscrowUnreadable, body_open, body_seal
from pool.models import ApiKey
from pool.services import keys_lock
from pool.upstream import ProxyClient, UpstreamError, UpstreamUnexpected, UpstreamUnreachable
from pool.upstreams.registry import cliproxyapi_endpoint, relays
from usage import records as R
from usage import spool
from usage.relays import relay_usage_sync
from usage.models import (
    QuarantinedRecord, SnapshotCursor, SyncRun, UnissuedKeyUsage, UsageBatch, UsageDay,
    UsageModelDay, UsageSnapshot,
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
    incomplete: int = 0  # requests whose counts the proxy lost: their cost is a lower bound
    people: set[int] = field(default_factory=set)
    answer_error: str = ""  # the popped answer as a whole was not a list of records
    flagged: list[int] = field(default_factory=list)  # pool keys flagged for the first time

    def add(self, other: IngestResult) -> None:
        self.read += other.read
        self.stored += other.stored
        self.foreign += other.foreign
        self.unissued += other.unissued
        self.quarantined += other.quarantined
        self.incomplete += other.incomplete
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
    notes: list[str] = field(default_factory=list)  # sentences for the output (pop size)
    stopped: bool = False  # a stop request (SIGTERM, Ctrl-C) ended the pass early

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "mode": self.mode, "message": self.message,
            "records_read": self.result.read, "records_stored": self.result.stored,
            "records_foreign": self.result.foreign, "records_unissued": self.result.unissued,
            "records_quarantined": self.result.quarantined,
            "records_incomplete": self.result.incomplete,
            "people_touched": len(self.result.people), "duration_seconds": round(self.duration, 3),
            "keys_suspended": self.limits.suspended if self.limits else 0,
        }


# --- ingesting rows ---------------------------------------------------------------------------


_UPSERT_COLUMNS = (
    "api_key_id", "model", "hour", "requests", "failures", "input_tokens", "output_tokens",
    "reasoning_tokens", "cached_tokens", "cache_creation_tokens", "total_tokens",
    "incomplete_requests", "cost",
)
_COUNTERS = _UPSERT_COLUMNS[3:12]
_DAY_COLUMNS = ("person_id", "day", "requests", "total_tokens", "cost", "unpriced_requests",
                "incomplete_requests")
_MODEL_DAY_COLUMNS = ("day", "model", "requests", "total_tokens", "cost", "unpriced_requests",
                      "incomplete_requests", "input_tokens", "cached_tokens",
                      "cache_creation_tokens")


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
    "usage": ("bigint", "text", "timestamptz", *["bigint"] * 9, "numeric"),
    "day": ("bigint", "date", "bigint", "bigint", "numeric", "bigint", "bigint"),
    "model_day": ("date", "text", "bigint", "bigint", "numeric", *["bigint"] * 5),
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
    """Adds `params` (one tuple per row) to UsageSnapshot (`kind` "usage"), UsageDay ("day")
    or UsageModelDay ("model_day")."""
    if kind == "usage":
        table, columns = UsageSnapshot._meta.db_table, _UPSERT_COLUMNS
        conflict, adds = ("api_key_id", "model", "hour"), (*_COUNTERS, "cost")
    elif kind == "model_day":
        table, columns = UsageModelDay._meta.db_table, _MODEL_DAY_COLUMNS
        conflict, adds = ("day", "model"), _MODEL_DAY_COLUMNS[2:]
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


def _day_sums_add(sums: list[Any], c: list[int], cost: Decimal | None) -> None:
    """Adds one hourly row to a day rollup's sums (UsageDay's and UsageModelDay's first five
    columns): requests, total tokens, known cost, unpriced requests, incomplete requests."""
    sums[0] += c[0]
    sums[1] += c[7]
    sums[4] += c[8]
    if cost is None:
        sums[3] += c[0]
    else:
        sums[2] += cost


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
            c = groups[group_key] = [0, 0, 0, 0, 0, 0, 0, 0, 0]
        # Unrolled on purpose: this loop runs once per request the proxy served. The row is
        # the token split (usage.records): requests, failures, uncached input, output,
        # reasoning, cache read, cache write, total, incomplete.
        c[0] += 1
        c[1] += row[3]
        c[2] += row[4]
        c[3] += row[5]
        c[4] += row[6]
        c[5] += row[7]
        c[6] += row[8]
        c[7] += row[9]
        c[8] += row[11]
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
    # And the model × day rollup (the staff dashboard's), for the same people's keys.
    model_days: dict[tuple[date, str], list[Any]] = {}
    local_days: dict[str, date] = {}
    for (key_hash, model, hour), c in groups.items():
        key = keys.get(key_hash)
        if key is None:  # not the portal's key: counted, never stored against anyone
            result.foreign += c[0]
            continue
        pk, status, owner_id = key
        result.stored += c[0]
        result.incomplete += c[8]
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
            books.prices.price_for(model), uncached=c[2], cache_read=c[5], cache_write=c[6],
            output=c[3],
        )
        params.append((pk, model, hour_value, *c, None if cost is None else str(cost)))
        if owner_id is not None:
            day_key = (owner_id, local_days[hour])
            d = days.get(day_key)
            if d is None:
                d = days[day_key] = [0, 0, Decimal(0), 0, 0]
            _day_sums_add(d, c, cost)
            m = model_days.get((local_days[hour], model))
            if m is None:
                m = model_days[(local_days[hour], model)] = [0, 0, Decimal(0), 0, 0, 0, 0, 0]
            _day_sums_add(m, c, cost)
            m[5] += c[2]
            m[6] += c[5]
            m[7] += c[6]
    as_db = _db_datetime_for(connection.vendor)
    used = {keys[h][0]: as_db(ts) for h, ts in last_seen.items() if h in keys}
    if params:
        with connection.cursor() as cursor:
            _write(cursor, "usage", params)
            if days:
                day_of = connection.ops.adapt_datefield_value
                _write(cursor, "day", [
                    (p, day if connection.vendor == "postgresql" else day_of(day), r, t,
                     str(cost), u, i)
                    for (p, day), (r, t, cost, u, i) in days.items()
                ])
                _write(cursor, "model_day", [
                    (day if connection.vendor == "postgresql" else day_of(day), model, r, t,
                     str(cost), u, i, n, cr, cw)
                    for (day, model), (r, t, cost, u, i, n, cr, cw) in model_days.items()
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


def usage_pop_store(*, body: bytes, spool_name: str | None = None) -> int:
    """A popped body (or a piece of a spooled one, named `spool_name`) sealed and committed.
    Returns the batch's id. Raises IntegrityError when that spool piece is stored already."""
    with transaction.atomic():
        return UsageBatch.objects.create(
            raw=body_seal(body), size=len(body), spool=spool_name
        ).pk


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
        rows, aside, answer_error = [R.legacy_row(r) for r in legacy or []], [], ""
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
    # UsageSnapshot. Not those of a spool file still there (a run died between the commit
    # and the file's removal): their names are what keeps the file from counting twice.
    keep = timedelta(days=settings.USAGE_BATCH_KEEP_DAYS)
    old = UsageBatch.objects.filter(applied_at__lt=now - keep)
    for path in _spool_pending():
        old = old.exclude(spool__startswith=f"{path.name}:")
    old.delete()
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
    except (EscrowUnreadable, *_DB_DOWN):
        raise  # the database away or locked: retried (see _with_db), the batch stays pending
    except Exception as exc:
        # The batch stays pending (its body is safe) and is retried on the next run.
        UsageBatch.objects.filter(pk=batch_id).update(error=f"{type(exc).__name__}: {exc}"[:500])
        raise SyncFailed(
            _("Usage popped from the proxy was saved but could not be counted yet (%(error)s); "
              "it will be counted on the next run.") % {"error": type(exc).__name__}
        ) from exc


# --- the database failing: retried, then left to the spool ----------------------------------

# What a database that is locked (SQLite past its busy timeout), full, or away (PostgreSQL
# restarting) raises. Anything else (a refused row, a bug) is not retried.
_DB_DOWN = (OperationalError, InterfaceError)
DB_WHY = {
    "locked": gettext_lazy("the database is locked by another writer"),
    "full": gettext_lazy("the disk holding the database is full"),
    "away": gettext_lazy("the database cannot be reached"),
}
EXIT_DB_UNAVAILABLE = 75  # EX_TEMPFAIL: try again later, nothing is lost
T = TypeVar("T")


class DatabaseUnavailable(SyncFailed):
    """The database stayed locked, full or away past USAGE_DB_RETRY_SECONDS. What was popped
    is in the spool. `kind` is "locked", "full" or "away"."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class _DbDown(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _db_kind(exc: BaseException) -> str:
    # Classified, never quoted: a driver's message can name hosts and users.
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "locked"
    if "full" in text or "no space" in text or "disk i/o" in text:
        return "full"
    return "away"


def _with_db(fn: Callable[[], T], *, stop: threading.Event | None = None) -> T:
    """`fn()`, retried with backoff while the database is locked, full or away, for up to
    USAGE_DB_RETRY_SECONDS (a SQLite statement itself waits SQLITE_BUSY_TIMEOUT first).
    Raises _DbDown past that, or at once when `stop` is set: whatever was popped is in the
    spool by then."""
    deadline = time.monotonic() + settings.USAGE_DB_RETRY_SECONDS
    pause = 0.05
    while True:
        try:
            return fn()
        except _DB_DOWN as exc:
            if connection.in_atomic_block:
                raise  # the outermost caller retries the whole transaction
            kind = _db_kind(exc)
            if connection.vendor != "sqlite":
                connection.close()  # a dropped server connection is not reused
            if (stop is not None and stop.is_set()) or time.monotonic() + pause > deadline:
                raise _DbDown(kind) from None
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
            pause = min(pause * 2, 1.0)


# --- the spool ------------------------------------------------------------------------------


@dataclass
class PopSizing:
    """How many records the next pop asks for. Kept by a --follow loop across passes: after
    an answer bigger than CLIPROXY_MAX_ANSWER_BYTES the pops ask for fewer records."""

    count: int = 0

    def __post_init__(self) -> None:
        self.count = self.count or settings.USAGE_QUEUE_BATCH

    def after(self, *, size: int, records: int) -> str:
        """Shrinks the count after a big answer; returns a sentence saying so, or ""."""
        cap = settings.CLIPROXY_MAX_ANSWER_BYTES
        if size <= cap or records <= 1:
            return ""
        # Aim at half the cap: records vary in size.
        fewer = max(1, min(self.count - 1, int(records * cap / 2 / size)))
        self.count = fewer
        return _("The proxy's answer was %(size)d bytes for %(n)d records, over "
                 "CLIPROXY_MAX_ANSWER_BYTES, so the next pops ask for %(next)d records.") % {
                     "size": size, "n": records, "next": fewer}


@dataclass
class _Pass:
    """What one pass carries along: the stop request, the books (loaded on first need), and
    whether the database has failed (then popped bodies stay in the spool)."""

    now: datetime
    stop: threading.Event
    books: Books | None = None
    db_down: str = ""  # the kind, once the database failed past its retry
    sealed: int = 0
    notes: list[str] = field(default_factory=list)
    direct: IngestResult = field(default_factory=IngestResult)  # the last pop stored directly

    def load_books(self) -> Books:
        if self.books is None:
            self.books = _with_db(Books.load, stop=self.stop)
        return self.books


def _spool_pending() -> list[Path]:
    try:
        return spool.pending_files(spool.spool_dir())
    except OSError:
        return []  # an unreadable spool directory: said when a pop cannot be written there


def _spool_import(path: Path, state: _Pass) -> IngestResult:
    """Counts one spool file, piece by piece, then removes it (or sets a cut one aside).
    Each piece is a UsageBatch named `<file>:<n>`: a piece stored by an earlier run that
    died before the file's removal is not stored again. Raises _DbDown or EscrowUnreadable,
    leaving the file for the next run."""
    books = state.load_books()
    name = path.name
    done = set(_with_db(lambda: list(UsageBatch.objects.filter(
        spool__startswith=f"{name}:").values_list("spool", flat=True)), stop=state.stop))
    # Pieces are cut the same way on every run: with the size an earlier run used, if one
    # stored some (CLIPROXY_MAX_ANSWER_BYTES may have changed since), named by that size.
    used = sorted({t.split(":")[1] for t in done if t.count(":") == 2})
    limit = int(used[0]) if used else spool.piece_limit()
    reader = spool.SpoolReader(path)
    pieces, splitter = spool.pieces_of(reader, limit=limit)
    result = IngestResult()
    for index, (piece, _n) in enumerate(pieces):
        if index and state.stop.is_set():
            return result  # stopped: the rest of this file waits in the spool
        tag = f"{name}:{limit}:{index}"
        if tag in done:
            continue
        try:
            batch_id = _with_db(lambda: usage_pop_store(body=piece, spool_name=tag),
                                stop=state.stop)
        except IntegrityError:
            continue  # another importer stored it meanwhile: it counts it
        result.add(_with_db(
            lambda: _apply_or_note(batch_id, now=state.now, books=books, body=piece),
            stop=state.stop,
        ))
    problem = reader.cut or (splitter.error if splitter else "")
    if not problem:
        spool.remove(path)
        return result
    tail = f"{name}:rest"
    if tail not in done:
        recovered = splitter.records if splitter else 0
        # The file's name first: the reason column keeps 200 characters.
        reason = _("Answer cut short, kept sealed as spool/quarantine/%(file)s; %(n)d complete "
                   "records before the cut were counted (%(why)s).") % {
                       "why": problem, "n": recovered, "file": name}

        def note() -> None:
            with transaction.atomic():
                batch = UsageBatch.objects.create(spool=tail, applied_at=state.now,
                                                  quarantined=1, error=reason[:500])
                QuarantinedRecord.objects.create(
                    source=QuarantinedRecord.Source.QUEUE, batch=batch, reason=reason[:200],
                )

        _with_db(note, stop=state.stop)
        result.read += 1
        result.quarantined += 1
        if not reader.cut:  # a whole answer that is not a list: the run says so
            result.answer_error = problem
    spool.set_aside(path)
    return result


def _spool_import_all(state: _Pass) -> IngestResult:
    """What earlier runs left in the spool, oldest first; stops at a stop request or when
    the database fails (the files stay)."""
    result = IngestResult()
    for path in _spool_pending():
        if state.stop.is_set() or state.db_down:
            break
        try:
            result.add(_spool_import(path, state))
        except EscrowUnreadable:
            state.sealed += 1
        except _DbDown as exc:
            state.db_down = exc.kind
    return result


def usage_spool_catch_up(*, now: datetime, books: Books) -> IngestResult:
    """Counts what waits in the spool and the pending batches (bodies the live stream saved
    while the database was away), without asking the proxy. Raises DatabaseUnavailable when
    the database is still away: the files stay for the next try."""
    state = _Pass(now=now, stop=threading.Event(), books=books)
    try:
        result, state.sealed = _with_db(lambda: _apply_pending(now, books), stop=state.stop)
    except _DbDown as exc:
        raise _unavailable(exc.kind, records=_spooled_records()) from None
    result.add(_spool_import_all(state))
    if state.db_down:
        raise _unavailable(state.db_down, records=_spooled_records())
    return result


# Records per spool file, remembered: a file never changes once written, and a --follow loop
# with the database down says how many records wait at every pass.
_records_in_file: dict[str, int] = {}


def _records_in(path: Path) -> int:
    n = _records_in_file.get(path.name)
    if n is None:
        n = _records_in_file[path.name] = spool.records_in(path)
    return n


def _spooled_records() -> int:
    """Records waiting in the spool (files not yet imported, read in bounded memory)."""
    total, present = 0, set()
    for path in _spool_pending():
        present.add(path.name)
        try:
            total += _records_in(path)
        except EscrowUnreadable:
            continue
    for gone in set(_records_in_file) - present:
        del _records_in_file[gone]
    return total


def _sync_queue(client: ProxyClient, state: _Pass, result: IngestResult, held: Held | None,
                sizing: PopSizing) -> None:
    """Drains the queue into `result` (kept up to date, so a failure reports what was done).
    Each pop streams into a spool file, fsynced before anything else, then is counted from
    there; once the database has failed, pops go on into the spool only. A stop request
    ends the loop after the pop in hand."""
    try:
        directory = spool.spool_dir()
    except OSError:
        directory = Path(settings.USAGE_SPOOL_DIR)  # each writer fails, and says so
    for _pop in range(MAX_POPS_PER_PASS):
        if state.stop.is_set():
            return
        if held is not None and held.lost.is_set():
            raise LeaseLost(SYNC_LEASE)  # another sync took over: it drains from here
        count = sizing.count
        writer = spool.SpoolWriter(directory)
        try:
            size = client.usage_queue_pop_stream(count=count, sink=writer.write)
        except UpstreamUnreachable as exc:
            if not writer.size:
                writer.discard()
                raise
            # Cut in the middle: what arrived is kept and its complete records counted.
            path = _spool_finish(writer, state, result, cut=str(exc))
            if path is not None:
                _import_or_keep(path, state, result)
            raise SyncFailed(_(
                "The proxy's answer was cut off before its end (%(why)s); the part that "
                "arrived is kept in the spool, its complete records are counted and the rest "
                "is set aside (Usage → Quarantined usage records)."
            ) % {"why": exc}) from None
        except BaseException:
            writer.discard()
            raise
        if writer.empty:
            writer.discard()
            return
        path = _spool_finish(writer, state, result)
        if path is None:  # the spool could not take it: stored in the database directly
            records, answer_error = state.direct.read, state.direct.answer_error
        else:
            records, answer_error = _import_or_keep(path, state, result)
        if answer_error:
            raise SyncFailed(_(
                "%(reason)s It was set aside (Usage → Quarantined usage records); usage already "
                "counted is safe, and the next sync starts afresh."
            ) % {"reason": answer_error})
        note = sizing.after(size=size, records=records)
        if note and note not in state.notes:
            state.notes.append(note)
        if records < count:
            return


def _spool_finish(writer: spool.SpoolWriter, state: _Pass, result: IngestResult, *,
                  cut: str = "") -> Path | None:
    """The spool file of a pop, or None when the spool's disk refused it: then the body (read
    to its end all the same, held in memory) is stored in the database directly, as before
    the spool existed, into `result` and `state.direct`. Raises SyncFailed when neither the
    spool nor the database could take it."""
    try:
        return writer.finish(cut=cut)
    except OSError as exc:
        body = writer.recover()
        writer.discard()
        note = _("The spool directory (USAGE_SPOOL_DIR) cannot be written (%(error)s); pops "
                 "go to the database directly until it can.") % {
                     "error": exc.strerror or type(exc).__name__}
        if note not in state.notes:
            state.notes.append(note)
    try:
        batch_id = _with_db(lambda: usage_pop_store(body=body), stop=state.stop)
        books = state.load_books()
        state.direct = _with_db(
            lambda: _apply_or_note(batch_id, now=state.now, books=books, body=body),
            stop=state.stop,
        )
    except _DbDown as down:
        raise SyncFailed(_(
            "Neither the spool directory nor the database could take a pop (%(why)s): its "
            "%(size)d bytes are lost. Free space for USAGE_SPOOL_DIR."
        ) % {"why": DB_WHY[down.kind], "size": len(body)}) from None
    result.add(state.direct)
    return None


def _import_or_keep(path: Path, state: _Pass, result: IngestResult) -> tuple[int, str]:
    """Counts a freshly spooled body into `result`, unless the database is down (then it
    waits in the spool). Returns its records and, if so, why the answer was not a list."""
    if not state.db_down:
        try:
            popped = _spool_import(path, state)
            result.add(popped)
            return popped.read, popped.answer_error
        except _DbDown as exc:
            state.db_down = exc.kind
    return _records_in(path), ""


def usage_queue_body_ingest(
    *, body: bytes, now: datetime, books: Books, stop: threading.Event | None = None
) -> IngestResult:
    """One popped `/usage-queue` answer (or records buffered from the live stream): written
    to the spool and fsynced first, then stored and counted from there. Raises
    DatabaseUnavailable when the database stays locked, full or away past the retry, or at
    once after `stop` is set: the body waits in the spool for the next run."""
    if body.strip() == b"[]":
        return IngestResult()  # an empty pop holds nothing to keep
    try:
        directory = spool.spool_dir()
    except OSError:
        directory = Path(settings.USAGE_SPOOL_DIR)  # the writer fails and falls back
    writer = spool.SpoolWriter(directory)
    writer.write(body)
    state = _Pass(now=now, stop=stop or threading.Event(), books=books)
    direct = IngestResult()
    path = _spool_finish(writer, state, direct)
    if path is None:
        return direct
    try:
        return _spool_import(path, state)
    except _DbDown as exc:
        raise _unavailable(exc.kind, records=_spooled_records()) from None


def database_unavailable(exc: BaseException) -> DatabaseUnavailable:
    """A database error met outside the retried writes, as one sentence (never the driver's
    own text, which can name hosts and users)."""
    return _unavailable(_db_kind(exc), records=_spooled_records())


def _unavailable(kind: str, *, records: int, snapshot: bool = False) -> DatabaseUnavailable:
    why = DB_WHY.get(kind, DB_WHY["away"])
    if snapshot:
        message = _("The database could not be written (%(why)s); nothing is lost: the proxy "
                    "keeps its cumulative usage and the next run counts it.") % {"why": why}
    else:
        message = _("The database could not be written (%(why)s): saved %(n)d records in the "
                    "spool; they are counted at the next run.") % {"why": why, "n": records}
    return DatabaseUnavailable(message, kind=kind)


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


def _sync_snapshot(client: ProxyClient, held: Held | None, state: _Pass) -> IngestResult:
    snapshot = client.usage_snapshot()
    # A stop request during the read still counts the snapshot in hand (one transaction).
    try:
        return _with_db(
            lambda: usage_snapshot_ingest(apis=snapshot.apis, fence=held.fence if held else None),
            stop=state.stop,
        )
    except _DbDown as exc:
        state.db_down = exc.kind
        return IngestResult()


# --- the sync ---------------------------------------------------------------------------------


@contextmanager
def sync_lease() -> Iterator[Held]:
    """Holds the sync lease (never waits) for the block, renewed by its heartbeat. Raises
    SyncBusy when another sync holds it, DatabaseUnavailable when the database cannot be
    written to take it (nothing was popped then)."""
    try:
        held_cm = lease(SYNC_LEASE, ttl=SYNC_LEASE_TTL)
        held = held_cm.__enter__()
    except LeaseHeld:
        raise SyncBusy(_("Another usage sync is running; not starting a second one.")) from None
    except _DB_DOWN as exc:
        kind = _db_kind(exc)
        raise DatabaseUnavailable(
            _("The database could not be written (%(why)s), so no usage was read from the "
              "proxy; it keeps the records for the next run.") % {"why": DB_WHY[kind]},
            kind=kind,
        ) from None
    try:
        yield held
    except BaseException as exc:
        if not held_cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        held_cm.__exit__(None, None, None)


def usage_sync(*, mode: str | None = None, stop: threading.Event | None = None) -> SyncReport:
    """One sync, under the lease. Raises SyncBusy when another sync runs, SyncFailed (after
    recording the failure) when this one could not finish, DatabaseUnavailable (a SyncFailed)
    when the database stayed locked, full or away: what was popped is then in the spool."""
    with sync_lease() as held:
        return usage_sync_pass(mode=mode, held=held, stop=stop)


def usage_sync_pass(
    *, mode: str | None = None, now: datetime | None = None, held: Held | None = None,
    stop: threading.Event | None = None, sizing: PopSizing | None = None,
) -> SyncReport:
    """One pass; the caller holds the lease (usage_sync, or the --follow loop) and passes it
    as `held`. What the spool and the database hold from earlier runs is counted first. After
    the usage is stored, limits are enforced as of `now` (default: the clock; tests freeze
    it). `stop` (SIGTERM, Ctrl-C) ends the pass after the pop in hand; `sizing` carries the
    pop size from pass to pass."""
    started, clock = timezone.now(), time.monotonic()
    mode = mode or settings.CLIPROXY_USAGE_MODE
    state = _Pass(now=started, stop=stop or threading.Event())
    sizing = sizing or PopSizing()
    result = IngestResult()
    enabled = True
    relay_failures: list[str] = []
    try:
        # What earlier runs popped but did not count comes first, and needs no proxy.
        try:
            _with_db(_runs_restore, stop=state.stop)
            pending, state.sealed = _with_db(
                lambda: _apply_pending(started, state.load_books()), stop=state.stop
            )
            result.add(pending)
            result.add(_spool_import_all(state))
        except _DbDown as exc:
            state.db_down = exc.kind
        proxy = bool(cliproxyapi_endpoint().management_url) or not relays()
        if proxy and not state.stop.is_set():
            try:
                with ProxyClient.from_settings() as client:
                    # First call: a wrong management key stops here, after one request.
                    enabled = client.usage_statistics_enabled()
                    if mode not in MODES:
                        mode = client.usage_mode()
                    if mode == "queue":
                        _sync_queue(client, state, result, held, sizing)
                    elif not state.db_down:
                        result.add(_sync_snapshot(client, held, state))
            except _DB_DOWN as exc:
                # The client's refusal latch lives in the shared cache, which is the database
                # by default: with the database away no call is sent (nothing more popped).
                state.db_down = _db_kind(exc)
        # Then each relay that makes its own keys: one that does not answer is said and the
        # others go on (their usage waits at the relay, behind the cursor).
        if not state.db_down and not state.stop.is_set():
            relay_failures.extend(_sync_relays(state, result, held))
    except LeaseLost:
        message = _("Another usage sync took over the lease while this one ran; it stopped "
                    "and left the rest to that one.")
        _record(started, clock, mode, False, message, result, db_ok=not state.db_down)
        raise SyncFailed(message) from None
    except (UpstreamError, SyncFailed) as exc:
        message = str(exc)
        if state.db_down:
            message += " " + str(_unavailable(state.db_down, records=_spooled_records()))
        _record(started, clock, mode, False, message, result, db_ok=not state.db_down)
        raise SyncFailed(message) from exc
    finally:
        if not state.db_down:
            _notify_unissued_safely()
    if state.db_down:
        failure = _unavailable(state.db_down, records=_spooled_records(),
                               snapshot=mode == "snapshot")
        _record(started, clock, mode, False, str(failure), result, db_ok=False)
        raise failure
    ok, messages = not relay_failures, list(relay_failures)
    if not enabled:
        ok = False
        messages.append(str(STATISTICS_OFF))
    if state.sealed:
        ok = False
        messages.append(_("%(n)d stored pops cannot be opened: %(why)s")
                        % {"n": state.sealed, "why": BODY_SEALED})
    if result.quarantined:
        messages.append(_(
            "%(n)d usage records could not be counted and were set aside (Usage → Quarantined "
            "usage records in the admin); the rest was counted."
        ) % {"n": result.quarantined})
    message = " ".join(messages)
    # Enforced only on what a finished pass stored, and before the run is recorded so that
    # the status page's "last sync" includes it. The suspensions are committed in the portal
    # before the proxy is asked; a proxy that does not answer follows at the next reconcile.
    try:
        limits = _with_db(lambda: limits_enforce(now=now or timezone.now()), stop=state.stop)
    except _DbDown as exc:
        failure = _unavailable(exc.kind, records=_spooled_records())
        _record(started, clock, mode, False, str(failure), result, db_ok=False)
        raise failure from None
    report = SyncReport(mode, ok, message, result, time.monotonic() - clock, limits,
                        notes=state.notes, stopped=state.stop.is_set())
    _record(started, clock, mode, ok, message, result, db_ok=True)
    return report


def usage_relays_pass(*, held: Held | None = None, stop: threading.Event | None = None
                      ) -> SyncReport | None:
    """The relays' part of a pass alone (none: None), recorded as a run of its own with
    limits enforced after it: what `sync_usage --follow` runs every interval while it follows
    the CLIProxyAPI's live stream."""
    if not relays():
        return None
    started, clock = timezone.now(), time.monotonic()
    state = _Pass(now=started, stop=stop or threading.Event())
    result = IngestResult()
    failures = _sync_relays(state, result, held)
    limits = limits_enforce(now=timezone.now()) if result.stored else None
    message = " ".join(failures)
    _record(started, clock, RELAY_MODE, not failures, message, result)
    return SyncReport(RELAY_MODE, not failures, message, result, time.monotonic() - clock,
                      limits, notes=state.notes, stopped=state.stop.is_set())


RELAY_MODE = "relays"


def _sync_relays(state: _Pass, result: IngestResult, held: Held | None) -> list[str]:
    """Counts each relay's usage since its cursor; returns a sentence per relay that failed."""
    failures = []
    for upstream in relays():
        if state.stop.is_set():
            break
        try:
            got, notes = _with_db(lambda u=upstream: relay_usage_sync(
                u,
                ingest=lambda rows: _ingest_rows(rows, books=state.load_books()),
                quarantine=lambda aside: _quarantine(aside, source=QuarantinedRecord.Source.RELAY),
                fence=held.fence if held is not None else None,
            ), stop=state.stop)
        except UpstreamError as exc:
            failures.append(_("%(name)s: %(why)s") % {"name": upstream.name, "why": exc})
            continue
        result.add(got)
        state.notes.extend(notes)
    return failures


def _record(
    started: datetime, clock: float, mode: str, ok: bool, message: str, result: IngestResult,
    *, db_ok: bool = True,
) -> None:
    """Files the run as a SyncRun; when the database cannot take it, the run waits in the
    spool's `runs` folder and is filed by the next run that can (see _runs_restore)."""
    fields = dict(
        started_at=started, finished_at=timezone.now(), ok=ok,
        mode=mode if mode in MODES else "", message=message, records_read=result.read,
        records_stored=result.stored, records_foreign=result.foreign,
        records_unissued=result.unissued, records_quarantined=result.quarantined,
        records_incomplete=result.incomplete,
        people=len(result.people), duration_ms=int((time.monotonic() - clock) * 1000),
    )
    if db_ok:
        try:
            with transaction.atomic():
                run = SyncRun.objects.create(**fields)
                SyncRun.objects.filter(pk__lte=run.pk - KEEP_SYNC_RUNS).delete()
        except _DB_DOWN:
            pass
        else:
            _notify_run_safely(ok=ok, message=message, quarantined=result.quarantined)
            return
    spool.run_save(fields)


# Staff hear of a failing sync or of records set aside at most once per half hour (the shared
# cache says so across processes): a follower failing every 15 s is one message, not 120 an
# hour. When a failing sync runs again, they hear that too.
SYNC_ALERT_EVERY = timedelta(minutes=30)
SYNC_FAILING_NOTIFIED = "sync:failing-notified"  # told in the last half hour
SYNC_FAILING_TOLD = "sync:failing-told"  # told, and no sync has succeeded since
QUARANTINE_NOTIFIED = "sync:quarantine-notified"


def _notify_run_safely(*, ok: bool, message: str, quarantined: int) -> None:
    try:
        _notify_run(ok=ok, message=message, quarantined=quarantined)
    except DatabaseError:
        pass  # the alert waits for a run that reaches the database


def _notify_run(*, ok: bool, message: str, quarantined: int) -> None:
    every = SYNC_ALERT_EVERY.total_seconds()
    if not ok and cache.add(SYNC_FAILING_NOTIFIED, True, every):
        cache.set(SYNC_FAILING_TOLD, True, None)  # until a sync succeeds, however long
        staff_alert(
            event="sync_failed",
            subject=_("Key Portal: the usage sync is failing"),
            body=_("The last usage sync did not finish:\n\n%(why)s\n\nUsage, costs and limits "
                   "wait until a sync succeeds. The admin's sync runs list has each run's "
                   "result.") % {"why": message},
        )
    elif ok and cache.get(SYNC_FAILING_TOLD):
        cache.delete_many([SYNC_FAILING_TOLD, SYNC_FAILING_NOTIFIED])
        staff_alert(event="sync_failed", subject=_("Key Portal: the usage sync works again"),
                    body=_("The last usage sync finished without error."))
    if quarantined and cache.add(QUARANTINE_NOTIFIED, True, every):
        staff_alert(
            event="records_quarantined",
            subject=_("Key Portal: usage records were set aside"),
            body=_("%(n)d usage records could not be counted and were set aside (Usage → "
                   "Quarantined usage records in the admin); the rest was counted.")
            % {"n": quarantined},
            data={"records": quarantined},
        )


def _runs_restore() -> None:
    for path, fields in spool.runs_pending():
        for name in ("started_at", "finished_at"):
            fields[name] = datetime.fromisoformat(str(fields[name]))
        SyncRun.objects.create(**fields)
        path.unlink()


def _notify_unissued_safely() -> None:
    try:
        _notify_unissued()
    except DatabaseError:
        pass  # the next pass that reaches the database tells staff


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
                "cost",
            ).iterator(chunk_size=2000)):
                updates = []
                for pk, uncached, out, read, write, old in chunk:
                    new = cost_of(
                        price, uncached=uncached, cache_read=read, cache_write=write, output=out
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

