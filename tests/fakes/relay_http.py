"""What the fake relays (tests/fakes/crs.py, tests/fakes/cch.py) share: a threaded JSON server
on 127.0.0.1 with faults injected by path prefix. Each fake says how it routes a request and
how its relay words an error; the faults are the same everywhere:

- "500": the relay's own internal error; "hang": no answer for 30 s;
- "malformed": a 200 whose JSON is cut off; "drip": the answer one byte every 0.2 s.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class FakeRelayServer:
    """Subclasses call `super().__init__()` last (the handler reads their state) and define
    `route(method, path, query, body, headers) -> (status, answer)`."""

    # Overridden by each fake with its relay's own wording.
    malformed_body = b'{"data": ['

    def __init__(self, *, lock: Any = None) -> None:
        self.faults: list[tuple[str, str]] = []
        self.lock = lock if lock is not None else threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Any:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, path_prefix: str, kind: str) -> None:
        self.faults.append((path_prefix, kind))

    # -- what each fake says its own way --

    def route(self, method: str, path: str, query: dict[str, str], body: Any,
              headers: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def dispatch(self, method: str, path: str, query: dict[str, str], body: Any,
                 headers: Any) -> tuple[int, Any]:
        """Admin routes run one at a time under the lock (a fake's state is plain dicts)."""
        with self.lock:
            return self.route(method, path, query, body, headers)

    def bad_json(self) -> tuple[int, Any]:
        return 400, {"error": "Invalid JSON"}

    def internal_error(self) -> tuple[int, Any]:
        return 500, {"error": "Internal server error"}

    def content_type(self, status: int, answer: Any) -> str:
        return "application/json; charset=utf-8"

    # -- HTTP --

    def _take_fault(self, path: str) -> str | None:
        with self.lock:
            for i, (prefix, kind) in enumerate(self.faults):
                if path.startswith(prefix):
                    del self.faults[i]
                    return kind
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    self._send(*fake.bad_json())
                    return
                fault = fake._take_fault(parts.path)
                if fault == "500":
                    self._send(*fake.internal_error())
                    return
                if fault == "hang":
                    time.sleep(30)
                    return
                status, answer = fake.dispatch(self.command, parts.path, query, body,
                                               self.headers)
                if fault == "malformed":
                    self._raw(200, fake.malformed_body, fake.content_type(200, None))
                elif fault == "drip":
                    self._drip(json.dumps(answer).encode())
                else:
                    self._send(status, answer)

            def _send(self, status: int, answer: Any) -> None:
                if status == 204:
                    self.send_response(204)
                    self.end_headers()
                    return
                self._raw(status, json.dumps(answer).encode(), fake.content_type(status, answer))

            def _raw(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drip(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", fake.content_type(200, None))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the client gave up, as it should

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        return Handler
