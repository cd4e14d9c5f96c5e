"""A fake Claude Code Hub 0.9.2: a real HTTP server on 127.0.0.1 that answers the `/api/v1`
calls pool/upstreams/cch.py makes, and the client route keys are used on, as CCH's source does
(src/app/api/v1/resources/*/handlers.ts and the actions behind them), quirks included:

- `Authorization: Bearer <ADMIN_TOKEN>` on every management call; problems are RFC 9457
  (`application/problem+json`, `errorCode`), 401 `auth.invalid` for a wrong token; a user's
  key passes the "read" routes (time zone, log) and gets 403 `auth.forbidden` elsewhere.
- `POST /api/v1/users` makes a "default" key too unless `?withDefaultKey=false`
  (`default_keys=False` makes the fake ignore that flag, as an older CCH would).
- Keys: `sk-` + 32 hex, the value only in the create answer (lists show `maskedKey`); names
  unique among a user's enabled, unexpired keys (DUPLICATE_NAME); a key's limit above its user's is
  refused (KEY_LIMIT_*_EXCEEDS_USER_LIMIT); `PATCH` needs `name`, `expiresAt: null` is refused
  ("" clears); an admin may switch off the last enabled key with PATCH but not with
  `:enable` (CANNOT_DISABLE_LAST_KEY, errorCode OPERATION_FAILED); `DELETE` refuses the last
  enabled key (CANNOT_DELETE_LAST_KEY) and is soft.
- USD limits kept with 2 decimals (rounded as PostgreSQL's numeric(10,2) rounds); 0 is none.
- `POST /v1/messages` with `x-api-key` (or Bearer): 401 (`invalid_api_key`, `key_disabled`,
  `key_expired`, `user_disabled`) as CCH's auth guard answers; 402 (`rate_limit_error`,
  `rate_limit_exceeded`, limit_type `daily_quota` / `monthly_quota`) when the key's or its
  user's cost in the window has reached the limit (the request that crosses it passes, the
  next one is refused; refused requests are not logged); else a log row is written at the
  start (statusCode null, costUsd "0.000000000000000"), the request forwarded to `upstream`
  (an Anthropic-style server, e.g. tests/realproxy.MockUpstream) or answered with `usage`, its
  cost counted for the limits at once, and the row completed `flush_delay` seconds after the
  answer (CCH's batched write, 250 ms) with the tokens in CCH's buckets and the cost by the
  test's price table (`settled()` waits for that). Windows: the day from the key's (user's)
  `dailyResetTime` in `time_zone`, the month from the 1st there.
- `PATCH /users/<unknown>` answers 200 as CCH does; a deleted user's keys stay listed but get
  401; unknown keys are 404 `key.not_found` on PATCH and `KEY_NOT_FOUND` elsewhere.
- `GET /api/v1/usage-logs`: keyId, startTime (ms, >=), endTime (ms, <), keyset pages newest
  first, `limit` <= 100, `pageInfo.nextCursor` base64url JSON, followed with
  `cursorCreatedAt` + `cursorId`.
- Test controls: `prices`, `hold` (a request waits on it before it completes, its row
  unfinished meanwhile), `inject(path_prefix, kind)` one-shot faults ("500", "malformed",
  "drip", "hang"), `admin_requests` (method, path) seen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import requests

from tests.fakes.relay_http import FakeRelayServer

ADMIN_TOKEN = "cch-admin-0123456789abcdef"
MODEL = "claude-sonnet-4-20250514"
# What the fake answers with when it has no upstream (the mock Anthropic's usage, too).
USAGE = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 10000,
         "cache_creation_input_tokens": 2000}
# USD per million tokens (Anthropic's list prices for Sonnet 4): a test may give its own.
PRICES = {"input": Decimal(3), "output": Decimal(15), "cache_write": Decimal("3.75"),
          "cache_read": Decimal("0.3")}
LIMIT_FIELDS = ("limitDailyUsd", "limitMonthlyUsd", "limit5hUsd", "limitWeeklyUsd",
                "limitTotalUsd")


def cost_of(usage: dict[str, int], prices: dict[str, Decimal] = PRICES) -> Decimal:
    million = Decimal(1_000_000)
    return (usage.get("input_tokens", 0) * prices["input"]
            + usage.get("output_tokens", 0) * prices["output"]
            + usage.get("cache_creation_input_tokens", 0) * prices["cache_write"]
            + usage.get("cache_read_input_tokens", 0) * prices["cache_read"]) / million


def _cents(value: Any) -> Decimal | None:
    if value is None:
        return None
    return Decimal(str(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _raw(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _problem(status: int, code: str, detail: str = "") -> tuple[int, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    return status, {"type": f"urn:claude-code-hub:problem:{code}",
                    "title": titles.get(status, "Error"), "status": status,
                    "detail": detail or titles.get(status, "Error"), "instance": "",
                    "errorCode": code, "errorParams": {}}


class FakeCch(FakeRelayServer):
    def __init__(self, *, admin_token: str = ADMIN_TOKEN, time_zone: str = "Asia/Shanghai",
                 upstream: str | None = None, default_keys: bool = True,
                 usage: dict[str, int] | None = None,
                 prices: dict[str, dict[str, Decimal]] | None = None,
                 flush_delay: float = 0.25) -> None:
        self.admin_token = admin_token
        self.time_zone = time_zone
        self.upstream = upstream
        self.honours_without_default = default_keys
        self.usage = dict(usage or USAGE)
        # USD per million tokens by model; a model not in it costs 0, as at CCH without a price.
        self.prices = {MODEL: PRICES} if prices is None else prices
        self.users: dict[int, dict[str, Any]] = {}
        self.keys: dict[int, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        # (key id, user id, start, cost) of each answered request: what the limits count.
        self.ledger: list[tuple[int, int, datetime, Decimal]] = []
        self.flush_delay = flush_delay
        self._unflushed = 0
        self.admin_requests: list[tuple[str, str]] = []
        self.hold: threading.Event | None = None
        self.held = threading.Event()  # set when a request waits on `hold`
        self._ids = {"user": 0, "key": 0, "log": 0}
        super().__init__(lock=threading.RLock())

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        super().stop()

    # -- how CCH words things (tests/fakes/relay_http.py serves them) --

    malformed_body = b'{"items": ['

    def bad_json(self) -> tuple[int, Any]:
        return _problem(400, "request.invalid_json")

    def internal_error(self) -> tuple[int, Any]:
        return _problem(500, "internal_error")

    def content_type(self, status: int, answer: Any) -> str:
        problem = status >= 400 and isinstance(answer, dict) and "errorCode" in answer
        return "application/problem+json" if problem else "application/json"

    def dispatch(self, method: str, path: str, query: dict[str, str], body: Any,
                 headers: Any) -> tuple[int, Any]:
        # The client route takes the lock itself, around its bookkeeping only, so that a
        # request held by `hold` does not stop the admin routes.
        if path == "/v1/messages" and method == "POST":
            return self.messages(body, headers)
        return super().dispatch(method, path, query, body, headers)

    def _next(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def user_keys(self, user_id: int) -> list[dict[str, Any]]:
        return [k for k in self.keys.values() if k["userId"] == user_id and not k["deleted"]]

    # -- routes --

    def route(self, method: str, path: str, query: dict[str, str], body: Any,
              headers: Any) -> tuple[int, Any]:
        if path.startswith("/api/v1/"):
            if path == "/api/v1/health":
                return 200, {"status": "ok"}
            self.admin_requests.append((method, path))
            auth = headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:]:
                return _problem(401, "auth.missing", "Authentication is required.")
            if auth[7:] != self.admin_token:
                digest = hashlib.sha256(auth[7:].encode()).hexdigest()
                key = next((k for k in self.keys.values()
                            if k["hash"] == digest and not k["deleted"]), None)
                if key is None:
                    return _problem(401, "auth.invalid", "Invalid credentials.")
                # A user's key passes the "read" routes only (as their own user).
                rest = path[len("/api/v1/"):]
                if method != "GET" or rest not in ("system/timezone", "usage-logs"):
                    return _problem(403, "auth.forbidden", "Admin access is required.")
                if rest == "usage-logs":
                    mine = {k["id"] for k in self.user_keys(key["userId"])}
                    if "keyId" in query and int(query["keyId"]) not in mine:
                        return 200, {"items": [], "pageInfo": {"nextCursor": None,
                                                               "hasMore": False, "limit": 20}}
            return self._admin(method, path[len("/api/v1/"):], query, body)
        return _problem(404, "resource.not_found")

    def _admin(self, method: str, rest: str, query: dict[str, str],
               body: Any) -> tuple[int, Any]:
        parts = rest.split("/")
        if rest == "system/timezone" and method == "GET":
            return 200, {"timeZone": self.time_zone}
        if rest == "users" and method == "GET":
            live = [self._public_user(u) for u in self.users.values() if not u["deleted"]]
            limit = int(query.get("limit", 50))
            return 200, {"items": live[:limit], "pageInfo": {
                "nextCursor": None, "hasMore": len(live) > limit, "limit": limit}}
        if rest == "users" and method == "POST":
            return self._user_create(body, query.get("withDefaultKey") != "false")
        if len(parts) == 2 and parts[0] == "users" and parts[1].isdigit():
            user = self.users.get(int(parts[1]))
            if method == "PATCH" and (user is None or user["deleted"]):
                # editUser updates no row and says it did: no 404 for an unknown user.
                return 200, {"id": int(parts[1]), "updated": True}
            if user is None or user["deleted"]:
                return _problem(404, "NOT_FOUND")
            if method == "PATCH":
                return self._user_update(user, body)
            if method == "DELETE":
                # Soft; its keys stay listed (not deleted) but no longer work.
                user["deleted"] = True
                return 204, None
        if len(parts) == 3 and parts[0] == "users" and parts[2] == "keys":
            user = self.users.get(int(parts[1])) if parts[1].isdigit() else None
            if method == "GET":
                if user is None:
                    return 200, {"items": []}  # findKeyList of an unknown user: nothing
                return 200, {"items": [self._public(k) for k in self.user_keys(user["id"])]}
            if method == "POST":
                if user is None or user["deleted"]:
                    return _problem(404, "key.not_found")  # "用户不存在": 404 by its text
                return self._key_create(user, body)
        if len(parts) == 2 and parts[0] == "keys":
            key_part, _, action = parts[1].partition(":")
            key = self.keys.get(int(key_part)) if key_part.isdigit() else None
            if key is None or key["deleted"]:
                return _problem(404, "key.not_found" if method == "PATCH" or action == "reveal"
                                else "KEY_NOT_FOUND")
            if method == "PATCH" and not action:
                return self._key_update(key, body)
            if method == "DELETE" and not action:
                return self._key_delete(key)
            if method == "POST" and action == "enable":
                return self._key_enable(key, body)
        if rest == "usage-logs" and method == "GET":
            return self._logs(query)
        return _problem(404, "resource.not_found")

    def _bad(self, field: str) -> tuple[int, Any]:
        return _problem(400, "request.validation_failed", f"{field} is invalid.")

    @staticmethod
    def _money_ok(body: dict[str, Any], name: str) -> bool:
        value = body.get(name)
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and value >= 0)

    def _user_create(self, body: Any, default_key: bool) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not (
                0 < len(body["name"].strip()) <= 64):
            return self._bad("name")
        for name in ("dailyQuota", "limitMonthlyUsd"):
            if not self._money_ok(body, name):
                return self._bad(name)
        user_id = self._next("user")
        user = {"id": user_id, "name": body["name"].strip(), "note": body.get("note", ""),
                "dailyQuota": _cents(body.get("dailyQuota")),
                "limitMonthlyUsd": _cents(body.get("limitMonthlyUsd")),
                "dailyResetTime": body.get("dailyResetTime", "00:00"),
                "dailyResetMode": body.get("dailyResetMode", "fixed"), "deleted": False,
                "isEnabled": True}
        self.users[user_id] = user
        answer: dict[str, Any] = {"user": self._public_user(user)}
        if default_key or not self.honours_without_default:
            key, value = self._key_new(user, "default", {})
            answer["defaultKey"] = {"id": key["id"], "name": "default", "key": value}
        return 201, answer

    def _user_update(self, user: dict[str, Any], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return self._bad("body")
        for name in ("dailyQuota", "limitMonthlyUsd"):
            if not self._money_ok(body, name):
                return self._bad(name)
            if name in body:
                user[name] = _cents(body[name])
        for name in ("dailyResetTime", "dailyResetMode", "name", "note"):
            if name in body:
                user[name] = body[name]
        return 200, {"id": user["id"], "updated": True}

    @staticmethod
    def _public_user(user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "name": user["name"], "role": "user", "isEnabled": True,
                "dailyQuota": None if user["dailyQuota"] is None else float(user["dailyQuota"]),
                "limitMonthlyUsd": None if user["limitMonthlyUsd"] is None
                else float(user["limitMonthlyUsd"])}

    def _over_user(self, user: dict[str, Any], key_limits: dict[str, Any]) -> str | None:
        for key_field, user_field, code in (
                ("limitDailyUsd", "dailyQuota", "KEY_LIMIT_DAILY_EXCEEDS_USER_LIMIT"),
                ("limitMonthlyUsd", "limitMonthlyUsd", "KEY_LIMIT_MONTHLY_EXCEEDS_USER_LIMIT")):
            mine, theirs = key_limits.get(key_field), user.get(user_field)
            if mine and mine > 0 and theirs and theirs > 0 and mine > theirs:
                return code
        return None

    def _key_new(self, user: dict[str, Any], name: str,
                 body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        value = "sk-" + secrets.token_hex(16)
        key = {"id": self._next("key"), "userId": user["id"], "name": name,
               "hash": hashlib.sha256(value.encode()).hexdigest(), "value": value,
               "isEnabled": body.get("isEnabled", True),
               "canLoginWebUi": body.get("canLoginWebUi", True),
               "expiresAt": None, "dailyResetTime": body.get("dailyResetTime", "00:00"),
               "dailyResetMode": body.get("dailyResetMode", "fixed"), "deleted": False,
               "createdAt": _iso(datetime.now(timezone.utc))}
        for name_ in LIMIT_FIELDS:
            key[name_] = _cents(body.get(name_))
        if body.get("expiresAt"):
            key["expiresAt"] = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
        self.keys[key["id"]] = key
        return key, value

    def _key_create(self, user: dict[str, Any], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not (
                0 < len(body["name"].strip()) <= 64):
            return self._bad("name")
        if not all(self._money_ok(body, n) for n in LIMIT_FIELDS):
            return self._bad("limit")
        if "expiresAt" in body and body["expiresAt"] is not None and not isinstance(
                body["expiresAt"], str):
            return self._bad("expiresAt")
        name = body["name"].strip()
        now = datetime.now(timezone.utc)
        if any(k["name"] == name and k["isEnabled"]
               and (k["expiresAt"] is None or k["expiresAt"] > now)
               for k in self.user_keys(user["id"])):
            return _problem(400, "DUPLICATE_NAME")
        code = self._over_user(user, {n: _cents(body.get(n)) for n in LIMIT_FIELDS})
        if code:
            return _problem(400, code)
        key, value = self._key_new(user, name, body)
        return 201, {"id": key["id"], "generatedKey": value, "name": name}

    def _key_update(self, key: dict[str, Any], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not (
                body["name"].strip()):
            return self._bad("name")
        if not all(self._money_ok(body, n) for n in LIMIT_FIELDS):
            return self._bad("limit")
        if "expiresAt" in body and not isinstance(body["expiresAt"], str):
            # The v1 schema lets null through; editKey's own schema wants a string: a 400.
            return _problem(400, "key.action_failed")
        wanted = {n: _cents(body[n]) if n in body else key[n] for n in LIMIT_FIELDS}
        code = self._over_user(self.users[key["userId"]], wanted)
        if code:
            return _problem(400, code)
        key.update(wanted)
        key["name"] = body["name"].strip()
        if "expiresAt" in body:
            key["expiresAt"] = datetime.fromisoformat(
                body["expiresAt"].replace("Z", "+00:00")) if body["expiresAt"] else None
        for name in ("isEnabled", "dailyResetTime", "dailyResetMode", "canLoginWebUi"):
            if name in body:
                key[name] = body[name]
        return 200, {"ok": True}

    def _enabled_count(self, user_id: int) -> int:
        return sum(1 for k in self.user_keys(user_id) if k["isEnabled"])

    def _key_delete(self, key: dict[str, Any]) -> tuple[int, Any]:
        if key["isEnabled"] and self._enabled_count(key["userId"]) <= 1:
            return _problem(400, "CANNOT_DELETE_LAST_KEY")
        key["deleted"] = True
        return 204, None

    def _key_enable(self, key: dict[str, Any], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("enabled"), bool):
            return self._bad("enabled")
        if not body["enabled"] and self._enabled_count(key["userId"]) <= 1:
            return _problem(400, "OPERATION_FAILED")
        key["isEnabled"] = body["enabled"]
        return 200, {"ok": True}

    @staticmethod
    def _public(key: dict[str, Any]) -> dict[str, Any]:
        shown = {k: v for k, v in key.items() if k not in ("hash", "value", "deleted")}
        for name in LIMIT_FIELDS:
            shown[name] = None if key[name] is None else float(key[name])
        shown["expiresAt"] = _iso(key["expiresAt"]) if key["expiresAt"] else None
        shown["maskedKey"] = key["value"][:7] + "••••••" + key["value"][-4:]
        return shown

    def _logs(self, query: dict[str, str]) -> tuple[int, Any]:
        try:
            limit = int(query.get("limit", 20))
            if not 1 <= limit <= 100:
                raise ValueError
            rows = [r for r in self.logs
                    if "keyId" not in query or r["keyId"] == int(query["keyId"])]
            if "startTime" in query:
                start = datetime.fromtimestamp(int(query["startTime"]) / 1000, timezone.utc)
                rows = [r for r in rows if r["at"] >= start]
            if "endTime" in query:
                end = datetime.fromtimestamp(int(query["endTime"]) / 1000, timezone.utc)
                rows = [r for r in rows if r["at"] < end]
            if query.get("cursorCreatedAt") and query.get("cursorId"):
                after = (datetime.fromisoformat(query["cursorCreatedAt"].replace("Z", "+00:00")),
                         int(query["cursorId"]))
                rows = [r for r in rows if (r["at"], r["id"]) < after]
        except ValueError:
            return self._bad("query")
        rows.sort(key=lambda r: (r["at"], r["id"]), reverse=True)
        page, more = rows[:limit], len(rows) > limit
        cursor = None
        if more:
            last = page[-1]
            cursor = base64.urlsafe_b64encode(json.dumps(
                {"createdAt": _raw(last["at"]), "id": last["id"]}).encode()).decode().rstrip("=")
        return 200, {"items": [self._log_public(r) for r in page],
                     "pageInfo": {"nextCursor": cursor, "hasMore": more, "limit": limit}}

    def _log_public(self, row: dict[str, Any]) -> dict[str, Any]:
        key = self.keys[row["keyId"]]
        return {"id": row["id"], "createdAt": _iso(row["at"]), "createdAtRaw": _raw(row["at"]),
                "userName": self.users[key["userId"]]["name"], "keyName": key["name"],
                "providerName": "mock", "model": row["model"], "endpoint": "/v1/messages",
                "statusCode": row["statusCode"], "inputTokens": row["inputTokens"],
                "outputTokens": row["outputTokens"],
                "cacheCreationInputTokens": row["cacheCreationInputTokens"],
                "cacheReadInputTokens": row["cacheReadInputTokens"],
                "totalTokens": sum(row[n] or 0 for n in (
                    "inputTokens", "outputTokens", "cacheCreationInputTokens",
                    "cacheReadInputTokens")),
                "costUsd": row["costUsd"], "durationMs": row["durationMs"],
                "blockedBy": None, "isReplay": False}

    # -- the client route --

    def _window_start(self, now: datetime, period: str, reset: str) -> datetime:
        zone = ZoneInfo(self.time_zone)
        local = now.astimezone(zone)
        if period == "monthly":
            return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        hour, minute = (int(p) for p in reset.split(":"))
        start = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return start if start <= local else start - timedelta(days=1)

    def _spent(self, *, key_id: int | None = None, user_id: int | None = None,
               since: datetime) -> Decimal:
        return sum((cost for k, u, at, cost in self.ledger
                    if (key_id is None or k == key_id) and (user_id is None or u == user_id)
                    and at >= since), Decimal(0))

    def _refusal(self, key: dict[str, Any]) -> tuple[int, Any] | None:
        now = datetime.now(timezone.utc)
        user = self.users[key["userId"]]
        own, everyone = {"key_id": key["id"]}, {"user_id": user["id"]}
        checks = (
            (key["limitDailyUsd"], own, "daily", key["dailyResetTime"], "daily_quota"),
            (user["dailyQuota"], everyone, "daily", user["dailyResetTime"], "daily_quota"),
            (key["limitMonthlyUsd"], own, "monthly", "00:00", "monthly_quota"),
            (user["limitMonthlyUsd"], everyone, "monthly", "00:00", "monthly_quota"),
        )
        for limit, whose, period, reset, kind in checks:
            if not limit or limit <= 0:
                continue
            start = self._window_start(now, period, reset)
            spent = self._spent(**whose, since=start)
            if spent >= limit:
                reset_at = (start + timedelta(days=1) if period == "daily"
                            else (start + timedelta(days=32)).replace(day=1))
                return 402, {"error": {
                    "type": "rate_limit_error", "code": "rate_limit_exceeded",
                    "message": f"额度超限：当前 ${spent:.4f} USD（限制：${limit:.4f} USD）",
                    "limit_type": kind, "current": float(spent), "limit": float(limit),
                    "reset_time": _iso(reset_at)}}
        return None

    def messages(self, body: Any, headers: Any) -> tuple[int, Any]:
        value = headers.get("x-api-key") or headers.get("Authorization", "")[7:]
        digest = hashlib.sha256(value.encode()).hexdigest()
        with self.lock:
            key = next((k for k in self.keys.values() if k["hash"] == digest), None)
            now = datetime.now(timezone.utc)
            refused = self._unauthorized(key, now) or self._refusal(key)
            if refused is not None:
                return refused
            model = (body or {}).get("model") or MODEL
            # Written as the request starts: no status, no tokens, a zero cost (not null).
            row = {"id": self._next("log"), "keyId": key["id"], "at": now, "model": model,
                   "statusCode": None, "inputTokens": None, "outputTokens": None,
                   "cacheCreationInputTokens": None, "cacheReadInputTokens": None,
                   "costUsd": "0.000000000000000", "durationMs": None}
            self.logs.append(row)
        hold = self.hold
        if hold is not None:
            self.held.set()
            hold.wait(30)
        if self.upstream:
            forwarded = requests.post(f"{self.upstream}/v1/messages", json=body,
                                      headers={"x-api-key": "upstream-dummy",
                                               "anthropic-version": "2023-06-01"}, timeout=30)
            status, answer = forwarded.status_code, forwarded.json()
        else:
            status, answer = 200, {"id": "msg_fake", "type": "message", "role": "assistant",
                                   "model": model, "stop_reason": "end_turn",
                                   "content": [{"type": "text", "text": "ok"}],
                                   "usage": self.usage}
        usage = (answer.get("usage") or {}) if status == 200 else {}
        prices = self.prices.get(model)
        cost = cost_of(usage, prices) if prices else Decimal(0)
        done = dict(statusCode=status, durationMs=int(
            (datetime.now(timezone.utc) - now).total_seconds() * 1000),
            inputTokens=usage.get("input_tokens"), outputTokens=usage.get("output_tokens"),
            cacheCreationInputTokens=usage.get("cache_creation_input_tokens"),
            cacheReadInputTokens=usage.get("cache_read_input_tokens"),
            costUsd=f"{cost:.15f}")
        with self.lock:
            # The limits count the cost at once (CCH's lease in Redis)...
            self.ledger.append((key["id"], key["userId"], now, cost))
            # ...the log row is completed by a batched write a little after the answer.
            self._unflushed += 1
        timer = threading.Timer(self.flush_delay, self._complete, args=(row, done))
        timer.daemon = True
        timer.start()
        return status, answer

    def _complete(self, row: dict[str, Any], done: dict[str, Any]) -> None:
        with self.lock:
            row.update(done)
            self._unflushed -= 1

    def settled(self, timeout: float = 10.0) -> bool:
        """Waits until every answered request's log row is completed (CCH's batched write);
        True when that happened within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self._unflushed == 0:
                    return True
            time.sleep(0.02)
        return False

    def _unauthorized(self, key: dict[str, Any] | None, now: datetime) -> tuple[int, Any] | None:
        def refused(kind: str, message: str) -> tuple[int, Any]:
            return 401, {"error": {"message": message, "type": kind, "code": kind}}

        if key is None or key["deleted"] or self.users[key["userId"]]["deleted"]:
            return refused("invalid_api_key", "API 密钥无效。提供的密钥不存在或已被删除。")
        if not key["isEnabled"]:
            return refused("key_disabled", "API 密钥已被禁用。")
        if key["expiresAt"] is not None and key["expiresAt"] <= now:
            return refused("key_expired", "API 密钥已过期。")
        if not self.users[key["userId"]]["isEnabled"]:
            return refused("user_disabled", "用户账户已被禁用。请联系管理员。")
        return None
