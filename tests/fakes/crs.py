"""A fake claude-relay-service 1.1.314: a real HTTP server on 127.0.0.1 that answers as CRS's
source does (../shared/upstreams/claude-relay-service/src), quirks included, for the calls
pool/upstreams/crs.py makes and the client route keys are used on.

- `POST /web/auth/login` gives a session token; admin routes want `Authorization: Bearer`
  and answer 401 "Invalid or expired admin session" for an unknown token
  (`expire_sessions()` forgets every token, as CRS's session timeout does).
- `POST /admin/api-keys`: the `cr_` + 64 hex value is in this answer only (only its SHA-256
  is kept); `PUT` updates limits and `isActive`; `DELETE` is soft (`isDeleted`, made
  inactive, left out of the list). PUT and DELETE of an unknown id answer 500 "API key not
  found" (CRS's service throws, the route answers 500); the usage routes answer 404.
- `GET /admin/api-keys` pages (`items`, `pagination.totalPages`); `GET
  /admin/api-keys/<id>/usage-records` pages per-request records with CRS's field names,
  `startDate` inclusive, capped at 200 records per key; `GET /admin/supported-clients`.
- `GET /api/v1/models` with a working key: the model list (the portal's "test this key").
- `POST /api/v1/messages` with `x-api-key` (or `Authorization: Bearer`): 401 for an unknown,
  disabled or deleted key; 402 once the key's cost today has reached `dailyCostLimit` (so
  the request that crosses the limit still passes, the next one is refused); otherwise an
  Anthropic-style answer with USAGE, recorded and priced as CRS prices
  claude-sonnet-4-20250514 with no pricing file.
- `PUT` with `expiresAt` sets `isActive` from it (null: on; a date: whether still ahead),
  then an `isActive` in the same body wins; an expired key is refused (401); a name over
  100 UTF-16 code units is refused (400); `POST /web/auth/logout` ends the session;
  `GET /health` gives the version.
- Test controls: `inject(path_prefix, kind)` one-shot faults ("500", "malformed", "drip",
  "hang"), `expire_sessions()`, `record(key_id, usage, at=...)` to place a request's record
  at a given moment, `admin_requests` (method, path) seen.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from tests.fakes.relay_http import FakeRelayServer

USERNAME = "crsadmin"
PASSWORD = "crs-admin-pass-1"
MODEL = "claude-sonnet-4-20250514"
# What the mock Anthropic upstream of the contract tests answers with, too.
USAGE = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 10000,
         "cache_creation_input_tokens": 2000}
# CRS's built-in prices for MODEL (src/utils/costCalculator.js), USD per million tokens.
PRICE = {"input": Decimal(3), "output": Decimal(15), "cache_write": Decimal("3.75"),
         "cache_read": Decimal("0.3")}
MAX_RECORDS = 200  # redis.addUsageRecord's LTRIM


def cost_of(usage: dict[str, int]) -> Decimal:
    million = Decimal(1_000_000)
    return (usage["input_tokens"] * PRICE["input"] + usage["output_tokens"] * PRICE["output"]
            + usage["cache_creation_input_tokens"] * PRICE["cache_write"]
            + usage["cache_read_input_tokens"] * PRICE["cache_read"]) / million


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _js_length(text: str) -> int:
    """JavaScript's String.length: UTF-16 code units (a character past U+FFFF counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class FakeCrs(FakeRelayServer):
    malformed_body = b'{"success": true, "data": ['

    def __init__(self, *, username: str = USERNAME, password: str = PASSWORD) -> None:
        self.username, self.password = username, password
        self.sessions: set[str] = set()
        self.keys: dict[str, dict[str, Any]] = {}
        self.records: dict[str, list[dict[str, Any]]] = {}  # newest first, as CRS's LPUSH
        self.admin_requests: list[tuple[str, str]] = []
        super().__init__()

    def expire_sessions(self) -> None:
        self.sessions.clear()

    # -- routes --

    def route(self, method: str, path: str, query: dict[str, str], body: Any,
              headers: Any) -> tuple[int, Any]:
        if path == "/web/auth/login" and method == "POST":
            return self._login(body)
        if path == "/web/auth/logout" and method == "POST":
            self.sessions.discard(headers.get("Authorization", "")[7:])
            return 200, {"success": True, "message": "Logout successful"}
        if path.startswith("/admin/"):
            self.admin_requests.append((method, path))
            auth = headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return 401, {"error": "Missing admin token",
                             "message": "Please provide an admin token"}
            if auth[7:] not in self.sessions:
                return 401, {"error": "Invalid admin token",
                             "message": "Invalid or expired admin session"}
            return self._admin(method, path.split("/")[2:], query, body)
        if path == "/health" and method == "GET":
            return 200, {"status": "healthy", "service": "claude-relay-service",
                         "version": "1.1.314"}
        if path == "/api/v1/messages" and method == "POST":
            return self._messages(body, headers)
        if path == "/api/v1/models" and method == "GET":
            return self._models(headers)
        return 404, {"error": "Not Found", "message": f"Route {path} not found"}

    def _login(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not body.get("username") or not body.get("password"):
            return 400, {"error": "Missing credentials",
                         "message": "Username and password are required"}
        if body["username"] != self.username or body["password"] != self.password:
            return 401, {"error": "Invalid credentials",
                         "message": "Invalid username or password"}
        token = secrets.token_hex(32)
        self.sessions.add(token)
        return 200, {"success": True, "token": token, "expiresIn": 86400000,
                     "username": self.username}

    def _admin(self, method: str, parts: list[str], query: dict[str, str],
               body: Any) -> tuple[int, Any]:
        if parts == ["supported-clients"] and method == "GET":
            return 200, {"success": True, "data": [{"id": "claude_code", "name": "Claude Code"}]}
        if parts == ["api-keys"] and method == "POST":
            return self._create(body or {})
        if parts == ["api-keys"] and method == "GET":
            return self._list(query)
        if len(parts) == 2 and parts[0] == "api-keys" and method in ("PUT", "DELETE"):
            key = self.keys.get(parts[1])
            if key is None:
                verb = "update" if method == "PUT" else "delete"
                return 500, {"error": f"Failed to {verb} API key", "message": "API key not found"}
            if method == "DELETE":
                key.update(isDeleted=True, isActive=False)
                return 200, {"success": True, "message": "API key deleted successfully"}
            return self._update(key, body or {})
        if len(parts) == 3 and parts[0] == "api-keys" and parts[2] == "usage-records":
            if parts[1] not in self.keys:
                return 404, {"success": False, "error": "API key not found"}
            return self._usage(parts[1], query)
        return 404, {"error": "Not Found"}

    def _create(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            return 400, {"error": "Name is required and must be a non-empty string"}
        if _js_length(name) > 100:
            return 400, {"error": "Name must be less than 100 characters"}
        key_id, value = str(uuid.uuid4()), "cr_" + secrets.token_hex(32)
        key = {"id": key_id, "name": name, "hash": hashlib.sha256(value.encode()).hexdigest(),
               "isActive": True, "isDeleted": False, "dailyCostLimit": 0.0,
               "totalCostLimit": 0.0, "tokenLimit": 0, "concurrencyLimit": 0,
               "rateLimitWindow": 0, "rateLimitRequests": 0, "rateLimitCost": 0.0,
               "expiresAt": "", "dailyCost": Decimal(0), "totalCost": Decimal(0)}
        for name in ("rateLimitWindow", "rateLimitRequests"):
            # Creating refuses a window (or a count) below 1; "" means none.
            if body.get(name) not in (None, "") and int(body[name]) < 1:
                return 400, {"error": "Rate limit window must be a positive integer (minutes)"}
        self._apply_limits(key, body)
        self.keys[key_id] = key
        public = {k: v for k, v in key.items() if k not in ("hash", "dailyCost", "totalCost")}
        return 200, {"success": True, "data": {**public, "apiKey": value}}

    def _update(self, key: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        if "isActive" in body and not isinstance(body["isActive"], bool):
            return 400, {"error": "isActive must be a boolean"}
        self._apply_limits(key, body)
        if "expiresAt" in body:
            # CRS's PUT: null clears the expiry and activates the key; a date activates it
            # when still ahead, disables it otherwise...
            at = body["expiresAt"]
            key["isActive"] = True if at is None else _parse(at) > datetime.now(timezone.utc)
        if "isActive" in body:
            # ...and an isActive in the same body is applied after that, so it wins.
            key["isActive"] = body["isActive"]
        return 200, {"success": True, "message": "API key updated successfully"}

    @staticmethod
    def _apply_limits(key: dict[str, Any], body: dict[str, Any]) -> None:
        # A field that is absent, null or "" leaves the value as it was (on update too).
        for name in ("dailyCostLimit", "totalCostLimit", "rateLimitCost"):
            if body.get(name) not in (None, ""):
                key[name] = float(body[name])
        for name in ("tokenLimit", "concurrencyLimit", "rateLimitWindow", "rateLimitRequests"):
            if body.get(name) not in (None, ""):
                key[name] = int(body[name])
        if "expiresAt" in body:
            key["expiresAt"] = body["expiresAt"] or ""

    def _list(self, query: dict[str, str]) -> tuple[int, Any]:
        page, size = int(query.get("page", 1)), int(query.get("pageSize", 20))
        live = [self._public(k) for k in self.keys.values() if not k["isDeleted"]]
        total_pages = max(1, -(-len(live) // size))
        page = min(max(page, 1), total_pages)
        return 200, {"success": True, "data": {
            "items": live[(page - 1) * size:page * size],
            "pagination": {"page": page, "pageSize": size, "total": len(live),
                           "totalPages": total_pages}, "availableTags": []}}

    @staticmethod
    def _public(key: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in key.items() if k not in ("hash", "dailyCost", "totalCost")}

    def _usage(self, key_id: str, query: dict[str, str]) -> tuple[int, Any]:
        size = min(max(int(query.get("pageSize", 50)), 1), 200)
        rows = list(self.records.get(key_id, []))
        if query.get("startDate"):
            start = datetime.fromisoformat(query["startDate"].replace("Z", "+00:00"))
            rows = [r for r in rows
                    if datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) >= start]
        rows.sort(key=lambda r: r["timestamp"], reverse=query.get("sortOrder") != "asc")
        total_pages = -(-len(rows) // size) if rows else 0
        page = min(max(int(query.get("page", 1)), 1), total_pages) if total_pages else 1
        return 200, {"success": True, "data": {
            "records": rows[(page - 1) * size:page * size],
            "pagination": {"currentPage": page, "pageSize": size, "totalRecords": len(rows),
                           "totalPages": total_pages,
                           "hasNextPage": total_pages > 0 and page < total_pages,
                           "hasPreviousPage": total_pages > 0 and page > 1}}}

    def _models(self, headers: Any) -> tuple[int, Any]:
        # src/routes/api.js: authenticateApiKey, then modelService's list as OpenAI's shape.
        value = headers.get("x-api-key") or headers.get("Authorization", "")[7:]
        digest = hashlib.sha256(value.encode()).hexdigest()
        key = next((k for k in self.keys.values() if k["hash"] == digest), None)
        if key is None or key["isDeleted"] or not key["isActive"]:
            return 401, {"error": "Invalid API key", "message": "API key not found"}
        return 200, {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1669599635, "owned_by": "anthropic"}]}

    def _messages(self, body: Any, headers: Any) -> tuple[int, Any]:
        value = headers.get("x-api-key") or headers.get("Authorization", "")[7:]
        digest = hashlib.sha256(value.encode()).hexdigest()
        key = next((k for k in self.keys.values() if k["hash"] == digest), None)
        if key is None or key["isDeleted"]:
            return 401, {"error": "Invalid API key", "message": "API key not found"}
        if not key["isActive"]:
            return 401, {"error": "Invalid API key", "message": "API key is disabled"}
        if key["expiresAt"] and datetime.now(timezone.utc) > _parse(key["expiresAt"]):
            return 401, {"error": "Invalid API key", "message": "API key has expired"}
        if key["dailyCostLimit"] > 0 and key["dailyCost"] >= Decimal(str(key["dailyCostLimit"])):
            return 402, {"error": {"type": "insufficient_quota",
                                   "message": f"已达到每日费用限制 (${key['dailyCostLimit']})",
                                   "code": "daily_cost_limit_exceeded"},
                         "currentCost": float(key["dailyCost"]),
                         "costLimit": key["dailyCostLimit"]}
        self.record(key["id"], USAGE)
        return 200, {"id": "msg_fake", "type": "message", "role": "assistant", "model": MODEL,
                     "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                     "usage": USAGE}

    def record(self, key_id: str, usage: dict[str, int], *, at: datetime | None = None,
               model: str = MODEL) -> dict[str, Any]:
        """Records one request as CRS does after answering it (apiKeyService's
        recordUsageWithDetails then redis.addUsageRecord): the key's costs grow, the record is
        LPUSHed (newest first) and the list trimmed to 200. `at` lets a test place a record
        at a given moment (several at the same millisecond, say). Returns the record as the
        usage-records route answers it."""
        cost = cost_of(usage)
        key = self.keys[key_id]
        key["dailyCost"] += cost
        key["totalCost"] += cost
        record = {"timestamp": _iso(at or datetime.now(timezone.utc)), "model": model,
                  "accountId": "fake-console-account", "accountType": "claude-console",
                  "inputTokens": usage["input_tokens"], "outputTokens": usage["output_tokens"],
                  "cacheCreateTokens": usage["cache_creation_input_tokens"],
                  "cacheReadTokens": usage["cache_read_input_tokens"],
                  "ephemeral5mTokens": 0, "ephemeral1hTokens": 0,
                  "totalTokens": sum(usage.values()), "isLongContextRequest": False,
                  "cost": float(round(cost, 6)), "realCost": float(round(cost, 6))}
        rows = self.records.setdefault(key_id, [])
        rows.insert(0, record)
        del rows[MAX_RECORDS:]
        return record
