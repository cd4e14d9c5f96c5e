"""Usage records of both proxy generations, reduced to the rows the portal counts.

A row is a list (it is stored as JSON in UsageBatch, and lists are what JSON gives back):
`[key_hash, model, hour, failed, input, output, reasoning, cached, cache_creation, total,
timestamp]`, where `key_hash` is the SHA-256 of the client key (the plaintext is dropped here,
before anything is stored), `hour` is the UTC hour as `YYYY-MM-DDTHH` and `timestamp` the
request's UTC time as RFC 3339 text (for "last used").

This is the hot loop of sync_usage (a busy proxy's snapshot holds millions of details), so it
works on the decoded JSON directly, with plain lists and a few caches, instead of building
objects per record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from pool.models import key_digest
from pool.upstream import UpstreamUnexpected

Row = list[Any]


class BadRecord(ValueError):
    """One record the contract does not allow; the message never holds a key."""


def key_hasher() -> Callable[[str], str]:
    """SHA-256 hex of a key, remembered per run: a batch holds few distinct keys."""
    seen: dict[str, str] = {}

    def digest(value: str) -> str:
        found = seen.get(value)
        if found is None:
            found = seen[value] = key_digest(value)
        return found

    return digest


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
    return parsed


def row_of(raw: Any, *, key_hash: str, model: str, hours: _Hours) -> Row:
    if type(raw) is not dict:
        raise BadRecord("a usage record is not an object")
    hour, ts = hours(raw.get("timestamp"))
    tokens = raw.get("tokens")
    if tokens is None:
        tokens = {}
    elif type(tokens) is not dict:
        raise BadRecord("tokens is not an object")
    get = tokens.get
    # Queue records carry cache reads as `cache_read_tokens`; snapshots only `cached_tokens`.
    # An absent count is 0; `x or 0` also maps null to 0.
    inp, out = get("input_tokens") or 0, get("output_tokens") or 0
    rsn = get("reasoning_tokens") or 0
    cached = get("cache_read_tokens") or get("cached_tokens") or 0
    created, total = get("cache_creation_tokens") or 0, get("total_tokens") or 0
    # One combined check: this runs once per request served.
    if not (type(inp) is int and type(out) is int and type(rsn) is int and type(cached) is int
            and type(created) is int and type(total) is int) \
            or min(inp, out, rsn, cached, created, total) < 0:
        raise BadRecord("a token count is not a non-negative integer")
    return [key_hash, model, hour, 1 if raw.get("failed") is True else 0,
            inp, out, rsn, cached, created, total, ts]


def queue_rows(body: bytes | str) -> tuple[list[Row], int]:
    """Rows out of a `/usage-queue` answer, and how many records could not be read.
    Raises UpstreamUnexpected when the answer as a whole is not a list of records."""
    try:
        items = json.loads(body)
    except ValueError:
        raise UpstreamUnexpected("The proxy's usage queue answer is not JSON.") from None
    if type(items) is not list:
        raise UpstreamUnexpected("The proxy's usage queue answer is not a list of records.")
    digest, hours = key_hasher(), _Hours()
    rows: list[Row] = []
    bad = 0
    for item in items:
        try:
            if type(item) is not dict:
                raise BadRecord("not an object")
            key, model = item.get("api_key"), item.get("model") or ""
            if type(key) is not str or type(model) is not str:
                raise BadRecord("api_key or model is not text")
            rows.append(row_of(item, key_hash=digest(key), model=model[:200], hours=hours))
        except BadRecord:
            bad += 1
    return rows, bad


def _member(entry: Any, name: str, kind: type) -> Any:
    """entry[name] when entry is an object that has it; the snapshot shape or an error."""
    value = entry.get(name) if type(entry) is dict else None
    if value is not None and type(value) is not kind:
        raise UpstreamUnexpected(f"The proxy's usage snapshot has a malformed `{name}`.")
    return value


def snapshot_entries(apis: Any) -> Iterable[tuple[str, str, list[Any]]]:
    """(key hash, model, details) for every list in a `/usage` snapshot's `apis` map."""
    if type(apis) is not dict:
        raise UpstreamUnexpected("The proxy's usage snapshot has no `apis` map.")
    digest = key_hasher()
    for key, entry in apis.items():
        models = _member(entry, "models", dict) or {}
        for model, model_entry in models.items():
            details = _member(model_entry, "details", list)
            if details:
                yield digest(key), model[:200], details


def snapshot_rows(plan: Iterable[tuple[str, str, list[Any], int]]) -> Iterator[Row]:
    """Rows for the new tail (from `start`) of each (key hash, model, details) list. A
    malformed detail rejects the whole snapshot, which costs nothing: it is read again,
    whole, on the next run."""
    hours = _Hours()
    try:
        for key_hash, model, details, start in plan:
            for detail in islice(details, start, None):
                yield row_of(detail, key_hash=key_hash, model=model, hours=hours)
    except BadRecord as exc:
        raise UpstreamUnexpected(f"The proxy's usage snapshot holds a malformed detail ({exc}).")
