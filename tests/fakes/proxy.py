"""A fake CLIProxyAPI: a real HTTP server on 127.0.0.1 that behaves as
../shared/docs/cliproxyapi-contract.md says the real proxy's code does, quirks included.

- Management API under /v0/management: /api-keys (GET/PUT/PATCH/DELETE with every quirk),
  /usage (snapshot generation), /usage-queue (queue generation, destructive, with
  retention), /usage-statistics-enabled, auth order and the 5-failure ban (a count per
  address, zeroed by a good login and when a ban starts or ends, and forgotten after 2 h idle
  by a sweep that runs every hour; `peak_failures` and `refused_logins` tell tests how close
  the portal came).
- Client API: POST /v1/chat/completions, POST /v1/messages, GET /v1/models, authenticated by
  any of the proxy's key carriers, recording usage when statistics are on.
- The routes behind the staff pages that run the proxy (`_AdminRoutes`): the scalar settings,
  /config and /config.yaml (the queue retention), the provider key lists and /auth-files;
  `version` makes routes a release added later answer 404.
- Test controls: `inject()` one-shot faults (status, body, delay), `restart()` (usage gone,
  keys kept), `management_requests` (what the portal sent), a settable clock.

Run it by hand: `python -m tests.fakes.proxy --port 8317 --management-key secret`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MANAGEMENT = "/v0/management"
BAN_AFTER = 5
BAN_SECONDS = 30 * 60
# The proxy forgets an address's failures once it has been idle this long, at a sweep that
# runs every SWEEP_SECONDS (so an idle count is gone 2 to 3 hours on).
FORGET_IDLE_SECONDS = 2 * 60 * 60
SWEEP_SECONDS = 60 * 60
TEMPLATE_KEYS = ("your-api-key-1", "your-api-key-2", "your-api-key-3")

# alias -> (upstream model, provider, input tokens, output tokens, fails upstream)
MODELS: dict[str, tuple[str, str, int, int, bool]] = {
    "mock-gpt": ("mock-gpt", "openai-compatible-mockoai", 11, 7, False),
    "claude-mock": ("claude-mock-upstream", "claude", 13, 5, False),
    "mock-fail": ("mock-fail", "openai-compatible-mockoai", 0, 0, True),
}


class SettableClock:
    """A clock tests move by hand (`clock.now += 300`): for the fake's `clock` and the
    portal's refusal latch."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Fault:
    path: str  # management path prefix, e.g. "/api-keys"
    method: str | None
    status: int
    body: bytes
    delay: float
    times: int
    hold: threading.Event | None = None  # the answer waits until the test sets it


HOLD_MAX_SECONDS = 120.0  # a held answer is sent anyway after this: a test never hangs


def _snapshot_tokens(record: dict[str, Any]) -> dict[str, int]:
    """A record's counts as 6.9.x reports them: for Claude, the total leaves the cache out, and
    `cached_tokens` is the cache read, or the cache write when nothing was read."""
    tokens = record["tokens"]
    counts = {k: tokens[k] for k in (
        "input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens", "total_tokens")}
    if record["provider"] == "claude":
        counts["cached_tokens"] = tokens["cache_read_tokens"] or tokens["cache_creation_tokens"]
        counts["total_tokens"] = tokens["input_tokens"] + tokens["output_tokens"]
    return counts


def _rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    nanos = int((ts % 1) * 1e9)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{nanos:09d}".rstrip("0") + "Z"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a stalled answer (a timeout under test) closed its end.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


# -- the management routes behind the portal's staff pages (settings, provider keys, auth
# files): a mixin so that FakeProxy's own routes stay as they were. Quirks from the proxy's
# code (internal/api/handlers/management, 6.x and 7.x), see pool/proxy_admin.py.

PROVIDER_LISTS = ("claude-api-key", "gemini-api-key", "codex-api-key", "openai-compatibility")
# Fields each list's PATCH takes (others are ignored, as the proxy's typed structs do).
PATCH_FIELDS = {
    "claude-api-key": ("api-key", "prefix", "base-url", "proxy-url", "models", "headers",
                       "excluded-models"),
    "gemini-api-key": ("api-key", "prefix", "base-url", "proxy-url", "headers",
                       "excluded-models"),
    "codex-api-key": ("api-key", "prefix", "base-url", "proxy-url", "models", "headers",
                      "excluded-models"),
    "openai-compatibility": ("name", "prefix", "disabled", "base-url", "api-key-entries",
                             "models", "headers"),
}
# Routes and the release that added them: a fake with an older `version` answers 404.
ROUTES_ADDED = {"/usage-statistics-enabled": (6, 3), "/gemini-api-key": (6, 6),
                "/auth-files/status": (6, 9)}
# Entry fields and the release that added them (openai-compatibility's `disabled`: late 6.9).
FIELDS_ADDED = {"excluded-models": (6, 6), "disabled": (6, 9)}
SCALAR_SETTINGS = {"debug": False, "request-log": False, "request-retry": 3, "proxy-url": "",
                   "quota-exceeded/switch-project": True,
                   "quota-exceeded/switch-preview-model": True}
RETENTION_KEY = "redis-usage-queue-retention-seconds"


class _AdminRoutes:
    generation: str
    retention_seconds: float
    statistics_enabled: bool
    config_read_only: bool

    def _admin_init(self, version: str | None) -> None:
        self.version = tuple(int(p) for p in (version or "").split(".")[:2] if p.isdigit()) or (
            (7, 2) if self.generation == "queue" else (6, 9))
        self.settings: dict[str, Any] = dict(SCALAR_SETTINGS)
        self.providers: dict[str, list[dict[str, Any]]] = {name: [] for name in PROVIDER_LISTS}
        self.auth_files: dict[str, dict[str, Any]] = {}
        self.config_comment = "# CLIProxyAPI configuration (fake)\n"
        self.request_content_type = ""
        self.raw_request_body = b""

    def _saved(self) -> tuple[int, Any] | None:
        if self.config_read_only:
            return 500, {"error": "failed to save config: open config.yaml: read-only file system"}
        return None

    def _admin_route(self, method: str, path: str, query: dict[str, str], body: Any
                     ) -> tuple[int, Any] | None:
        added = ROUTES_ADDED.get(path)
        if added and self.version < added:
            return 404, b"404 page not found"
        if path == "/usage-statistics-enabled" and method == "PATCH":
            method = "PUT"  # the proxy routes both to one handler
            if not isinstance(body, dict) or not isinstance(body.get("value"), bool):
                return 400, {"error": "invalid body"}
            self.statistics_enabled = body["value"]
            return self._saved() or (200, {"status": "ok"})
        name = path.lstrip("/")
        if name in self.settings:
            return self._scalar(method, name, body)
        if name in self.providers:
            return self._provider(method, name, query, body)
        if path == "/config" and method == "GET":
            return 200, self.config_json()
        if path == "/config.yaml":
            return self._config_yaml(method)
        if path == "/auth-files":
            return self._auth_files(method, query)
        return None

    def _scalar(self, method: str, name: str, body: Any) -> tuple[int, Any]:
        if method == "GET":
            return 200, {name.rsplit("/", 1)[-1]: self.settings[name]}
        if name == "proxy-url" and method == "DELETE":
            self.settings[name] = ""
            return self._saved() or (200, {"status": "ok"})
        if method not in ("PUT", "PATCH"):
            return 404, b"404 page not found"
        kind = type(SCALAR_SETTINGS[name])
        value = body.get("value") if isinstance(body, dict) else None
        # Go's JSON decoding: a bool field refuses numbers, an int field refuses true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return 400, {"error": "invalid body"}
        refused = self._saved()
        if refused:
            return refused
        self.settings[name] = value.strip() if kind is str else value
        return 200, {"status": "ok"}

    def config_json(self) -> dict[str, Any]:
        config: dict[str, Any] = {**{k: v for k, v in self.settings.items() if "/" not in k},
                                  "quota-exceeded": {
                                      "switch-project": self.settings["quota-exceeded/switch-project"],
                                      "switch-preview-model":
                                          self.settings["quota-exceeded/switch-preview-model"]},
                                  "usage-statistics-enabled": self.statistics_enabled,
                                  "api-keys": list(getattr(self, "api_keys", []))}
        for name, items in self.providers.items():
            if items:
                config[name] = [dict(item) for item in items]
        if self.generation == "queue":  # 6.10 and newer only
            config[RETENTION_KEY] = int(self.retention_seconds)
        return config

    def config_yaml(self) -> str:
        lines = [self.config_comment.rstrip("\n"), "port: 8317",
                 f"debug: {str(self.settings['debug']).lower()}",
                 f"request-retry: {self.settings['request-retry']}"]
        if self.generation == "queue":
            lines.append(f"{RETENTION_KEY}: {int(self.retention_seconds)}  # seconds")
        return "\n".join(lines) + "\n"

    def _config_yaml(self, method: str) -> tuple[int, Any]:
        if method == "GET":
            return 200, self.config_yaml().encode()
        if method != "PUT":
            return 404, b"404 page not found"
        import yaml

        try:
            parsed = yaml.safe_load(self.raw_request_body.decode() or "{}")
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            return 400, {"error": "invalid_yaml", "message": str(exc)[:100]}
        if not isinstance(parsed, dict):
            return 422, {"error": "invalid_config", "message": "config is not a mapping"}
        refused = self._saved()
        if refused:
            return 500, {"error": "write_failed", "message": "failed to write config"}
        text = self.raw_request_body.decode()
        self.config_comment = "".join(
            line + "\n" for line in text.splitlines() if line.startswith("#")) or "\n"
        if "debug" in parsed and isinstance(parsed["debug"], bool):
            self.settings["debug"] = parsed["debug"]
        if isinstance(parsed.get("request-retry"), int):
            self.settings["request-retry"] = parsed["request-retry"]
        if self.generation == "queue":
            seconds = parsed.get(RETENTION_KEY)
            seconds = seconds if isinstance(seconds, int) and not isinstance(seconds, bool) else 0
            self.retention_seconds = 60 if seconds <= 0 else min(seconds, 3600)  # the clamp
        return 200, {"ok": True, "changed": ["config"]}

    # provider keys --------------------------------------------------------------------------

    def _provider(self, method: str, name: str, query: dict[str, str], body: Any
                  ) -> tuple[int, Any]:
        items = self.providers[name]
        if method == "GET":
            shown = [dict(item) for item in items]
            if self.version >= (7, 0):  # 7.x adds each entry's auth index
                for i, item in enumerate(shown):
                    item["auth-index"] = f"{name[:6]}{i:04d}"
            return 200, {name: shown or None}
        if method == "PUT":
            entries = body.get("items") if isinstance(body, dict) else body
            if (not isinstance(entries, list) or (isinstance(body, dict) and not entries)
                    or not all(isinstance(e, dict) for e in entries)):
                return 400, {"error": "invalid body"}
            entries = [{k: v for k, v in e.items() if k != "auth-index"} for e in entries]
            return self._save_list(name, entries)
        if method == "PATCH":
            return self._provider_patch(name, body)
        if method == "DELETE":
            return self._provider_delete(name, query)
        return 404, b"404 page not found"

    def _save_list(self, name: str, entries: list[dict[str, Any]]) -> tuple[int, Any]:
        refused = self._saved()
        if refused:
            return refused
        if name in ("codex-api-key", "openai-compatibility"):
            # SanitizeCodexKeys / SanitizeOpenAICompatibility: no base-url, no entry.
            entries = [e for e in entries if str(e.get("base-url") or "").strip()]
        self.providers[name] = entries
        return 200, {"status": "ok"}

    def _provider_patch(self, name: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("value"), dict):
            return 400, {"error": "invalid body"}
        items = self.providers[name]
        target = -1
        index = body.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(items):
            target = index
        matcher = "name" if name == "openai-compatibility" else "match"
        if target == -1 and isinstance(body.get(matcher), str):
            field_name = "name" if matcher == "name" else "api-key"
            target = next((i for i, e in enumerate(items)
                           if e.get(field_name) == body[matcher].strip()), -1)
        if target == -1:
            return 404, {"error": "item not found"}
        entry = dict(items[target])
        for key in PATCH_FIELDS[name]:
            if key not in body["value"] or self.version < FIELDS_ADDED.get(key, (0, 0)):
                continue  # a field this release's struct lacks is ignored, and answered ok
            value = body["value"][key]
            if key == "base-url" and name in ("codex-api-key", "openai-compatibility"):
                if not str(value or "").strip():  # the quirk: an empty base-url deletes
                    return self._save_list(name, items[:target] + items[target + 1:])
            entry[key] = value.strip() if isinstance(value, str) else value
        return self._save_list(name, items[:target] + [entry] + items[target + 1:])

    def _provider_delete(self, name: str, query: dict[str, str]) -> tuple[int, Any]:
        items = self.providers[name]
        if name == "openai-compatibility":
            if query.get("name"):
                return self._save_list(name, [e for e in items if e.get("name") != query["name"]])
        elif query.get("api-key", "").strip():
            key = query["api-key"].strip()
            matches = [i for i, e in enumerate(items) if e.get("api-key") == key
                       and ("base-url" not in query or e.get("base-url", "") == query["base-url"])]
            if len(matches) > 1 and "base-url" not in query:
                return 400, {"error": "multiple items match api-key; base-url is required"}
            if not matches and name == "gemini-api-key":
                return 404, {"error": "item not found"}
            return self._save_list(name, [e for i, e in enumerate(items) if i not in matches])
        try:
            index = int(query.get("index", ""))
        except ValueError:
            index = -1
        if 0 <= index < len(items):
            return self._save_list(name, items[:index] + items[index + 1:])
        missing = "name" if name == "openai-compatibility" else "api-key"
        return 400, {"error": f"missing {missing} or index"}

    # auth files ------------------------------------------------------------------------------

    def add_auth_file(self, name: str, content: dict[str, Any], *, disabled: bool = False,
                      status: str = "active") -> None:
        self.auth_files[name] = {"content": content, "modtime": time.time(),
                                 "disabled": disabled, "status": status}

    def _auth_file_entry(self, name: str, item: dict[str, Any]) -> dict[str, Any]:
        content = item["content"]
        size = len(json.dumps(content))
        modtime = _rfc3339(item["modtime"])
        if self.version < (6, 9):  # the directory listing of older releases
            return {"name": name, "size": size, "modtime": modtime,
                    "type": content.get("type", ""), "email": content.get("email", "")}
        return {
            "id": name, "auth_index": f"auth{abs(hash(name)) % 10_000:04d}", "name": name,
            "type": content.get("type", ""), "provider": content.get("type", ""),
            "label": content.get("email", ""), "status": item["status"],
            "status_message": "", "disabled": item["disabled"], "unavailable": False,
            "runtime_only": False, "source": "file", "size": size,
            "email": content.get("email", ""), "modtime": modtime,
            "path": f"/root/.cli-proxy-api/{name}", "success": 0, "failed": 0,
        }

    def _auth_files(self, method: str, query: dict[str, str]) -> tuple[int, Any]:
        if method == "GET":
            return 200, {"files": [self._auth_file_entry(n, item)
                                   for n, item in sorted(self.auth_files.items())]}
        if method == "POST":
            uploads = self._multipart_files()
            if uploads is None and query.get("name"):  # a raw JSON body with ?name=
                uploads = [(query["name"], self.raw_request_body)]
            if not uploads:
                return 400, {"error": "no files uploaded"}
            name, data = uploads[0]
            if not name.lower().endswith(".json") or "/" in name:
                return 400, {"error": "file must be .json"}
            try:
                content = json.loads(data)
            except ValueError:
                return 400, {"error": "invalid auth file: not JSON"}
            if not isinstance(content, dict):
                return 400, {"error": "invalid auth file: not an object"}
            self.add_auth_file(name, content)
            return 200, {"status": "ok"}
        if method == "DELETE":
            if query.get("all") in ("true", "1", "*"):
                deleted = len(self.auth_files)
                self.auth_files.clear()
                return 200, {"status": "ok", "deleted": deleted}
            name = query.get("name", "").strip()
            if not name or "/" in name:
                return 400, {"error": "invalid name"}
            if name not in self.auth_files:
                return 404, {"error": "file not found"}
            del self.auth_files[name]
            return 200, {"status": "ok"}
        return 404, b"404 page not found"

    def _multipart_files(self) -> list[tuple[str, bytes]] | None:
        if not self.request_content_type.startswith("multipart/form-data"):
            return None
        from email.parser import BytesParser
        from email.policy import HTTP

        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + self.request_content_type.encode() + b"\r\n\r\n"
            + self.raw_request_body)
        files = []
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                files.append((part.get_filename() or "", part.get_payload(decode=True) or b""))
        return files


class FakeProxy(_AdminRoutes):
    def __init__(
        self,
        *,
        generation: str = "queue",
        management_key: str = "test-management-key",
        api_keys: list[str] | None = None,
        statistics_enabled: bool = True,
        retention_seconds: float = 60.0,
        reload_delay: float = 0.0,
        port: int = 0,
        version: str | None = None,
    ) -> None:
        if generation not in ("queue", "snapshot"):
            raise ValueError("generation is 'queue' or 'snapshot'")
        self.generation = generation
        self.management_key = management_key
        self.api_keys: list[str] = list(api_keys or [])
        self.statistics_enabled = statistics_enabled
        self.retention_seconds = retention_seconds
        self.reload_delay = reload_delay
        self.management_enabled = True
        self.config_read_only = False
        self.clock = time.time  # tests may replace it
        self.lock = threading.RLock()
        self.management_requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.failures: dict[str, int] = {}
        self.last_failure: dict[str, float] = {}
        self.banned_until: dict[str, float] = {}
        self.peak_failures = 0  # the highest count any address reached (5 is a ban)
        self.refused_logins = 0  # 401s answered, all addresses
        self._next_sweep: float | None = None  # sweeps run hourly from the first login
        self.queue: deque[tuple[float, dict[str, Any]]] = deque()
        self.popped = 0  # records handed out by /usage-queue, ever: the ledger of kill trials
        self.snapshot_records: list[dict[str, Any]] = []
        self._live_keys: list[str] = list(self.api_keys)
        self.models_delay = 0.0  # seconds GET /v1/models takes (a slow proxy, under test)
        # Called with (method, path) once a management request is authenticated, before it is
        # answered: a test sends a signal or locks the database while the call is in flight.
        self.on_management: Any = None
        # The next `cut_pops` pops send only their first `cut_after` bytes, then drop the
        # connection (the records are gone from the queue all the same, as on a real cut).
        self.cut_pops = 0
        self.cut_after = 0
        self._server = _QuietServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._admin_init(version)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def restart(self) -> None:
        """What a real restart does: in-memory usage and bans are gone; config.yaml (the key
        list) survives."""
        with self.lock:
            self.queue.clear()
            self.snapshot_records.clear()
            self.failures.clear()
            self.last_failure.clear()
            self.banned_until.clear()
            self._live_keys = list(self.api_keys)

    # -- test controls ------------------------------------------------------------------

    def inject(
        self,
        path: str,
        *,
        status: int = 200,
        body: bytes | str | dict | list = b"",
        delay: float = 0.0,
        method: str | None = None,
        times: int = 1,
        hold: threading.Event | None = None,
    ) -> None:
        """The next `times` management requests to `path` (a prefix) answer this instead;
        with `hold`, each answer waits until the test sets that event (a proxy stalled for
        exactly as long as the test needs, not for a guessed time)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        with self.lock:
            self.faults.append(Fault(path, method, status, body, delay, times, hold))

    def requests_to(self, path: str, method: str | None = None) -> int:
        return sum(
            1 for m, p in self.management_requests if p == path and (method is None or m == method)
        )

    def add_usage(
        self,
        api_key: str,
        *,
        model: str = "mock-gpt",
        input_tokens: int = 11,
        output_tokens: int = 7,
        cached_tokens: int = 0,
        cache_creation_tokens: int = 0,
        reasoning_tokens: int = 0,
        failed: bool = False,
        timestamp: float | None = None,
        alias: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """Records usage as if a client request had been served (statistics must be on).
        Counts are reported the way the real proxy reports its provider's
        (../shared/fixtures/README.md): Claude's input leaves the cache out, and its total
        adds the cache in (7.x); everyone else's input holds the cached part, with reasoning
        beside output in the total (Gemini's way; OpenAI's output holds it)."""
        ts = self.clock() if timestamp is None else timestamp
        if provider is None:
            provider = "claude" if model.startswith("claude") else "openai-compatible-mockoai"
        if provider == "claude":
            total = input_tokens + output_tokens + cached_tokens + cache_creation_tokens
        else:
            total = input_tokens + output_tokens + reasoning_tokens
        record = {
            "timestamp": _rfc3339(ts),
            "latency_ms": 5,
            "ttft_ms": 4,
            "source": "upstream-dummy-key",
            "auth_index": "2a4984ef82170838",
            "client_ip": "127.0.0.1",
            "tokens": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "reasoning_tokens": reasoning_tokens,
                "cached_tokens": cached_tokens,
                "cache_read_tokens": cached_tokens,
                "cache_read_tokens_present": True,
                "cache_creation_tokens": cache_creation_tokens,
                "total_tokens": total,
            },
            "failed": failed,
            "fail": {"status_code": 500 if failed else 200, "body": "mock failure" if failed else ""},
            "accounting_version": 2,
            "provider": provider,
            "model": model,
            "alias": alias or model,
            "endpoint": "POST /v1/chat/completions",
            "auth_type": "apikey",
            "api_key": api_key,
            "request_id": uuid.uuid4().hex[:8],
        }
        with self.lock:
            if not self.statistics_enabled:
                return record
            if self.generation == "queue":
                self.queue.append((self.clock(), record))
            else:
                self.snapshot_records.append(record)
        return record

    # -- state views ---------------------------------------------------------------------

    def _expire_queue(self) -> None:
        horizon = self.clock() - self.retention_seconds
        while self.queue and self.queue[0][0] < horizon:
            self.queue.popleft()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            records = list(self.snapshot_records)
        apis: dict[str, Any] = {}
        by_day: dict[str, int] = {}
        by_hour: dict[str, int] = {}
        tokens_day: dict[str, int] = {}
        tokens_hour: dict[str, int] = {}
        total_tokens = failures = 0
        for r in records:
            tokens = r["tokens"]
            detail = {
                "timestamp": r["timestamp"],
                "latency_ms": r["latency_ms"],
                "source": r["source"],
                "auth_index": r["auth_index"],
                "tokens": _snapshot_tokens(r),
                "failed": r["failed"],
            }
            api = apis.setdefault(r["api_key"], {"total_requests": 0, "total_tokens": 0, "models": {}})
            model = api["models"].setdefault(
                r["model"], {"total_requests": 0, "total_tokens": 0, "details": []}
            )
            for bucket in (api, model):
                bucket["total_requests"] += 1
                bucket["total_tokens"] += tokens["total_tokens"]
            model["details"].append(detail)
            day, hour = r["timestamp"][:10], r["timestamp"][11:13]
            by_day[day] = by_day.get(day, 0) + 1
            by_hour[hour] = by_hour.get(hour, 0) + 1
            tokens_day[day] = tokens_day.get(day, 0) + tokens["total_tokens"]
            tokens_hour[hour] = tokens_hour.get(hour, 0) + tokens["total_tokens"]
            total_tokens += tokens["total_tokens"]
            failures += r["failed"]
        return {
            "failed_requests": failures,
            "usage": {
                "total_requests": len(records),
                "success_count": len(records) - failures,
                "failure_count": failures,
                "total_tokens": total_tokens,
                "apis": apis,
                "requests_by_day": by_day,
                "requests_by_hour": by_hour,
                "tokens_by_day": tokens_day,
                "tokens_by_hour": tokens_hour,
            },
        }

    def _set_keys(self, keys: list[str]) -> None:
        """config.yaml is rewritten at once; the running proxy picks it up a little later."""
        self.api_keys = keys
        snapshot = list(keys)
        if self.reload_delay <= 0:
            self._live_keys = snapshot
        else:
            timer = threading.Timer(self.reload_delay, lambda: setattr(self, "_live_keys", snapshot))
            timer.daemon = True
            timer.start()

    # -- HTTP ----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: test output stays readable and free of keys

            def do_GET(self) -> None:
                proxy._dispatch(self, "GET")

            def do_POST(self) -> None:
                proxy._dispatch(self, "POST")

            def do_PUT(self) -> None:
                proxy._dispatch(self, "PUT")

            def do_PATCH(self) -> None:
                proxy._dispatch(self, "PATCH")

            def do_DELETE(self) -> None:
                proxy._dispatch(self, "DELETE")

        return Handler

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: Any, *, raw: bool = False) -> None:
        data = body if raw else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain" if raw else "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw_body = handler.rfile.read(length) if length else b""
        if parts.path.startswith(MANAGEMENT + "/") or parts.path == MANAGEMENT:
            self._management(handler, method, parts.path[len(MANAGEMENT):], query, raw_body)
        elif parts.path.startswith("/v1/") or parts.path.startswith("/v1beta/"):
            self._client(handler, method, parts.path, query, raw_body)
        else:
            self._reply(handler, 404, b"404 page not found", raw=True)

    # -- management ----------------------------------------------------------------------

    def _management(
        self, handler: BaseHTTPRequestHandler, method: str, path: str, query: dict[str, str],
        raw_body: bytes,
    ) -> None:
        with self.lock:
            self.management_requests.append((method, path))
            fault = next(
                (f for f in self.faults if path.startswith(f.path) and f.method in (None, method)),
                None,
            )
            if fault:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
        if not self.management_enabled:
            return self._reply(handler, 404, b"404 page not found", raw=True)
        refusal = self._authenticate(handler)
        if refusal:
            return self._reply(handler, *refusal)
        if self.on_management is not None:
            self.on_management(method, path)
        if fault:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.hold is not None:
                fault.hold.wait(HOLD_MAX_SECONDS)
            return self._reply(handler, fault.status, fault.body, raw=True)
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = ValueError
        with self.lock:
            self.request_content_type = handler.headers.get("Content-Type", "")
            self.raw_request_body = raw_body
            status, answer = self._route(method, path, query, body)
        if path == "/usage-queue" and status == 200 and self.cut_pops > 0:
            self.cut_pops -= 1
            data = json.dumps(answer).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: self.cut_after])
            handler.wfile.flush()
            handler.close_connection = True
            return None
        if isinstance(answer, bytes):
            return self._reply(handler, status, answer, raw=True)
        return self._reply(handler, status, answer)

    def _sweep(self, now: float) -> None:
        """The proxy's hourly clean-up, caught up to `now`: an address idle for over 2 h and
        not banned at a sweep is forgotten there (its count is gone)."""
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_SECONDS
        while self._next_sweep <= now:
            tick = self._next_sweep
            for ip in list(self.failures):
                idle = tick - self.last_failure[ip]
                if self.banned_until.get(ip, 0) <= tick and idle > FORGET_IDLE_SECONDS:
                    del self.failures[ip]
            self._next_sweep += SWEEP_SECONDS

    def _authenticate(self, handler: BaseHTTPRequestHandler) -> tuple[int, Any] | None:
        ip = handler.client_address[0]
        now = self.clock()
        with self.lock:
            self._sweep(now)
            if self.banned_until.get(ip, 0) > now:
                return 403, {"error": "IP banned due to too many failed attempts. Try again in 30m0s"}
            if ip in self.banned_until:  # the ban is over: the count starts again from zero
                del self.banned_until[ip]
                self.failures.pop(ip, None)
            if not self.management_key:
                return 403, {"error": "remote management key not set"}
            auth = handler.headers.get("Authorization", "")
            sent = auth[7:] if auth.startswith("Bearer ") else handler.headers.get("X-Management-Key", "")
            if sent == self.management_key:
                self.failures.pop(ip, None)
                return None
            self.failures[ip] = self.failures.get(ip, 0) + 1
            self.last_failure[ip] = now
            self.refused_logins += 1
            self.peak_failures = max(self.peak_failures, self.failures[ip])
            if self.failures[ip] >= BAN_AFTER:
                self.banned_until[ip] = now + BAN_SECONDS
                self.failures.pop(ip, None)
            if not sent:
                return 401, {"error": "missing management key"}
            return 401, {"error": "invalid management key"}

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        admin = self._admin_route(method, path, query, body)
        if admin is not None:
            return admin
        if path == "/api-keys":
            return self._api_keys(method, query, body)
        if path == "/usage-statistics-enabled":
            if method == "GET":
                return 200, {"usage-statistics-enabled": self.statistics_enabled}
            if method == "PUT":
                if not isinstance(body, dict) or not isinstance(body.get("value"), bool):
                    return 400, {"error": "invalid body"}
                self.statistics_enabled = body["value"]
                return 200, {"status": "ok"}
        if path == "/usage" and method == "GET" and self.generation == "snapshot":
            return 200, self.snapshot()
        if path == "/usage-queue" and method == "GET" and self.generation == "queue":
            raw = query.get("count", "1")
            try:
                count = int(raw)
            except ValueError:
                count = 0
            if count <= 0:
                return 400, {"error": "count must be a positive integer"}
            self._expire_queue()
            popped = [self.queue.popleft()[1] for _ in range(min(count, len(self.queue)))]
            self.popped += len(popped)
            return 200, popped
        return 404, b"404 page not found"

    def _save(self, keys: list[str]) -> tuple[int, Any]:
        if self.config_read_only:
            return 500, {"error": "failed to save config: open config.yaml: read-only file system"}
        self._set_keys(keys)
        return 200, {"status": "ok"}

    def _api_keys(self, method: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        keys = self.api_keys
        if method == "GET":
            return 200, {"api-keys": list(keys) if keys else None}
        if method == "PUT":
            items = body.get("items") if isinstance(body, dict) else body
            if (
                not isinstance(items, list)
                or not all(isinstance(k, str) for k in items)
                or (isinstance(body, dict) and not items)
            ):
                return 400, {"error": "invalid body"}
            return self._save(list(items))
        if method == "PATCH":
            if isinstance(body, dict) and isinstance(body.get("index"), int) and isinstance(body.get("value"), str):
                i = body["index"]
                if not 0 <= i < len(keys):
                    return 400, {"error": "missing fields"}
                return self._save(keys[:i] + [body["value"]] + keys[i + 1:])
            if isinstance(body, dict) and isinstance(body.get("old"), str) and isinstance(body.get("new"), str):
                if body["old"] in keys:
                    i = keys.index(body["old"])
                    return self._save(keys[:i] + [body["new"]] + keys[i + 1:])
                return self._save(keys + [body["new"]])  # the quirk: appends
            return 400, {"error": "missing fields"}
        if method == "DELETE":
            if "index" in query:
                try:
                    i = int(query["index"])
                except ValueError:
                    return 400, {"error": "invalid index"}
                if not 0 <= i < len(keys):
                    return 400, {"error": "invalid index"}
                return self._save(keys[:i] + keys[i + 1:])
            if "value" in query:
                return self._save([k for k in keys if k != query["value"]])
            return 400, {"error": "missing index or value"}
        return 404, b"404 page not found"

    # -- client side ---------------------------------------------------------------------

    @staticmethod
    def _client_key(handler: BaseHTTPRequestHandler, query: dict[str, str]) -> str:
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        return (
            handler.headers.get("X-Api-Key")
            or handler.headers.get("X-Goog-Api-Key")
            or query.get("key")
            or query.get("auth_token")
            or ""
        )

    def _client(
        self, handler: BaseHTTPRequestHandler, method: str, path: str, query: dict[str, str],
        raw_body: bytes,
    ) -> None:
        live = self._live_keys
        key = self._client_key(handler, query)
        if any(k in TEMPLATE_KEYS for k in live):
            return self._reply(handler, 403, {"error": "unsafe_example_api_key"})
        if live and key not in live:  # an empty list lets everyone in: the open-proxy trap
            return self._reply(handler, 401, {"error": "Invalid API key"})
        if method == "GET" and path == "/v1/models":
            return self._client_models(handler)
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/messages"):
            return self._reply(handler, 404, b"404 page not found", raw=True)
        try:
            body = json.loads(raw_body)
            alias = body["model"]
        except (ValueError, KeyError, TypeError):
            return self._reply(handler, 400, {"error": "invalid request"})
        if alias not in MODELS:
            return self._reply(handler, 502, {"error": f"unknown provider for model {alias}"})
        upstream, provider, tin, tout, fails = MODELS[alias]
        record = self.add_usage(
            key, model=upstream, alias=alias, provider=provider, input_tokens=tin,
            output_tokens=tout, failed=fails,
        )
        record["endpoint"] = f"POST {path}"
        if fails:
            return self._reply(handler, 500, {"error": {"message": "mock upstream failure"}})
        if path == "/v1/messages":
            answer = {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": upstream,
                "content": [{"type": "text", "text": "ok"}],
                "usage": {"input_tokens": tin, "output_tokens": tout},
            }
        else:
            answer = {
                "id": "chatcmpl-fake", "object": "chat.completion", "model": upstream,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
            }
        return self._reply(handler, 200, answer)


    def _client_models(self, handler: BaseHTTPRequestHandler) -> None:
        """GET /v1/models for a key the proxy accepts (checked by the caller), in the shape
        CLIProxyAPI answers: OpenAI's list object, one entry per model alias it serves."""
        if self.models_delay:
            time.sleep(self.models_delay)
        data = [
            {"id": alias, "object": "model", "created": 1_700_000_000,
             "owned_by": provider.removeprefix("openai-compatible-")}
            for alias, (_upstream, provider, *_rest) in MODELS.items()
        ]
        return self._reply(handler, 200, {"object": "list", "data": data})


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake CLIProxyAPI for local runs and tests.")
    parser.add_argument("--port", type=int, default=8317)
    parser.add_argument("--management-key", default="test-management-key")
    parser.add_argument("--generation", choices=["queue", "snapshot"], default="queue")
    parser.add_argument("--key", action="append", default=[], help="a client key to start with")
    parser.add_argument("--retention", type=float, default=60.0)
    parser.add_argument("--version", default=None, help="an older release, e.g. 6.5.0")
    args = parser.parse_args()
    proxy = FakeProxy(
        generation=args.generation, management_key=args.management_key, api_keys=args.key,
        retention_seconds=args.retention, port=args.port, version=args.version,
    ).start()
    print(f"fake proxy ({args.generation}) on {proxy.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
