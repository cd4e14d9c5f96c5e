"""A client for Claude Code Hub (CCH) 0.9.2's management API, `/api/v1`.

Written from CCH's source (src/app/api/v1/resources/{users,keys,usage-logs,system}/handlers.ts,
the actions they call in src/actions/{users,keys,usage-logs}.ts, src/repository/usage-logs.ts),
not from the older `/api/actions` API, which is deprecated and sunsets on 2026-12-31. What
matters about it:

- Every call carries `Authorization: Bearer <ADMIN_TOKEN>`; there is no login. A wrong token
  is a 401 (`auth.invalid`), a token without admin rights a 403. Errors are RFC 9457 problems
  (`{"type", "title", "status", "detail", "instance", "errorCode", "errorParams"}`): the
  `errorCode` is what tells them apart (`detail` is only the status's title).
- `POST /users` makes a user AND a key named "default" unless `?withDefaultKey=false`; the
  answer is `{"user": {...}, "defaultKey": {"id", "name", "key"}}` (no `defaultKey` without
  one). User names are not unique, at most 64 characters.
- `POST /users/{id}/keys` answers 201 `{"id", "generatedKey": "sk-…", "name"}`: the only time
  the full value is returned through /api/v1 (lists mask it as `maskedKey`). Two enabled keys
  of one user may not share a name (`DUPLICATE_NAME`). A key's USD limit may not exceed its
  user's (`KEY_LIMIT_*_EXCEEDS_USER_LIMIT`), so a key is never given more than its user.
- `PATCH /keys/{id}` needs the key's `name` every time (it is written back); fields left out
  stay as they are; `expiresAt: ""` clears the expiry (null is refused: the action's own
  schema wants a string), an ISO time with "Z" is an instant. An admin may switch off a user's
  last enabled key here, while `POST /keys/{id}:enable` refuses that (CANNOT_DISABLE_LAST_KEY)
  and `DELETE /keys/{id}` refuses to delete it (CANNOT_DELETE_LAST_KEY); a disabled key can
  always be deleted. DELETE is a soft delete (204); the key then gets 401 at `/v1/messages`.
- USD limits are stored with 2 decimals (numeric(10,2)); 0 or null is "no limit". So a limit is
  sent rounded DOWN to the cent (CCH never lets through more than the portal's limit), and a
  positive limit below one cent is sent as $0.01 (0 would lift it). CCH takes at most $10,000
  a day and $200,000 a month: a larger portal limit is not sent (the portal enforces it).
- Users have `dailyQuota`, keys `limitDailyUsd`; both have `limitMonthlyUsd`. The day starts at
  `dailyResetTime` (HH:mm, `dailyResetMode: "fixed"`) in CCH's time zone
  (`GET /system/timezone`: its setting, else TZ, else UTC); the month at 00:00 on the 1st there.
- `GET /usage-logs?keyId=&startTime=<epoch ms, inclusive>` pages newest first by (createdAt,
  id), at most 100 a page; `pageInfo.nextCursor` is base64url JSON `{"createdAt", "id"}`, sent
  back as `cursorCreatedAt` + `cursorId`. A row is written when the request starts
  (`createdAt` is its start) and completed when it ends: until then its `statusCode` is null
  and its tokens are not final. Requests CCH refused on a limit (402) are not logged. Tokens
  are kept in disjoint buckets: `inputTokens` is uncached input (Anthropic's own meaning;
  for OpenAI-style providers CCH subtracts the cached tokens before storing), then
  `cacheCreationInputTokens`, `cacheReadInputTokens`, `outputTokens` (reasoning included).

Every call is bounded from connect to last byte and in size (pool/upstreams/http.py); errors
are pool.upstream's classes with one sentence that never holds the admin token or a key.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Decimal
from typing import Any
from urllib.parse import quote

from pool import bounded
from pool.upstream import (
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnexpected,
)
from pool.upstreams import http

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * 1024
API = "/api/v1"
LOG_PAGE_SIZE = 100  # CCH's largest page
MAX_LOG_PAGES = 1000  # 100,000 requests of one key between two reads: an end, not a guess
NAME_MAX = 64  # users and keys
CENT = Decimal("0.01")
_KEY_VALUE = re.compile(r"sk-[0-9A-Za-z]+")


class LastKey(UpstreamError):
    """CCH refused to delete (or switch off) a user's last enabled key."""


class DuplicateName(UpstreamError):
    """CCH refused a key name the user's enabled keys already have."""


# The largest limits CCH's schemas take (USD): a larger portal limit is left to the portal.
MAX_DAILY = Decimal(10_000)
MAX_MONTHLY = Decimal(200_000)


def cents(amount: Decimal | None, *, most: Decimal | None = None) -> float | None:
    """A USD limit as CCH stores it: None for none; rounded down to the cent; never 0 when
    there is a limit (0 is "no limit" at CCH); None above `most` (CCH refuses more: such a
    limit is the portal's suspension alone). The portal's own limits are whole cents, so only
    a limit of $0 changes here: it becomes $0.01 at CCH (one request may pass), and the
    portal's limit check suspends the key at its next sync."""
    if amount is None or (most is not None and amount > most):
        return None
    rounded = amount.quantize(CENT, rounding=ROUND_DOWN)
    if rounded <= 0:
        rounded = CENT
    return float(rounded)


class Keep:
    """Leave the field as CCH has it (KEEP)."""


KEEP = Keep()


# --- what goes in and comes out ---------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """USD limits of a CCH user or key (None: no limit). `daily_reset_time` is when CCH's day
    starts, HH:mm in CCH's time zone."""

    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    daily_reset_time: str = "00:00"

    def as_cch(self, *, user: bool) -> dict[str, Any]:
        return {
            "dailyQuota" if user else "limitDailyUsd": cents(self.daily_usd, most=MAX_DAILY),
            "limitMonthlyUsd": cents(self.monthly_usd, most=MAX_MONTHLY),
            "dailyResetMode": "fixed",
            "dailyResetTime": self.daily_reset_time,
        }


@dataclass(frozen=True)
class CreatedUser:
    id: int
    default_key_id: int | None  # the "default" key CCH made with the user, if it made one


@dataclass(frozen=True)
class CreatedKey:
    id: int
    name: str
    value: str = field(repr=False)  # the `sk-…` value, shown this once


@dataclass(frozen=True)
class Key:
    id: int
    user_id: int | None
    name: str
    is_enabled: bool
    expires_at: datetime | None
    daily_usd: Decimal | None
    monthly_usd: Decimal | None
    daily_reset_time: str


@dataclass(frozen=True)
class LogRow:
    """One request in CCH's log, tokens in CCH's disjoint buckets."""

    id: int
    created_at: datetime  # when the request started (aware, UTC)
    model: str
    endpoint: str
    status_code: int | None  # None: not finished yet
    input_tokens: int  # uncached input
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    cost: Decimal | None  # CCH's own price (its table, multipliers), USD

    @property
    def finished(self) -> bool:
        return self.status_code is not None


# --- the client -------------------------------------------------------------------------------


class CchClient:
    def __init__(self, base_url: str, admin_token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = admin_token
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.session = bounded.session()
        self.who = f"Claude Code Hub at {self.base_url}"

    def __repr__(self) -> str:
        return f"CchClient({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    # -- users --

    def create_user(self, *, name: str, limits: Limits = Limits(), note: str = "",
                    with_default_key: bool = False) -> CreatedUser:
        payload = {"name": name[:NAME_MAX], "note": note[:200], **limits.as_cch(user=True)}
        suffix = "" if with_default_key else "?withDefaultKey=false"
        body = self._call("POST", f"{API}/users{suffix}", "create a user", json=payload)
        user = body.get("user") if isinstance(body, dict) else None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not _is_id(user_id):
            raise self._shape("create a user")
        default = body.get("defaultKey")
        default_id = default.get("id") if isinstance(default, dict) else None
        return CreatedUser(id=user_id, default_key_id=default_id if _is_id(default_id) else None)

    def update_user_limits(self, user_id: int, limits: Limits) -> None:
        self._call("PATCH", f"{API}/users/{_id(user_id)}", "update a user's limits",
                   json=limits.as_cch(user=True))

    def delete_user(self, user_id: int) -> None:
        self._call("DELETE", f"{API}/users/{_id(user_id)}", "delete a user")

    # -- keys --

    def list_keys(self, user_id: int) -> list[Key]:
        body = self._call("GET", f"{API}/users/{_id(user_id)}/keys", "list a user's keys")
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise self._shape("list a user's keys")
        return [self._key(item) for item in items]

    def create_key(self, user_id: int, *, name: str, limits: Limits = Limits(),
                   expires_at: datetime | None = None) -> CreatedKey:
        payload: dict[str, Any] = {"name": name[:NAME_MAX], "canLoginWebUi": False,
                                   **limits.as_cch(user=False)}
        if expires_at is not None:
            payload["expiresAt"] = _iso(expires_at)
        body = self._call("POST", f"{API}/users/{_id(user_id)}/keys", "create a key",
                          json=payload)
        key_id = body.get("id") if isinstance(body, dict) else None
        value = body.get("generatedKey") if isinstance(body, dict) else None
        if not (_is_id(key_id) and isinstance(value, str) and value.startswith("sk-")):
            raise UpstreamUnexpected(
                f"{self.who} answered the creation of a key without its id or value.")
        return CreatedKey(id=key_id, name=str(body.get("name") or name), value=value)

    def update_key(self, key_id: int, *, name: str, limits: Limits | None = None,
                   expires_at: datetime | None | Keep = KEEP,
                   enabled: bool | None = None) -> None:
        """PATCHes what is given (`expires_at` KEEP: left as it is; None: cleared). `name` is
        the key's current name (CCH writes it back)."""
        payload: dict[str, Any] = {"name": name[:NAME_MAX]}
        if limits is not None:
            payload.update(limits.as_cch(user=False))
        if not isinstance(expires_at, Keep):
            payload["expiresAt"] = "" if expires_at is None else _iso(expires_at)
        if enabled is not None:
            payload["isEnabled"] = enabled
        self._call("PATCH", f"{API}/keys/{_id(key_id)}", "update a key", json=payload)

    def delete_key(self, key_id: int) -> None:
        """CCH's soft delete. LastKey when it is the user's last enabled key."""
        self._call("DELETE", f"{API}/keys/{_id(key_id)}", "delete a key")

    # -- usage --

    def usage_logs(self, key_id: int, *, since: datetime | None = None) -> list[LogRow]:
        """The key's requests that started at or after `since` (CCH's `startTime` is
        inclusive, to the millisecond), oldest first, all pages."""
        params: dict[str, Any] = {"keyId": _id(key_id), "limit": LOG_PAGE_SIZE}
        if since is not None:
            params["startTime"] = epoch_ms(since)
        rows: dict[int, LogRow] = {}
        for _page in range(MAX_LOG_PAGES):
            body = self._call("GET", f"{API}/usage-logs", "read the request log", params=params)
            items = body.get("items") if isinstance(body, dict) else None
            info = body.get("pageInfo") if isinstance(body, dict) else None
            if not isinstance(items, list) or not isinstance(info, dict):
                raise self._shape("read the request log")
            for item in items:
                row = self._row(item)
                rows.setdefault(row.id, row)
            if not info.get("hasMore"):
                return sorted(rows.values(), key=lambda r: (r.created_at, r.id))
            created, last_id = self._cursor(info.get("nextCursor"))
            params = {**params, "cursorCreatedAt": created, "cursorId": last_id}
        raise UpstreamUnexpected(
            f"{self.who} paged one key's request log past {MAX_LOG_PAGES} pages.")

    # -- health --

    def admin_check(self) -> None:
        """Raises unless the token has admin rights: `GET /users?limit=1` is admin-only, while
        the read routes (the time zone, the log) also take any user's key."""
        body = self._call("GET", f"{API}/users", "list users", params={"limit": 1})
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise self._shape("list users")

    def time_zone(self) -> str:
        """CCH's time zone (its windows' days and months); raises when CCH does not answer
        this token."""
        body = self._call("GET", f"{API}/system/timezone", "tell its time zone")
        zone = body.get("timeZone") if isinstance(body, dict) else None
        if not isinstance(zone, str) or not zone:
            raise self._shape("tell its time zone")
        return zone

    # -- plumbing --

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        where = f"{method} {_path_shape(path)}"
        reply = http.exchange(
            self.session, method, f"{self.base_url}{path}", who=self.who, where=where,
            timeout=self.timeout, max_answer_bytes=self.max_answer_bytes,
            headers={"Accept": "application/json", "Authorization": f"Bearer {self._token}"},
            **kwargs,
        )
        if reply.ok:
            if reply.body is http.NOT_JSON:
                raise UpstreamUnexpected(
                    f"{self.who} answered {where} with something that is not JSON.")
            return reply.body
        code, text = self._problem(reply.body)
        status = reply.status
        if status in (401, 403):
            raise UpstreamRefused(
                f"{self.who} refused {where} (HTTP {status}, {code or 'no error code'}); check "
                "the admin token.")
        if code.upper() in ("CANNOT_DELETE_LAST_KEY", "CANNOT_DISABLE_LAST_KEY"):
            raise LastKey(f"{self.who} would not {what}: it is the user's last enabled key.")
        if code.upper() == "DUPLICATE_NAME":
            raise DuplicateName(f"{self.who} would not {what}: the user has an enabled key "
                                "with that name.")
        if status == 404:
            raise UpstreamNotFound(f"{self.who} has no such user, key or route ({where}, "
                                   f"HTTP 404).")
        raise UpstreamUnexpected(
            f"{self.who} answered {where} with HTTP {status}: {code or text}.")

    def _problem(self, body: Any) -> tuple[str, str]:
        if not isinstance(body, dict):
            return "", "no explanation"
        code = body.get("errorCode")
        code = code if isinstance(code, str) else ""
        parts = [body.get("detail"), body.get("title")]
        text = " - ".join(p for p in parts if isinstance(p, str) and p)[:200]
        return self._scrub(code[:100]), self._scrub(text) or "no explanation"

    def _scrub(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "[hidden]")
        return _KEY_VALUE.sub("sk-[hidden]", text)

    def _shape(self, what: str) -> UpstreamUnexpected:
        return UpstreamUnexpected(
            f"{self.who} answered an unexpected shape when asked to {what}.")

    def _cursor(self, value: Any) -> tuple[str, int]:
        # base64url of {"createdAt": "...", "id": n}, without padding (Node's "base64url").
        try:
            raw = base64.urlsafe_b64decode(str(value) + "=" * (-len(str(value)) % 4))
            data = json.loads(raw)
            created, last_id = data["createdAt"], data["id"]
        except (ValueError, TypeError, KeyError):
            raise self._shape("page the request log") from None
        if not isinstance(created, str) or not _is_id(last_id):
            raise self._shape("page the request log")
        return created, last_id

    def _key(self, item: Any) -> Key:
        what = "list a user's keys"
        if not isinstance(item, dict) or not _is_id(item.get("id")):
            raise self._shape(what)
        expires = item.get("expiresAt")
        return Key(
            id=item["id"],
            user_id=item.get("userId") if _is_id(item.get("userId")) else None,
            name=str(item.get("name") or ""),
            is_enabled=item.get("isEnabled") is not False,
            expires_at=self._when(expires, what) if expires else None,
            daily_usd=self._money(item.get("limitDailyUsd"), what),
            monthly_usd=self._money(item.get("limitMonthlyUsd"), what),
            daily_reset_time=str(item.get("dailyResetTime") or "00:00"),
        )

    def _row(self, item: Any) -> LogRow:
        what = "read the request log"
        if not isinstance(item, dict) or not _is_id(item.get("id")):
            raise self._shape(what)
        status = item.get("statusCode")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise self._shape(what)
        return LogRow(
            id=item["id"],
            created_at=self._when(item.get("createdAtRaw") or item.get("createdAt"), what),
            model=str(item.get("model") or "unknown"),
            endpoint=str(item.get("endpoint") or ""),
            status_code=status,
            input_tokens=self._count(item.get("inputTokens"), what),
            output_tokens=self._count(item.get("outputTokens"), what),
            cache_creation_tokens=self._count(item.get("cacheCreationInputTokens"), what),
            cache_read_tokens=self._count(item.get("cacheReadInputTokens"), what),
            cost=self._money(item.get("costUsd"), what),
        )

    def _count(self, value: Any, what: str) -> int:
        if value is None:
            return 0  # CCH leaves a bucket null when the answer had no such count
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._shape(what)
        return value

    def _money(self, value: Any, what: str) -> Decimal | None:
        try:
            return http.money(value)
        except ValueError:
            raise self._shape(what) from None

    def _when(self, value: Any, what: str) -> datetime:
        try:
            return http.aware_time(value).astimezone(timezone.utc)
        except ValueError:
            raise self._shape(what) from None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch_ms(moment: datetime) -> int:
    """Whole milliseconds since the epoch, floored (counted in integers, not through a float):
    the cursor relies on CCH's inclusive startTime meaning exactly this millisecond."""
    if moment.tzinfo is None:
        raise ValueError("times sent to CCH must be aware")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _iso(moment: datetime) -> str:
    """An instant as CCH takes it (with "Z": not read in CCH's time zone)."""
    if moment.tzinfo is None:
        raise ValueError("times sent to CCH must be aware")
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _id(value: int | str) -> str:
    # Ids are positive integers; anything else would change the path, so it is refused here.
    text = str(value)
    if not re.fullmatch(r"[1-9][0-9]{0,17}", text):
        raise ValueError("a CCH id is a positive integer")
    return quote(text)


def _path_shape(path: str) -> str:
    shape = re.sub(r"/(users|keys)/[0-9]+", r"/\1/<id>", path)
    return shape.split("?", 1)[0]
