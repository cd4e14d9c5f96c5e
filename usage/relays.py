"""Usage from the relays that make their own keys (claude-relay-service, Claude Code Hub).

Each relay keeps its usage per request and answers it again when asked (nothing is popped), so
what keeps a request from being counted twice, or missed, is the cursor: each read returns the
records after the stored cursor and a new cursor, and the records are counted and the new
cursor stored in one transaction. A sync killed before that commit reads the same records next
time; one killed after it starts from the new cursor. The spool (usage.spool) is for the
CLIProxyAPI queue, whose pops are gone from the proxy once answered; here the relay keeps
them, so the database being away only delays the count (within the relay's retention: see the
docs/upstreams.md's table).

The records come out of each driver in the portal's token split already (pool.upstreams.base.
RelayUsage); from here on they are rows like the CLIProxyAPI's (usage.records): priced,
counted, quarantined and checked against limits by the same code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import timedelta, timezone as dt_timezone

from django.db import transaction
from django.utils import timezone

from pool.models import ApiKey, Upstream
from pool.upstreams.base import RelayUsage
from pool.upstreams.registry import driver_for
from usage import records as R

log = logging.getLogger(__name__)

# A revoked key's last requests may still arrive in the relay's log a little after it was
# revoked: its usage is read for this long afterwards.
READ_AFTER_REVOKE = timedelta(days=2)


def relay_rows(records: Iterable[RelayUsage], keys: dict[str, str]
               ) -> tuple[list[R.Row], list[R.Quarantined]]:
    """Rows for usage.services' ingest; `keys` maps a relay key id to the key's hash. A
    record that cannot be counted is set aside with its reason, never stops the others."""
    rows: list[R.Row] = []
    aside: list[R.Quarantined] = []
    for rec in records:
        key_hash = keys.get(rec.key, "")
        try:
            if not key_hash:
                raise R.BadRecord("the record names a key the portal does not know")
            model = R.check_text(rec.model or "unknown", "model")[:200]
            parts = (rec.uncached, rec.cache_read, rec.cache_write, rec.output, rec.reasoning)
            if any(type(p) is not int or p < 0 or p >> R.TOKEN_BITS for p in parts):
                raise R.BadRecord(f"a token count is negative or not below 2^{R.TOKEN_BITS}")
            at = rec.at.astimezone(dt_timezone.utc)
            if not R.FIRST_YEAR <= at.year <= R.LAST_YEAR:
                raise R.BadRecord("timestamp is outside 2000-2099")
        except R.BadRecord as exc:
            aside.append(R.Quarantined(str(exc), _text(rec), key_hash))
            continue
        total = rec.uncached + rec.cache_read + rec.cache_write + rec.output
        rows.append([key_hash, model, at.strftime("%Y-%m-%dT%H"), 1 if rec.failed else 0,
                     rec.uncached, rec.output, rec.reasoning, rec.cache_read, rec.cache_write,
                     total, at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), 0])
    return rows, aside


def _text(rec: RelayUsage) -> str:
    return json.dumps({
        "key": rec.key, "record_id": rec.record_id, "model": rec.model,
        "at": rec.at.isoformat() if hasattr(rec.at, "isoformat") else str(rec.at),
        "tokens": [rec.uncached, rec.cache_read, rec.cache_write, rec.output, rec.reasoning],
    }, ensure_ascii=True, default=str)[:R.RECORD_TEXT_MAX]


def keys_to_read(upstream: Upstream) -> list[ApiKey]:
    """The keys whose usage is read: every key there but those revoked long ago."""
    since = timezone.now() - READ_AFTER_REVOKE
    return list(
        ApiKey.objects.filter(upstream=upstream).exclude(remote_id="")
        .exclude(status=ApiKey.Status.REVOKED, revoked_at__lt=since).order_by("id")
    )


def relay_usage_sync(upstream: Upstream, *, ingest: object, quarantine: object,
                     fence: object = None) -> tuple[object, list[str]]:
    """Reads `upstream`'s usage since its cursor and counts it, cursor and counts in one
    transaction. `ingest(rows) -> IngestResult` and `quarantine(aside)` are usage.services'
    (passed in: that module calls this one); `fence()`, inside the transaction, raises when
    this process no longer holds the sync lease (then nothing is committed: the holder reads
    the same records). Returns the result and the read's notes.
    Raises UpstreamError when the relay does not answer (nothing counted, cursor kept)."""
    keys = keys_to_read(upstream)
    driver = driver_for(upstream)
    try:
        read = driver.usage_read(keys=keys, cursor=dict(upstream.usage_cursor or {}))
    finally:
        driver.close()
    rows, aside = relay_rows(read.records, {k.remote_id: k.key_hash for k in keys})
    with transaction.atomic():
        if fence is not None:
            fence()  # type: ignore[operator]
        result = ingest(rows)  # type: ignore[operator]
        if aside:
            quarantine(aside)  # type: ignore[operator]
            result.quarantined += len(aside)
            result.read += len(aside)
        Upstream.objects.filter(id=upstream.id).update(usage_cursor=read.cursor)
    upstream.usage_cursor = read.cursor
    return result, read.notes
