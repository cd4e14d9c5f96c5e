"""claude-relay-service (CRS) behind the upstream interface, on its admin client
(pool.upstreams.crs). Read against CRS 1.1.314's source (../shared/upstreams/
claude-relay-service/src); what each choice rests on is said where it is made.

Keys. A key is made at CRS when a person asks for one (working at once; its value is shown
once and CRS keeps only a hash), named after the person and the label. Revoking deletes it at
CRS (a soft delete: CRS keeps its records and an admin can restore it there); suspending or
expiring switches it off (`isActive`), resuming switches it on.

Limits (`crs_limits`). CRS has no people: the key's limits arrive already folded with its
owner's (pool.upstreams.relays.key_limits, the smaller of each pair). What CRS enforces by
itself, refusing the request after the one that crosses (auth middleware: HTTP 402 once the
day's cost so far has reached the limit), before any sync:

- `dailyCostLimit` = the smaller of the portal's cost per day and cost per month. A day's
  cost can never exceed the month's limit without the month going over too, so this refuses
  nothing the portal would allow, and it stops one day from running through a month's budget
  between two syncs. A portal limit of 0 becomes CRS's smallest positive limit (CRS's 0 means
  "no limit"): one request passes, the next is refused, as the portal's suspension would.
- `expiresAt` = the key's expiry.

Not mapped, left to the portal's suspension after each sync (usage.limits): the month's cost
beyond the daily cap, and every token limit. CRS has no calendar month; its only other
windows (`rateLimitWindow` with `tokenLimit` / `rateLimitCost`) start at the first request
after the last window ended and last a fixed number of minutes, so a window of a day or a
month straddles the portal's calendar boundaries: it would refuse requests the portal allows
(tokens spent just before midnight still count after it) and could not be a truthful
translation of a calendar limit. `tokenLimit` also only works inside such a window, and
`totalCostLimit` is for the key's whole life, which the portal does not have.

CRS's day. CRS counts a key's daily cost per day of its own clock: UTC plus the whole hours
of `TIMEZONE_OFFSET` (config.system.timezoneOffset; no daylight saving; and `0` cannot be
set, `parseInt(...) || 8` makes it +8, CRS's default). The portal's days are TIME_ZONE's. When
the two differ, CRS's daily limit resets at another hour than the portal's: spending made
before CRS's midnight still counts against the key after the portal's midnight (CRS may
refuse what the portal's new day allows), and one portal day may see up to twice the limit
spent at CRS before the portal's suspension stops it. Set CRS's TIMEZONE_OFFSET to the
portal's offset for the two to agree. CRS also compares its own *rated* cost (its price
table times its service rates) with the limit, not the portal's price: with rates at 1 and
the same vendor prices they agree.

Usage (`usage_read`). CRS keeps a list of per-request records per key in Redis, newest first,
trimmed to the newest 200 at every request (redis.addUsageRecord's LTRIM) and kept 90 days
after the last request; the admin route filters them with an inclusive `startDate`. Records
have no id (CRS's requestId is not in the route's answer), so each is known by a fingerprint
of its stored fields (time to the millisecond, model, account, tokens). The cursor holds,
per key, where the next read starts (`since`: OVERLAP before the newest record seen, so a
record written a little late by another CRS process is still found) and how many records of
each fingerprint at or after `since` were already counted (a multiset: two identical
requests in the same millisecond are two). A read counts what the multiset does not hold
and returns the new cursor; the caller stores both in one transaction
(usage.relays.relay_usage_sync), so a crash before the commit reads the same records again
and one after it starts from the new cursor: each request counts once.

What can be lost: more than 200 requests on one key between two reads (the oldest are
trimmed before the portal sees them; the read says so in a note when it cannot rule it out),
a record written more than OVERLAP after a newer one, and everything after 90 days without a
sync. Keep the sync interval well under the time a key takes to make 200 requests.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings
from django.utils.translation import gettext as _, gettext_lazy

from pool.upstream import UpstreamError, UpstreamNotConfigured, UpstreamNotFound, UpstreamUnexpected
from pool.upstreams import crs, registry
from pool.upstreams.base import Driver, Health, NewKey, RelayLimits, RelayUsage, UsageRead

if TYPE_CHECKING:
    from accounts.models import User
    from pool.models import ApiKey, Upstream

NAME_MAX = 100  # CRS refuses a key name over 100 UTF-16 code units (JavaScript's length)
DESCRIPTION = "Key Portal"
MAX_RECORDS = 200  # CRS keeps the newest 200 records per key
# How far before the newest record seen each read starts again. CRS stamps a record when it
# writes it; one process writes them in order, several processes sharing one Redis may not.
OVERLAP = timedelta(seconds=60)
# CRS's 0 means "no limit"; a portal limit of 0 is the smallest positive amount instead.
SMALLEST_LIMIT = Decimal("0.000001")
CURSOR_VERSION = 1


def crs_limits(limits: RelayLimits) -> crs.Limits:
    """The portal's limits for one key as CRS fields (see the module's docstring)."""
    daily = min((v for v in (limits.cost_day, limits.cost_month) if v is not None),
                default=None)
    if daily is not None and daily <= 0:
        daily = SMALLEST_LIMIT
    return crs.Limits(daily_cost_limit=daily, expires_at=limits.expires_at)


def key_name(email: str, label: str) -> str:
    """`email · label` (or the email alone) within CRS's 100 code units."""
    text = f"{email} · {label.strip()}" if label.strip() else email
    return _fit(" ".join(text.split()), NAME_MAX) or "Key Portal key"


def _fit(text: str, units: int) -> str:
    # JavaScript counts UTF-16 code units: a character past U+FFFF is two.
    out, used = [], 0
    for char in text:
        size = 2 if ord(char) > 0xFFFF else 1
        if used + size > units:
            break
        out.append(char)
        used += size
    return "".join(out).strip()


def fingerprint(record: crs.UsageRecord) -> str:
    """The same for the same record every time it is read. Two requests alike in every field
    share it, and the cursor counts them as a multiset, so exactness needs only stability:
    hence only fields CRS stores as they are. Not the cost: the route recomputes it at
    today's prices for a record stored without one."""
    fields = [
        record.timestamp.isoformat(timespec="milliseconds"), record.model, record.account_id,
        record.input_tokens, record.output_tokens, record.cache_create_tokens,
        record.cache_read_tokens, record.total_tokens,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


class CrsDriver(Driver):
    kind = "crs"
    instant_keys = True
    has_people = False
    enforces = gettext_lazy(
        "Daily cost (the smaller of the day's and the month's cost limit) and expiry, refused "
        "by claude-relay-service itself; the rest by the portal's suspension after each sync.")

    # Where people's tools point, under the public URL (CRS's src/app.js routes), for the
    # pages' settings to copy: Claude Code's ANTHROPIC_BASE_URL (the client adds
    # /v1/messages), OpenAI-style chat completions (CRS's unified route picks Claude, Gemini
    # or OpenAI accounts by the model's name), Codex CLI (/openai/responses) and Gemini CLI.
    client_paths: ClassVar[dict[str, str]] = {
        "anthropic": "/api",
        "openai": "/api/v1",
        "codex": "/openai",
        "gemini": "/gemini",
    }

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        self._where = registry.endpoint(upstream)
        self._client: crs.CrsClient | None = None

    @property
    def client(self) -> crs.CrsClient:
        if self._client is None:
            where = self._where
            if not (where.management_url and where.username and where.secret):
                raise UpstreamNotConfigured(_(
                    "%(name)s has no management URL, admin username or admin password set."
                ) % {"name": self.upstream.name})
            self._client = crs.CrsClient(where.management_url, where.username, where.secret,
                                         timeout=settings.UPSTREAM_TIMEOUT)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.logout()
            self._client.session.close()

    # --- keys -----------------------------------------------------------------------------

    def key_issue(self, *, person: User, label: str, limits: RelayLimits,
                  account: str | None) -> NewKey:
        made = self.client.create_key(name=key_name(person.email, label),
                                      limits=crs_limits(limits), description=DESCRIPTION)
        return NewKey(remote_id=made.id, value=made.value)

    def key_revoke(self, *, key: ApiKey) -> None:
        try:
            self.client.delete_key(_remote(key))
        except UpstreamNotFound:
            pass  # gone already: what was wanted

    def key_set_active(self, *, key: ApiKey, active: bool) -> None:
        self.client.set_active(_remote(key), active)

    def key_limits_push(self, *, key: ApiKey, limits: RelayLimits) -> None:
        from pool.models import ApiKey  # noqa: PLC0415 (models import this package)

        # The key's on/off goes in the same PUT: CRS turns an expiry it is sent into isActive,
        # which would otherwise wake a suspended key (see CrsClient.update_limits).
        self.client.update_limits(_remote(key), crs_limits(limits),
                                  active=key.status == ApiKey.Status.ACTIVE)

    # --- usage and health -----------------------------------------------------------------

    def usage_read(self, *, keys: list[ApiKey], cursor: dict[str, Any]) -> UsageRead:
        known = _cursor_keys(cursor, self.upstream.name)
        read = UsageRead()
        entries: dict[str, dict[str, Any]] = {}
        for key in keys:
            if not key.remote_id:
                continue
            was = known.get(key.remote_id)
            try:
                page = self.client.usage_records(key.remote_id,
                                                 since=was["since"] if was else None)
            except UpstreamNotFound:
                # Removed at CRS for good (not a soft delete): nothing more will come.
                read.notes.append(_(
                    "%(name)s no longer knows key %(key)s, so its usage is no longer read."
                ) % {"name": self.upstream.name, "key": key.masked})
                if was:
                    entries[key.remote_id] = was
                continue
            records, entry, lost = _new_records(key.remote_id, page.records, was)
            read.records.extend(records)
            if entry or was:
                entries[key.remote_id] = entry or was
            if lost:
                read.notes.append(_(
                    "%(name)s kept only its newest %(n)d requests of key %(key)s since the "
                    "last sync, so older ones may have been lost: sync more often."
                ) % {"name": self.upstream.name, "n": MAX_RECORDS, "key": key.masked})
        # Keys no longer read (revoked long ago) leave the cursor.
        read.cursor = {"v": CURSOR_VERSION, "keys": {
            remote_id: {"since": e["since"].isoformat(timespec="milliseconds"),
                        "seen": dict(e["seen"])}
            for remote_id, e in entries.items()
        }}
        return read

    def health(self) -> Health:
        try:
            self.client.health()
            version = self.client.version()
        except UpstreamError as exc:
            return Health(False, str(exc))
        except Exception as exc:  # never raises: a page shows the sentence
            return Health(False, _("%(name)s could not be asked (%(why)s).")
                          % {"name": self.upstream.name, "why": type(exc).__name__})
        return Health(True, _("It answers with the admin username and password."), version)


def _remote(key: ApiKey) -> str:
    if not key.remote_id:
        raise UpstreamNotFound(_("The key has no id at claude-relay-service."))
    return key.remote_id


def _new_records(remote_id: str, records: list[crs.UsageRecord], was: dict[str, Any] | None
                 ) -> tuple[list[RelayUsage], dict[str, Any] | None, bool]:
    """The records not counted yet, the key's new cursor entry (None: nothing read), and
    whether older records may have been trimmed unseen."""
    seen: Counter[str] = Counter(was["seen"]) if was else Counter()
    fresh: list[RelayUsage] = []
    matched = 0
    occurrences: Counter[str] = Counter()
    for record in records:
        print_ = fingerprint(record)
        occurrences[print_] += 1
        if seen[print_] > 0:
            seen[print_] -= 1
            matched += 1
            continue
        fresh.append(RelayUsage(
            key=remote_id, record_id=f"{remote_id}:{print_}:{occurrences[print_]}",
            model=record.model, at=record.timestamp,
            # CRS's inputTokens is the uncached input for every account kind: Anthropic
            # reports it so, and CRS's OpenAI routes subtract the cached part before recording.
            uncached=record.input_tokens, cache_read=record.cache_read_tokens,
            cache_write=record.cache_create_tokens, output=record.output_tokens,
            relay_cost=record.cost,
        ))
    # A full list with none of the records already counted: whatever came between the last
    # read and the oldest one kept may have been trimmed.
    lost = len(records) >= MAX_RECORDS and matched == 0
    if not records:
        return fresh, None, lost
    newest = max(r.timestamp for r in records)
    since = newest - OVERLAP
    if was and was["since"] > since:
        since = was["since"]  # never back: records before it were settled by earlier reads
    kept = Counter(fingerprint(r) for r in records if r.timestamp >= since)
    return fresh, {"since": since, "seen": dict(kept)}, lost


def _cursor_keys(cursor: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The stored cursor's entries, `since` as an aware datetime. A cursor this code did not
    write stops the read (counting from scratch would count everything again)."""
    if not cursor:
        return {}
    bad = UpstreamUnexpected(_("The stored usage cursor of %(name)s cannot be read; nothing "
                               "was counted.") % {"name": name})
    if cursor.get("v") != CURSOR_VERSION or not isinstance(cursor.get("keys"), dict):
        raise bad
    found: dict[str, dict[str, Any]] = {}
    for remote_id, entry in cursor["keys"].items():
        try:
            since = datetime.fromisoformat(entry["since"])
            seen = entry["seen"]
            if since.tzinfo is None or not isinstance(seen, dict) or not all(
                    isinstance(v, int) and v > 0 for v in seen.values()):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad from None
        found[remote_id] = {"since": since, "seen": seen}
    return found
