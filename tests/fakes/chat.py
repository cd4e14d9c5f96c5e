"""A fake team chat robot on 127.0.0.1: DingTalk, Feishu / Lark, WeCom, Slack or a generic
JSON endpoint. It records every request and, like the real platform, checks the signature
itself (written here from the platforms' documents, not taken from keyportal.webhooks) and
answers as the platform does: DingTalk errcode 310000 and Feishu code 19021 on a bad sign.

Modes: "ok"; "refuse" (the platform's own refusal, on HTTP 200 where it does that); "error"
(HTTP 500); "hang" (holds the request until `release` is set, or 60 s); "drip" (headers, then
a byte now and then, never finishing within a short timeout)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

PATHS = {
    "dingtalk": "/robot/send?access_token=dt-token-0123456789",
    "feishu": "/open-apis/bot/v2/hook/fs-hook-0123456789",
    "wecom": "/cgi-bin/webhook/send?key=wc-key-0123456789",
    "slack": "/services/T000/B000/slack-secret-0123456789",
    "json": "/hooks/portal-json-0123456789",
}


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def dingtalk_expected(secret: str, timestamp: str) -> str:
    string_to_sign = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(secret.encode(), string_to_sign, hashlib.sha256).digest()).decode()


def feishu_expected(secret: str, timestamp: str) -> str:
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def json_expected(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class ChatReceiver:
    kind: str
    secret: str = ""
    mode: str = "ok"
    received: list[Received] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    legacy: bool = False  # Feishu: answer the old {"StatusCode": 0} shape
    # Holds the first requests until `gate` of them are in flight at once (two workers
    # sending at the same time), or 30 s.
    gate: int = 0

    def start(self) -> ChatReceiver:
        receiver = self
        self._gate_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                receiver.received.append(Received(parts.path, query, dict(self.headers), body))
                receiver.arrived.set()
                if receiver.gate:
                    receiver._gate_wait()
                if receiver.mode == "hang":
                    receiver.release.wait(60)
                if receiver.mode == "error":
                    return self._answer(500, b"boom")
                if receiver.mode == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    for _ in range(100):
                        if receiver.release.wait(0.2):
                            return
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                status, answer = receiver.answer(body, query, dict(self.headers))
                self._answer(status, answer)

            def _answer(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (its timeout): nothing to answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def _gate_wait(self) -> None:
        with self._gate_lock:
            if not hasattr(self, "_barrier"):
                self._barrier = threading.Barrier(self.gate)
            barrier = self._barrier
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            pass
        self.gate = 0  # once met, the gate stays open

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{PATHS[self.kind]}"

    def sign_ok(self, body: bytes, query: dict[str, str], headers: dict[str, str]) -> bool:
        if not self.secret:
            return True
        if self.kind == "dingtalk":
            ts = query.get("timestamp", "")
            fresh = ts.isdigit() and abs(int(ts) - time.time() * 1000) < 3600_000
            return fresh and query.get("sign") == dingtalk_expected(self.secret, ts)
        if self.kind == "feishu":
            data = json.loads(body)
            ts = data.get("timestamp", "")
            fresh = isinstance(ts, str) and ts.isdigit() and abs(int(ts) - time.time()) < 3600
            return fresh and data.get("sign") == feishu_expected(self.secret, ts)
        if self.kind == "json":
            return headers.get("X-Portal-Signature") == json_expected(self.secret, body)
        return True

    def answer(self, body: bytes, query: dict[str, str], headers: dict[str, str]
               ) -> tuple[int, bytes]:
        good = self.mode in ("ok", "hang") and self.sign_ok(body, query, headers)
        if self.kind == "dingtalk":
            return 200, json.dumps({"errcode": 0, "errmsg": "ok"} if good else
                                   {"errcode": 310000, "errmsg": "sign not match"}).encode()
        if self.kind == "feishu":
            if self.legacy:
                return 200, json.dumps({"StatusCode": 0 if good else 19021,
                                        "StatusMessage": "success" if good else "sign match fail"}
                                       ).encode()
            return 200, json.dumps({"code": 0, "msg": "success", "data": {}} if good else
                                   {"code": 19021, "msg": "sign match fail or timestamp is not "
                                    "within one hour from current time", "data": {}}).encode()
        if self.kind == "wecom":
            return 200, json.dumps({"errcode": 0, "errmsg": "ok"} if good else
                                   {"errcode": 93000, "errmsg": "invalid webhook url"}).encode()
        if self.kind == "slack":
            return (200, b"ok") if good else (400, b"invalid_payload")
        return (200, b"{}") if good else (401, b"{}")


@pytest.fixture
def receivers():
    """Starts a receiver per call (`receivers("slack", mode=...)`), all stopped after the test.
    Tests import it by name."""
    made: list[ChatReceiver] = []

    def make(kind: str, **kwargs: Any) -> ChatReceiver:
        made.append(ChatReceiver(kind, **kwargs).start())
        return made[-1]

    yield make
    for r in made:
        r.stop()
