"""A client for claude-relay-service (CRS) 1.1.314's admin API.

Written from CRS's source (src/routes/web.js for the login, src/routes/admin/apiKeys.js for
keys, src/routes/admin/usageStats.js for usage records, src/middleware/auth.js for the
session check), not from its web UI. What matters about it:

- The admin logs in with a username and password (`POST /web/auth/login`) and gets a session
  token, sent as `Authorization: Bearer`. The session ends after `adminSessionTimeout` or
  inactivity; a 401 then. The client logs in again once on such a 401 and repeats the call
  once (the auth middleware answers before the route, so a repeated POST cannot double).
- A key's value (`cr_` + 64 hex) is in the create answer only; CRS keeps its hash.
- Limits are fields of the key; 0 means "no limit" in CRS. A key is switched off with
  `isActive: false` (PUT); DELETE is a soft delete (`isDeleted`, and the key is made inactive).
- A missing key is a 404 on the usage routes but a 500 "API key not found" on PUT and
  DELETE (the service throws, the route answers 500): both become UpstreamNotFound here.
- Usage records are per request, newest first by default, capped at 200 per key
  (`addUsageRecord`'s LTRIM) and kept 90 days: a key that makes more than 200 requests
  between two reads loses the oldest ones. `startDate` is inclusive.

Every call is bounded from connect to last byte and in size (pool/bounded.py, through the
relay clients' shared exchange in pool/upstreams/http.py); errors reuse
pool.upstream's classes, with one sentence that never holds the password, the session token
or a key's value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from pool import bounded
from pool.upstream import (
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnexpected,
)
from pool.upstreams import http

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * 1024
USAGE_PAGE_SIZE = 200  # CRS's largest page
MAX_PAGES = 100  # CRS reads at most 5,000 records per key: 25 pages of 200; a bound, not a guess
MAX_KEY_PAGES = 1000  # 100,000 keys at 100 a page: far past any team, still an end
_KEY_VALUE = re.compile(r"cr_[0-9A-Za-z]+")


# --- what comes out ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """A key's limits as CRS names them (None: no limit, sent as CRS's 0)."""

    daily_cost_limit: Decimal | None = None  # dailyCostLimit, USD per day
    total_cost_limit: Decimal | None = None  # totalCostLimit, USD for the key's life
    token_limit: int | None = None  # tokenLimit
    concurrency_limit: int | None = None  # concurrencyLimit
    rate_limit_window: int | None = None  # rateLimitWindow, minutes
    rate_limit_requests: int | None = None  # rateLimitRequests per window
    rate_limit_cost: Decimal | None = None  # rateLimitCost, USD per window
    expires_at: datetime | None = None  # expiresAt (aware)

    def as_crs(self, *, update: bool = False) -> dict[str, Any]:
        # A rate window: creating refuses 0 (below 1 minute) and skips "", while updating
        # skips "" (the old window stays) and takes 0 as "none". So "none" is "" on create
        # and 0 on update.
        none = 0 if update else ""
        return {
            "dailyCostLimit": float(self.daily_cost_limit or 0),
            "totalCostLimit": float(self.total_cost_limit or 0),
            "tokenLimit": self.token_limit or 0,
            "concurrencyLimit": self.concurrency_limit or 0,
            "rateLimitWindow": self.rate_limit_window or none,
            "rateLimitRequests": self.rate_limit_requests or none,
            "rateLimitCost": float(self.rate_limit_cost or 0),
            "expiresAt": _iso(self.expires_at) if self.expires_at else None,
        }


@dataclass(frozen=True)
class CreatedKey:
    id: str
    name: str
    value: str = field(repr=False)  # the `cr_...` value, shown this once


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    is_active: bool
    is_deleted: bool
    daily_cost_limit: Decimal  # 0: no limit, as in CRS (and below)
    total_cost_limit: Decimal
    token_limit: int
    concurrency_limit: int
    rate_limit_window: int  # minutes
    rate_limit_requests: int
    rate_limit_cost: Decimal
    expires_at: datetime | None


@dataclass(frozen=True)
class UsageRecord:
    timestamp: datetime
    model: str
    input_tokens: int
    output_tokens: int
    cache_create_tokens: int
    cache_read_tokens: int
    total_tokens: int
    cost: Decimal  # USD, as CRS rated it (its own prices and multipliers)
    account_id: str | None


@dataclass(frozen=True)
class UsagePage:
    records: list[UsageRecord]  # oldest first
    cursor: datetime | None  # the newest timestamp seen (or the `since` given, when none)


# --- the client -------------------------------------------------------------------------------


class CrsClient:
    def __init__(self, base_url: str, username: str, password: str, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.session = bounded.session()
        self._token: str | None = None
        self.logins = 0  # how many times this client logged in (tests read it)

    def __repr__(self) -> str:
        return f"CrsClient({self.base_url!r}, {self.username!r})"

    # -- calls --

    def login(self) -> None:
        """Gets a session token. UpstreamRefused on wrong credentials."""
        try:
            body = self._send("POST", "/web/auth/login",
                              json={"username": self.username, "password": self._password},
                              authed=False)
        except UpstreamNotFound:
            # Not "no such key": no login route at all, so not a CRS admin API at this URL.
            # Callers that take a missing key as already gone must not take this for one.
            raise UpstreamUnexpected(
                f"CRS at {self.base_url} has no admin login (HTTP 404): is this the address "
                "of a claude-relay-service?") from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamUnexpected(f"CRS at {self.base_url} answered its login without a token.")
        self._token = token
        self.logins += 1

    def logout(self) -> None:
        """Ends the admin session at CRS, if one was opened (best effort, never raises). CRS
        keeps each login's session in Redis for `adminSessionTimeout` (24 h by default):
        a portal that signs in at every sync would otherwise leave one per sync behind."""
        if self._token is None:
            return
        try:
            self._send("POST", "/web/auth/logout")
        except Exception:  # noqa: BLE001 (the session then ends at its timeout)
            pass
        self._token = None

    def create_key(self, *, name: str, limits: Limits = Limits(),
                   description: str = "") -> CreatedKey:
        payload: dict[str, Any] = {"name": name, "description": description, **limits.as_crs()}
        if payload["expiresAt"] is None:
            del payload["expiresAt"]
        data = self._data(self._call("POST", "/admin/api-keys", json=payload), "create a key")
        key_id, value = data.get("id"), data.get("apiKey")
        if not (isinstance(key_id, str) and key_id and isinstance(value, str)
                and value.startswith("cr_")):
            raise UpstreamUnexpected(
                f"CRS at {self.base_url} answered the creation of a key without its id or value.")
        return CreatedKey(id=key_id, name=str(data.get("name", name)), value=value)

    def update_limits(self, key_id: str, limits: Limits, *, active: bool | None = None) -> None:
        """Sets a key's limits. CRS's PUT turns any expiresAt it is sent into `isActive`
        (null: true; a date: whether it is still ahead), which would wake a disabled key; but
        it applies an `isActive` in the same body after that. So:

        - `active` given: isActive is sent with the limits, and the expiry always (null clears
          it), in one PUT: the key ends as `active` says, whatever the expiry did;
        - `active` None: an expiry is sent only when set (never cleared), and a set one still
          re-activates a disabled key whose expiry is ahead: callers that know the key's
          state pass it."""
        payload = limits.as_crs(update=True)
        if active is None:
            if payload["expiresAt"] is None:
                del payload["expiresAt"]
        else:
            payload["isActive"] = active
        self._call("PUT", f"/admin/api-keys/{_id(key_id)}", json=payload)

    def set_active(self, key_id: str, active: bool) -> None:
        """Disables (False) or enables (True) a key: CRS's `isActive`."""
        self._call("PUT", f"/admin/api-keys/{_id(key_id)}", json={"isActive": active})

    def delete_key(self, key_id: str) -> None:
        """CRS's soft delete: the key stops working, and can be restored at CRS."""
        self._call("DELETE", f"/admin/api-keys/{_id(key_id)}")

    def list_keys(self, *, page_size: int = 100) -> list[Key]:
        """Every key CRS lists (it leaves soft-deleted ones out). CRS pages newest first, so
        a key created meanwhile shifts the pages: one seen twice is kept once."""
        keys: dict[str, Key] = {}
        for page in range(1, MAX_KEY_PAGES + 1):
            data = self._data(self._call("GET", "/admin/api-keys",
                                         params={"page": page, "pageSize": page_size}),
                              "list keys")
            items, pagination = data.get("items"), data.get("pagination")
            if not isinstance(items, list) or not isinstance(pagination, dict):
                raise self._shape("list keys")
            for item in items:
                key = self._key(item)
                keys.setdefault(key.id, key)
            if page >= _int(pagination.get("totalPages"), self, "list keys"):
                return list(keys.values())
        raise UpstreamUnexpected(
            f"CRS at {self.base_url} listed more than {MAX_KEY_PAGES} pages of keys.")

    def usage_records(self, key_id: str, *, since: datetime | None = None) -> UsagePage:
        """A key's per-request records at or after `since` (inclusive, as CRS filters), oldest
        first, all pages. Records at exactly `since` come back again: the caller counts each
        record once."""
        records: list[UsageRecord] = []
        params: dict[str, Any] = {"pageSize": USAGE_PAGE_SIZE, "sortOrder": "asc"}
        if since is not None:
            params["startDate"] = _iso(since)
        for page in range(1, MAX_PAGES + 1):
            body = self._call("GET", f"/admin/api-keys/{_id(key_id)}/usage-records",
                              params={**params, "page": page})
            data = self._data(body, "read usage records")
            rows, pagination = data.get("records"), data.get("pagination")
            if not isinstance(rows, list) or not isinstance(pagination, dict):
                raise self._shape("read usage records")
            records.extend(self._record(row) for row in rows)
            if not pagination.get("hasNextPage"):
                break
        else:
            raise UpstreamUnexpected(
                f"CRS at {self.base_url} paged usage records past {MAX_PAGES} pages.")
        cursor = max((r.timestamp for r in records), default=since)
        return UsagePage(records=records, cursor=cursor)

    def version(self) -> str:
        """CRS's version from its public `/health` (no admin session); "" when it gives none."""
        body = self._send("GET", "/health", authed=False)
        version = body.get("version") if isinstance(body, dict) else None
        return version[:40] if isinstance(version, str) else ""

    def health(self) -> None:
        """A cheap authenticated GET (a static list in CRS): raises when CRS is not usable."""
        self._data(self._call("GET", "/admin/supported-clients"), "answer its health check")

    # -- plumbing --

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            self.login()
        try:
            return self._send(method, path, **kwargs)
        except _SessionExpired:
            # Once, never in a loop: a second 401 right after a good login is a refusal.
            self.login()
            try:
                return self._send(method, path, **kwargs)
            except _SessionExpired:
                self._token = None
                raise UpstreamRefused(
                    f"CRS at {self.base_url} refused the admin session right after a login "
                    f"({method} {_path_shape(path)}).") from None

    def _send(self, method: str, path: str, *, authed: bool = True, **kwargs: Any) -> Any:
        url = f"{self.base_url}{path}"
        headers = {"Accept": "application/json"}
        if authed:
            headers["Authorization"] = f"Bearer {self._token}"
        where = f"{method} {_path_shape(path)}"
        reply = http.exchange(self.session, method, url, who=f"CRS at {self.base_url}",
                              where=where, timeout=self.timeout,
                              max_answer_bytes=self.max_answer_bytes, headers=headers, **kwargs)
        status, body = reply.status, reply.body
        if status == 200:
            if body is http.NOT_JSON or body is None:
                raise UpstreamUnexpected(f"CRS at {self.base_url} answered {where} with "
                                         "something that is not JSON.")
            return body
        text = self._error_text(body)
        if status == 401 and authed:
            raise _SessionExpired
        if status in (401, 403):
            raise UpstreamRefused(
                f"CRS at {self.base_url} refused {where} (HTTP {status}): {text}; check "
                "the admin username and password.")
        if status == 404 or (status == 500 and "not found" in text.lower()):
            raise UpstreamNotFound(f"CRS at {self.base_url} has no such key or route "
                                   f"({where}, HTTP {status}).")
        raise UpstreamUnexpected(
            f"CRS at {self.base_url} answered {where} with HTTP {status}: {text}.")

    def _error_text(self, body: Any) -> str:
        text = ""
        if isinstance(body, dict):
            parts = [body.get("error"), body.get("message")]
            parts = [p.get("message") if isinstance(p, dict) else p for p in parts]
            text = " - ".join(str(p) for p in parts if isinstance(p, str) and p)
        return self._scrub(text[:200]) or "no explanation"

    def _scrub(self, text: str) -> str:
        # CRS echoes exception messages; none should hold a secret, but a sentence for a
        # person must not be the way one leaks.
        for secret in (self._password, self._token):
            if secret:
                text = text.replace(secret, "[hidden]")
        return _KEY_VALUE.sub("cr_[hidden]", text)

    def _data(self, body: Any, what: str) -> Any:
        if not isinstance(body, dict) or body.get("success") is not True or "data" not in body:
            raise self._shape(what)
        return body["data"]

    def _shape(self, what: str) -> UpstreamUnexpected:
        return UpstreamUnexpected(
            f"CRS at {self.base_url} answered an unexpected shape when asked to {what}.")

    def _key(self, item: Any) -> Key:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise self._shape("list keys")
        expires = item.get("expiresAt")
        return Key(
            id=item["id"],
            name=str(item.get("name", "")),
            is_active=_flag(item.get("isActive")),
            is_deleted=_flag(item.get("isDeleted")),
            daily_cost_limit=_money(item.get("dailyCostLimit"), self, "list keys"),
            total_cost_limit=_money(item.get("totalCostLimit"), self, "list keys"),
            token_limit=_int(item.get("tokenLimit"), self, "list keys"),
            concurrency_limit=_int(item.get("concurrencyLimit"), self, "list keys"),
            rate_limit_window=_int(item.get("rateLimitWindow"), self, "list keys"),
            rate_limit_requests=_int(item.get("rateLimitRequests"), self, "list keys"),
            rate_limit_cost=_money(item.get("rateLimitCost"), self, "list keys"),
            expires_at=_when(expires, self, "list keys") if expires else None,
        )

    def _record(self, row: Any) -> UsageRecord:
        what = "read usage records"
        if not isinstance(row, dict):
            raise self._shape(what)
        return UsageRecord(
            timestamp=_when(row.get("timestamp"), self, what),
            model=str(row.get("model") or "unknown"),
            input_tokens=_int(row.get("inputTokens"), self, what),
            output_tokens=_int(row.get("outputTokens"), self, what),
            cache_create_tokens=_int(row.get("cacheCreateTokens"), self, what),
            cache_read_tokens=_int(row.get("cacheReadTokens"), self, what),
            total_tokens=_int(row.get("totalTokens"), self, what),
            cost=_money(row.get("cost"), self, what),
            account_id=row.get("accountId") if isinstance(row.get("accountId"), str) else None,
        )


class _SessionExpired(Exception):
    """A 401 on an admin call: the session token is no longer known to CRS."""


def _id(key_id: str) -> str:
    # Key ids are UUIDs; anything else would change the path, so it is refused here.
    if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", key_id or ""):
        raise ValueError("a CRS key id is a UUID")
    return key_id


def _path_shape(path: str) -> str:
    return re.sub(r"/api-keys/[0-9A-Za-z-]+", "/api-keys/<id>", path)


def _iso(moment: datetime) -> str:
    """As CRS writes times (JavaScript's toISOString): UTC, milliseconds, "Z". Cut down to the
    millisecond, so an inclusive `startDate` still takes the moment given."""
    if moment.tzinfo is None:
        raise ValueError("times sent to CRS must be aware")
    utc = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return utc.replace("+00:00", "Z")


def _flag(value: Any) -> bool:
    return value is True or value == "true"


def _int(value: Any, client: CrsClient, what: str) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise client._shape(what)
    try:
        number = int(value)
    except ValueError:
        raise client._shape(what) from None
    if number < 0:
        raise client._shape(what)
    return number


def _money(value: Any, client: CrsClient, what: str) -> Decimal:
    try:
        amount = http.money(value)
    except ValueError:
        raise client._shape(what) from None
    return Decimal(0) if amount is None else amount


def _when(value: Any, client: CrsClient, what: str) -> datetime:
    try:
        return http.aware_time(value)
    except ValueError:
        raise client._shape(what) from None
