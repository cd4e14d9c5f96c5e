"""The real CLIProxyAPI, for tests and benches: a build from ../shared/cliproxyapi started in a
temporary folder on free 127.0.0.1 ports, in front of a mock LLM upstream (a Python
http.server thread on 127.0.0.1) that answers like Anthropic and OpenAI with known usage.

    with MockUpstream() as upstream, RealProxy(version="7.2.140", upstream=upstream) as proxy:
        proxy.claude(key)            # one /v1/messages call with that client key -> status
        proxy.chat(key)              # one /v1/chat/completions call

`real_proxy_binary(version)` skips the calling test (pytest.skip) when the build is absent (a
clone without ../shared). The management secret is MANAGEMENT_KEY; point the portal at
`proxy.url` with it. `TcpRelay` sits between the portal and the proxy when a test must cut
the connection. Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
MANAGEMENT_KEY = "realproxy-mgmt-secret"
OPERATOR_KEY = "operator-own-key"
CLAUDE_ALIAS, CLAUDE_MODEL = "claude-mock", "claude-mock-upstream"
OPENAI_MODEL = "mock-gpt"
START_TIMEOUT = 60.0

# What the mock upstream reports (the fixtures' upstream_usage).
CLAUDE_USAGE = {
    "input_tokens": 100, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 10000,
    "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 50, "service_tier": "standard",
}
OPENAI_USAGE = {
    "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": 0,
                                  "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}


def shared_dir() -> Path | None:
    """../shared next to the repository; from a git worktree elsewhere, the one next to the
    main checkout (a worktree's .git file names it)."""
    candidates = [ROOT.parent / "shared"]
    dot_git = ROOT / ".git"
    if dot_git.is_file():
        text = dot_git.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            # <main>/.git/worktrees/<name> -> <main>/../shared
            candidates.append(gitdir.parent.parent.parent.parent / "shared")
    for candidate in candidates:
        if (candidate / "cliproxyapi").is_dir():
            return candidate
    return None


def real_proxy_binary(version: str) -> Path:
    """The build's path; skips the test when it is not there."""
    import pytest

    shared = shared_dir()
    binary = shared / "cliproxyapi" / f"cliproxyapi-{version}" if shared else None
    if binary is None or not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.skip(f"the real CLIProxyAPI {version} is not in ../shared/cliproxyapi")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the mock LLM upstream ------------------------------------------------------------------


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        self.server.requests_seen += 1  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        stream = bool(body.get("stream"))
        if path.endswith("/messages"):
            self._claude(body, stream)
        elif path.endswith("/chat/completions"):
            self._chat(body, stream)
        else:
            self._send(404, "application/json", b'{"error":"not found"}')

    def _send(self, status: int, kind: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str | None, dict[str, Any] | str]]) -> None:
        out = []
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
        self._send(200, "text/event-stream", "".join(out).encode())

    def _claude(self, body: dict[str, Any], stream: bool) -> None:
        model = body.get("model") or CLAUDE_MODEL
        message = {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": CLAUDE_USAGE,
        }
        if not stream:
            self._send(200, "application/json", json.dumps(message).encode())
            return
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {**CLAUDE_USAGE, "output_tokens": 1}}
        # The cumulative delta (input and cache counts repeated in message_delta): the only
        # streamed shape the proxy counts in full (see the fixtures README).
        delta_usage = {k: CLAUDE_USAGE[k] for k in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
            "output_tokens")}
        self._sse([
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "ok"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": delta_usage}),
            ("message_stop", {"type": "message_stop"}),
        ])

    def _chat(self, body: dict[str, Any], stream: bool) -> None:
        model = body.get("model") or OPENAI_MODEL
        base = {"id": "chatcmpl-mock", "created": int(time.time()), "model": model}
        if not stream:
            self._send(200, "application/json", json.dumps({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": OPENAI_USAGE,
            }).encode())
            return
        chunk = {**base, "object": "chat.completion.chunk"}
        self._sse([
            (None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": "ok"}}],
                    "usage": None}),
            (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": None}),
            (None, {**chunk, "choices": [], "usage": OPENAI_USAGE}),
            (None, "[DONE]"),
        ])


class MockUpstream:
    """Anthropic `/v1/messages` and OpenAI `/v1/chat/completions` on 127.0.0.1, with usage."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
        self.server.daemon_threads = True
        self.server.requests_seen = 0  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def requests_seen(self) -> int:
        return self.server.requests_seen  # type: ignore[attr-defined]

    def start(self) -> MockUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the proxy ------------------------------------------------------------------------------


CONFIG = """\
host: "127.0.0.1"
port: {port}
remote-management:
  allow-remote: false
  secret-key: "{secret}"
  disable-control-panel: true
  disable-auto-update-panel: true
auth-dir: "{auths}"
api-keys:
  - "{operator}"
usage-statistics-enabled: true
request-retry: 0
claude-api-key:
  - api-key: "upstream-claude-dummy"
    base-url: "{upstream}"
    models:
      - name: "{claude_model}"
        alias: "{claude_alias}"
openai-compatibility:
  - name: "mockoai"
    base-url: "{upstream}/v1"
    api-key-entries:
      - api-key: "upstream-dummy-key"
    models:
      - name: "{openai_model}"
        alias: "{openai_model}"
"""


class RealProxy:
    """One real CLIProxyAPI process in a temporary folder. Skips the test if absent."""

    def __init__(self, *, version: str = "7.2.140", upstream: MockUpstream,
                 workdir: Path | None = None) -> None:
        self.version = version
        self.binary = real_proxy_binary(version)
        self.upstream = upstream
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="realproxy-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.management_key = MANAGEMENT_KEY
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "proxy.log"

    def start(self) -> RealProxy:
        auths = self.workdir / "auths"
        auths.mkdir(exist_ok=True)
        config = self.workdir / "config.yaml"
        config.write_text(CONFIG.format(
            port=self.port, secret=MANAGEMENT_KEY, auths=auths, operator=OPERATOR_KEY,
            upstream=self.upstream.url, claude_model=CLAUDE_MODEL, claude_alias=CLAUDE_ALIAS,
            openai_model=OPENAI_MODEL,
        ))
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(self.binary), "-config", str(config)], cwd=self.workdir, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while b"full client load complete" not in self.log_path.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"CLIProxyAPI {self.version} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"CLIProxyAPI {self.version} never loaded its clients: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RealProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- management, for the test's own checks (the portal uses its own client) --------------

    def management(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(
            method, f"{self.url}/v0/management{path}", timeout=10,
            headers={"Authorization": f"Bearer {MANAGEMENT_KEY}"}, **kwargs,
        )

    def api_keys(self) -> list[str]:
        return self.management("GET", "/api-keys").json().get("api-keys") or []

    def wait_for_key(self, key: str, *, present: bool = True, timeout: float = 30.0) -> None:
        """Until a client request with `key` is served (or refused with 401 when not
        `present`): a key-list write applies 200-300 ms after its answer."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.models(key)
            if (status == 200) == present and status in (200, 401):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"key still answers {status} after {timeout:g} s")
            time.sleep(0.05)

    # -- client requests -----------------------------------------------------------------

    def models(self, key: str) -> int:
        return requests.get(f"{self.url}/v1/models", timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).status_code

    def claude(self, key: str, *, stream: bool = False, model: str = CLAUDE_ALIAS) -> int:
        """One Anthropic Messages call (as Claude Code makes it); the HTTP status."""
        answer = requests.post(
            f"{self.url}/v1/messages", timeout=30,
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={"model": model, "max_tokens": 64, "stream": stream,
                  "messages": [{"role": "user", "content": "hi"}]},
        )
        answer.content  # read the whole answer (a stream ends with the proxy's record)
        return answer.status_code

    def chat(self, key: str, *, stream: bool = False, model: str = OPENAI_MODEL) -> int:
        """One OpenAI chat completion; the HTTP status."""
        answer = requests.post(
            f"{self.url}/v1/chat/completions", timeout=30,
            headers={"Authorization": f"Bearer {key}"},
            json={"model": model, "stream": stream,
                  "messages": [{"role": "user", "content": "hi"}]},
        )
        answer.content
        return answer.status_code


# --- a RESP subscriber of the test's own (a dashboard, another consumer) -----------------


class RawSubscriber:
    """A second consumer of the proxy's usage stream, on its own socket: it reads every push
    in a thread so the proxy never drops it, and keeps the records it saw."""

    def __init__(self, proxy: RealProxy) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        self.records: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self.sock.sendall(_command("AUTH", MANAGEMENT_KEY) + _command("SUBSCRIBE", "usage"))
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> RawSubscriber:
        self._thread.start()
        if not self.subscribed.wait(10):
            raise AssertionError("the proxy never confirmed the second subscription")
        return self

    def _read(self) -> None:
        # Pushes are RESP bulk strings on lines of their own; records are the JSON lines
        # that carry an api_key (control messages do not).
        self.sock.settimeout(0.2)
        pending = b""
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if not chunk:
                return
            lines = (pending + chunk).split(b"\r\n")
            pending = lines.pop()
            for line in lines:
                if line == b":1":
                    self.subscribed.set()
                elif line.startswith(b'{"') and b'"api_key"' in line:
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _command(*parts: str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# --- a TCP relay a test can cut ---------------------------------------------------------------


class TcpRelay:
    """127.0.0.1:<port> -> the proxy. `cut()` closes every open connection (as a network
    fault or a restarted load balancer does); while `hold()` is on, new connections are
    accepted and never answered (a partition: the client's timeout ends them); `release()`
    closes those and lets new ones through again."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._hung: list[socket.socket] = []
        self._lock = threading.Lock()
        self._held = threading.Event()
        self._stop = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _addr = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if self._held.is_set():
                with self._lock:
                    self._hung.append(client)  # accepted, never answered: a partition
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                ready, _w, _x = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))

    def cut(self) -> None:
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.cuts += 1

    def hold(self) -> None:
        self._held.set()

    def release(self) -> None:
        self._held.clear()
        with self._lock:
            hung, self._hung = self._hung, []
        for sock in hung:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self.listener.close()
