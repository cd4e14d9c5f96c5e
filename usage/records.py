"""Usage records of both proxy generations, reduced to the rows the portal counts.

A row is a list (older versions stored rows as JSON in UsageBatch, and lists are what JSON
gives back):
`[key_hash, model, hour, failed, uncached_input, output, reasoning, cache_read, cache_write,
total, timestamp, incomplete]`, the token split of usage.accounting, where `key_hash` is the SHA-256 of the client key (the plaintext is dropped here,
before anything is stored), `hour` is the UTC hour as `YYYY-MM-DDTHH` and `timestamp` the
request's UTC time as RFC 3339 text (for "last used").

A record that cannot be counted is never allowed to stop the others: it comes out as a
`Quarantined` (reason, the record as ASCII JSON with its key masked) and is set aside. The
checks here are the boundary: token counts are integers in [0, 2^40) (a trillion tokens is
beyond any request, and sums of such counts stay far inside the database's int64), texts the
database stores (no NUL, no lone surrogate), times within 2000-2099.

This is the hot loop of sync_usage (a busy proxy's snapshot holds millions of details), so it
works on the decoded JSON directly, with plain lists and a few caches, instead of building
objects per record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from pool.models import key_digest
from pool.upstream import UpstreamUnexpected
from usage.accounting import QUEUE, SNAPSHOT, SplitError, split_tokens

Row = list[Any]

TOKEN_BITS = 40  # a count must be below 2^40 (about 1.1 trillion)
FIRST_YEAR, LAST_YEAR = 2000, 2099
RECORD_TEXT_MAX = 4000


class BadRecord(ValueError):
    """One record the contract does not allow; the message never holds a key."""


@dataclass(frozen=True)
class Quarantined:
    """A record set aside: why, what it was (key masked), and whose key when known."""

    reason: str
    record: str
    key_hash: str = ""


def masked(key: Any) -> str:
    """A client key as it may be shown anywhere: its first 6 and last 4 characters."""
    if not isinstance(key, str):
        return "" if key is None else f"<{type(key).__name__}>"
    return f"{key[:6]}…{key[-4:]}" if len(key) > 16 else "…"


def record_text(raw: Any, **extra: Any) -> str:
    """A record as ASCII JSON (NULs and lone surrogates escaped, so any database stores it),
    with its `api_key` masked, cut to RECORD_TEXT_MAX characters."""
    if type(raw) is dict:
        raw = {**raw, **({"api_key": masked(raw["api_key"])} if "api_key" in raw else {}),
               **extra}
    elif extra:
        raw = {**extra, "record": raw}
    try:
        text = json.dumps(raw, ensure_ascii=True, default=repr)
    except (ValueError, RecursionError):
        text = ascii(raw)
    return text[:RECORD_TEXT_MAX]


def check_text(value: str, what: str) -> str:
    """`value` when the database can store it; BadRecord otherwise."""
    if "\x00" in value:
        raise BadRecord(f"{what} contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRecord(f"{what} is not valid Unicode text (a lone surrogate)") from None
    return value


def key_hasher() -> Callable[[str], str]:
    """SHA-256 hex of a key, remembered per run: a batch holds few distinct keys. A key that
    is not valid text (a lone surrogate) is a BadRecord."""
    seen: dict[str, str] = {}

    def digest(value: str) -> str:
        found = seen.get(value)
        if found is None:
            try:
                found = seen[value] = key_digest(value)
            except UnicodeEncodeError:
                raise BadRecord("api_key is not valid Unicode text (a lone surrogate)") from None
        return found

    return digest


def text_checker(what: str) -> Callable[[str], str]:
    """check_text, remembered: a pop holds a handful of distinct model names."""
    good: set[str] = set()

    def check(value: str) -> str:
        if value not in good:
            good.add(check_text(value, what))
        return value

    return check


class _Hours:
    """UTC hour and normalised timestamp of an RFC 3339 string. The proxy writes UTC with a
    `Z` and nanoseconds, so the hour is the first 13 characters once that prefix is known to
    be a real date; anything else (an offset, no fraction) goes through a full parse."""

    def __init__(self) -> None:
        self._valid: dict[str, bool] = {}

    def __call__(self, ts: Any) -> tuple[str, str]:
        if not isinstance(ts, str):
            raise BadRecord("timestamp is not text")
        if len(ts) >= 20 and ts[-1] == "Z" and ts[19] in ".Z":
            prefix = ts[:13]
            valid = self._valid.get(prefix)
            if valid is None:
                valid = self._valid[prefix] = _is_hour(prefix) and _is_clock(ts[13:19])
            fraction = ts[20:-1]
            if valid and (not fraction or fraction.isdigit()):
                # Fixed width (nanoseconds), so that timestamps compare as text.
                if len(fraction) != 9:
                    ts = f"{ts[:19]}.{fraction[:9]:0<9}Z"
                return prefix, ts
        parsed = parse_timestamp(ts).astimezone(timezone.utc)
        return parsed.strftime("%Y-%m-%dT%H"), parsed.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def _is_hour(prefix: str) -> bool:
    if not str(FIRST_YEAR) <= prefix[:4] <= str(LAST_YEAR):
        return False
    try:
        datetime.strptime(prefix, "%Y-%m-%dT%H")
    except ValueError:
        return False
    return True


def _is_clock(rest: str) -> bool:
    # ":MM:SS" — cheap enough to check on every new hour prefix only.
    return len(rest) == 6 and rest[0] == ":" and rest[3] == ":" and rest[1:3].isdigit() \
        and rest[4:6].isdigit() and int(rest[1:3]) < 60 and int(rest[4:6]) < 61


def parse_timestamp(ts: str) -> datetime:
    text = ts.replace("Z", "+00:00").replace("z", "+00:00")
    # Python keeps microseconds; the proxy sends up to nanoseconds.
    if "." in text:
        head, _dot, tail = text.partition(".")
        digits = len(tail) - len(tail.lstrip("0123456789"))
        text = f"{head}.{tail[:min(digits, 6)]}{tail[digits:]}" if digits else head + tail[digits:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadRecord("timestamp is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise BadRecord("timestamp has no time zone")
    if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise BadRecord(f"timestamp is outside the years {FIRST_YEAR}-{LAST_YEAR}")
    return parsed


def row_of(raw: Any, *, key_hash: str, model: str, hours: _Hours, generation: str) -> Row:
    if type(raw) is not dict:
        raise BadRecord("a usage record is not an object")
    hour, ts = hours(raw.get("timestamp"))
    tokens = raw.get("tokens")
    if tokens is not None and type(tokens) is not dict:
        raise BadRecord("tokens is not an object")
    failed = raw.get("failed") is True
    try:
        split = split_tokens(tokens, breakdown=raw.get("token_breakdown"),
                             provider=raw.get("provider"), model=model,
                             generation=generation, failed=failed)
    except SplitError as exc:
        raise BadRecord(str(exc)) from None
    uncached, read, write, out, rsn, total, incomplete = split
    # Combined check: this runs once per request served. OR-ing the counts and shifting
    # leaves 0 only when every count is in [0, 2^40): a negative one shifts to -1. The total
    # is a sum of four such counts, so it stays far inside the database's int64.
    if (uncached | read | write | out | rsn) >> TOKEN_BITS:
        raise BadRecord(f"a token count is negative or not below 2^{TOKEN_BITS}")
    return [key_hash, model, hour, 1 if failed else 0,
            uncached, out, rsn, read, write, total, ts, incomplete]


def legacy_row(row: list[Any]) -> Row:
    """A row as versions before the token split kept it in UsageBatch.rows (counts as the
    proxy reported them, from the queue), in today's layout."""
    (key_hash, model, hour, failed, inp, out, rsn, cached, created, total, ts) = row[:11]
    tokens = {"input_tokens": inp, "output_tokens": out, "reasoning_tokens": rsn,
              "cached_tokens": cached, "cache_creation_tokens": created, "total_tokens": total}
    split = split_tokens(tokens, model=model, generation=QUEUE, failed=bool(failed))
    return [key_hash, model, hour, failed, split[0], split[3], split[4], split[1], split[2],
            split[5], ts, split[6]]


class QueueReader:
    """What reading queue records remembers from one pop to the next of a drain (every pop
    holds the same few keys, models and hours): key hashes, checked model names, hours."""

    def __init__(self) -> None:
        self.digest, self.hours, self.model_ok = key_hasher(), _Hours(), text_checker("model")


def queue_rows(
    body: bytes | str, reader: QueueReader | None = None
) -> tuple[list[Row], list[Quarantined]]:
    """Rows out of a `/usage-queue` answer, and the records set aside.
    Raises UpstreamUnexpected when the answer as a whole is not a list of records."""
    try:
        items = json.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamUnexpected("The proxy's usage queue answer is not JSON.") from None
    if type(items) is not list:
        raise UpstreamUnexpected("The proxy's usage queue answer is not a list of records.")
    reader = reader or QueueReader()
    digest, hours, model_ok = reader.digest, reader.hours, reader.model_ok
    rows: list[Row] = []
    aside: list[Quarantined] = []
    for item in items:
        key_hash = ""
        try:
            if type(item) is not dict:
                raise BadRecord("a usage record is not an object")
            key, model = item.get("api_key"), item.get("model") or ""
            if type(key) is not str or type(model) is not str:
                raise BadRecord("api_key or model is not text")
            key_hash = digest(key)
            rows.append(row_of(item, key_hash=key_hash, model=model_ok(model[:200]), hours=hours,
                               generation=QUEUE))
        except BadRecord as exc:
            aside.append(Quarantined(str(exc), record_text(item), key_hash))
    return rows, aside


def _member(entry: Any, name: str, kind: type) -> Any:
    """entry[name] when entry is an object that has it; the snapshot shape or an error."""
    value = entry.get(name) if type(entry) is dict else None
    if value is not None and type(value) is not kind:
        raise UpstreamUnexpected(f"The proxy's usage snapshot has a malformed `{name}`.")
    return value


def snapshot_entries(apis: Any) -> Iterable[tuple[str, str, list[Any], str, str]]:
    """(key hash, model, details, masked key, reason) for every list in a `/usage` snapshot's
    `apis` map. `reason` is empty, or why every detail of the list is set aside (a key or model
    name the database cannot store); the model is then an escaped form, fit for a cursor."""
    if type(apis) is not dict:
        raise UpstreamUnexpected("The proxy's usage snapshot has no `apis` map.")
    digest = key_hasher()
    for key, entry in apis.items():
        models = _member(entry, "models", dict) or {}
        try:
            key_hash, reason = digest(key), ""
        except BadRecord as exc:
            key_hash, reason = key_digest(key.encode("utf-8", "surrogatepass").hex()), str(exc)
        for model, model_entry in models.items():
            details = _member(model_entry, "details", list)
            if not details:
                continue
            model = model[:200]
            try:
                yield key_hash, check_text(model, "model"), details, masked(key), reason
            except BadRecord as exc:
                yield key_hash, ascii(model)[1:-1][:200], details, masked(key), reason or str(exc)


def snapshot_rows(
    plan: Iterable[tuple[str, str, list[Any], int, str, str]], aside: list[Quarantined]
) -> Iterator[Row]:
    """Rows for the new tail (from `start`) of each (key hash, model, details, start, masked
    key, reason) list; details that cannot be counted are appended to `aside` instead (once:
    the cursor moves past them like past any other)."""
    hours = _Hours()
    for key_hash, model, details, start, key, reason in plan:
        for detail in islice(details, start, None):
            try:
                if reason:
                    raise BadRecord(reason)
                yield row_of(detail, key_hash=key_hash, model=model, hours=hours,
                             generation=SNAPSHOT)
            except BadRecord as exc:
                aside.append(Quarantined(
                    str(exc), record_text(detail, api_key=key, model=model), key_hash
                ))
