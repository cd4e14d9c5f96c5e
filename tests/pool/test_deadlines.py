"""Whole-answer deadlines and the size cap, against real servers on 127.0.0.1.

A dripping proxy sends its headers and then one byte every 0.5 s for 40 s: `requests` alone
times each read, so it never tripped a timeout (sync_usage ran 151 s with CLIPROXY_TIMEOUT=5).
These tests assert that every call ends (and how it ends); the times are printed, and bounds
are generous (a busy CI machine), never tight timings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.test import Client

from accounts.models import User
from pool.keytest import ProxySlow, key_models
from pool.upstream import (
    ProxyClient, UpstreamRefused, UpstreamTooLarge, UpstreamUnexpected, UpstreamUnreachable,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "deadline-management-key"
DRIP_SECONDS = 40  # how long the dripping server would go on if let
DRIP_EVERY = 0.5
MiB = 1024 * 1024

pytestmark = pytest.mark.django_db


class Server:
    """A throw-away HTTP server on 127.0.0.1 whose handler is a plain function of the request
    handler: every path gets the same behaviour. Records how many body bytes it got out."""

    def __init__(self, behaviour) -> None:
        self.stop = threading.Event()
        self.sent = 0
        self.requests = 0
        self.peers: set[int] = set()  # client ports: one per connection
        self.handled = threading.Event()  # a handler has returned (done, or the client left)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                server.requests += 1
                server.peers.add(self.client_address[1])
                try:
                    behaviour(self, server)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client closed the connection: what these tests want
                finally:
                    server.handled.set()

            do_PUT = do_GET  # noqa: N815

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that closed a kept-alive connection

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def write(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(data)
        handler.wfile.flush()
        self.sent += len(data)


def drip(handler: BaseHTTPRequestHandler, server: Server) -> None:
    """Headers at once, then one byte every 0.5 s for 40 s (a valid JSON answer at the end)."""
    body = json.dumps({"usage-statistics-enabled": True, "pad": " " * 200}).encode()
    count = int(DRIP_SECONDS / DRIP_EVERY)
    body = body[:1] + b" " * max(count - len(body), 0) + body[1:]
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.flush()
    for byte in body:
        if server.stop.wait(DRIP_EVERY):
            return
        server.write(handler, bytes([byte]))


def drip_headers(handler: BaseHTTPRequestHandler, server: Server) -> None:
    """Even the status line and headers come one byte every 0.5 s."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"
    for byte in head:
        if server.stop.wait(DRIP_EVERY):
            return
        server.write(handler, bytes([byte]))


def huge(size: int, *, announce: bool):
    """A 200 answer of `size` bytes, sent as fast as the client takes it; with or without a
    Content-Length (without one, the end of the answer is the end of the connection)."""

    def behaviour(handler: BaseHTTPRequestHandler, server: Server) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if announce:
            handler.send_header("Content-Length", str(size))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        block = b"[" + b" " * (MiB - 2) + b"]"
        left = size
        while left > 0 and not server.stop.is_set():
            piece = block[:left]
            server.write(handler, piece)
            left -= len(piece)

    return behaviour


def timed(call) -> tuple[float, object]:
    started = time.monotonic()
    try:
        outcome = call()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        outcome = exc
    return time.monotonic() - started, outcome


def client_for(url: str, **kwargs: object) -> ProxyClient:
    return ProxyClient(base_url=url, management_key=KEY, **{"timeout": 2, **kwargs})


# --- commands: CLIPROXY_TIMEOUT bounds the whole answer ------------------------------------------


def test_a_dripping_answer_is_cut_at_the_timeout():
    with Server(drip) as server, client_for(server.url, timeout=1) as client:
        took, outcome = timed(client.usage_statistics_enabled)
    print(f"dripping answer cut after {took:.2f} s (CLIPROXY_TIMEOUT=1, drip of {DRIP_SECONDS} s)")
    assert isinstance(outcome, UpstreamUnreachable)
    assert "CLIPROXY_TIMEOUT" in str(outcome) and "did not answer" in str(outcome)
    assert KEY not in str(outcome)
    assert took < 10  # the drip goes on for 40 s


def test_dripped_headers_are_cut_at_the_timeout_too():
    with Server(drip_headers) as server, client_for(server.url, timeout=1) as client:
        took, outcome = timed(client.list_keys)
    print(f"dripped headers cut after {took:.2f} s (CLIPROXY_TIMEOUT=1)")
    assert isinstance(outcome, UpstreamUnreachable) and "CLIPROXY_TIMEOUT" in str(outcome)
    assert took < 10  # the headers alone would take 35 s


def test_a_kept_alive_connection_outlives_the_deadline_of_the_call_that_opened_it():
    def quick(handler: BaseHTTPRequestHandler, server: Server) -> None:
        body = json.dumps({"api-keys": ["a", "b"]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        server.write(handler, body)

    with Server(quick) as server, client_for(server.url, timeout=0.3) as client:
        assert client.list_keys() == ["a", "b"]
        # Past the first call's deadline: its watchdog was stopped when the answer was in,
        # so it has not shut the connection the next call reuses.
        time.sleep(1)
        assert client.list_keys() == ["a", "b"]
    assert server.requests == 2 and len(server.peers) == 1


def test_sync_usage_against_a_dripping_proxy_ends_with_a_sentence(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLIPROXY", "USAGE"))},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "SECRET_KEY": "deadline-test-secret-key-deadline-test-secret-key",
        "DEBUG": "false",
        "EMAIL_URL": "consolemail://",
        "PORTAL_POOL_MIN": "0",
        "CLIPROXY_MANAGEMENT_KEY": KEY,
        "CLIPROXY_TIMEOUT": "2",
        "PYTHONUNBUFFERED": "1",
    }
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    with Server(drip) as server:
        env["CLIPROXY_URL"] = server.url
        started = time.monotonic()
        done = subprocess.run([sys.executable, "manage.py", "sync_usage"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    print(f"sync_usage against a {DRIP_SECONDS} s drip ended after {took:.1f} s "
          f"(CLIPROXY_TIMEOUT=2, exit {done.returncode})")
    assert done.returncode != 0
    assert "CLIPROXY_TIMEOUT" in done.stderr and "did not answer" in done.stderr
    assert "Traceback" not in done.stderr and KEY not in done.stderr + done.stdout
    assert took < 30  # was the whole drip (151 s against a 40 s-per-answer proxy)


# --- pages: the page budget bounds all their calls -----------------------------------------------


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(User.objects.create_user("ops@example.com", is_staff=True))
    return client


@pytest.mark.parametrize("path", ["/staff/proxy", "/staff/proxy/settings"])
def test_a_staff_page_against_a_dripping_proxy_returns_within_the_budget(
    path, staff_client, settings
):
    settings.CLIPROXY_TIMEOUT = 10
    settings.PORTAL_REQUEST_PROXY_BUDGET = 1
    with Server(drip) as server:
        settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = server.url, KEY
        took, page = timed(lambda: staff_client.get(path))
    print(f"{path} against a {DRIP_SECONDS} s drip rendered in {took:.2f} s (budget 1 s)")
    assert page.status_code == 200
    text = page.content.decode()
    assert "did not answer within" in text and "PORTAL_REQUEST_PROXY_BUDGET" in text
    assert KEY not in text
    assert took < 10  # the page budget is 1 s; the drip would hold the worker for 40 s


def test_the_key_test_is_bounded_to_its_last_byte(settings):
    settings.CLIPROXY_TIMEOUT = 10
    settings.PORTAL_REQUEST_PROXY_BUDGET = 1
    with Server(drip) as server:
        settings.CLIPROXY_URL = server.url
        took, outcome = timed(lambda: key_models(key="sk-kp-some-client-key"))
    print(f"key test against a drip ended after {took:.2f} s (budget 1 s)")
    assert isinstance(outcome, ProxySlow)
    assert took < 10


# --- the size cap -------------------------------------------------------------------------------


@pytest.mark.parametrize("announce", [False, True], ids=["no-length", "content-length"])
def test_an_answer_over_the_cap_is_refused_and_memory_stays_bounded(announce):
    size = 50 * MiB
    with Server(huge(size, announce=announce)) as server:
        with client_for(server.url, timeout=30, max_answer_bytes=MiB) as client:
            tracemalloc.start()
            try:
                took, outcome = timed(client.list_keys)
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        # The server's writes fail once the client closed: wait for it to notice.
        assert server.handled.wait(60)
    print(f"50 MB answer, cap 1 MiB ({'announced' if announce else 'not announced'}): refused "
          f"after {took:.2f} s, peak traced memory {peak / MiB:.1f} MiB, server got "
          f"{server.sent / MiB:.1f} MiB out")
    assert isinstance(outcome, UpstreamTooLarge)
    assert "CLIPROXY_MAX_ANSWER_BYTES" in str(outcome) and "1 MiB" in str(outcome)
    assert peak < 8 * MiB  # the cap plus a chunk and bookkeeping; was 6x the body
    assert server.sent < 20 * MiB  # the connection was closed, not drained


def test_an_answer_under_the_cap_is_read():
    body = json.dumps({"api-keys": ["k" * 100] * 1000}).encode()

    def answer(handler: BaseHTTPRequestHandler, server: Server) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for start in range(0, len(body), 7000):  # in pieces, as a real network delivers
            server.write(handler, body[start:start + 7000])

    with Server(answer) as server, client_for(server.url, max_answer_bytes=len(body)) as client:
        assert len(client.list_keys()) == 1000


# --- the streamed pop -----------------------------------------------------------------------------


def pieces(parts: list[bytes], *, pause: float = 0.05, cut: bool = False):
    """A /usage-queue answer sent in `parts`; with `cut`, the connection is dropped before
    the last part although the Content-Length announced it."""

    def behaviour(handler: BaseHTTPRequestHandler, server: Server) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(sum(map(len, parts))))
        handler.end_headers()
        handler.wfile.flush()
        for part in parts[:-1] if cut else parts:
            server.write(handler, part)
            if server.stop.wait(pause):
                return
        if cut:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    return behaviour


RECORDS = [{"timestamp": "2026-12-02T05:00:00Z", "api_key": f"sk-{i}", "model": "m",
            "tokens": {"input_tokens": i}} for i in range(300)]
BODY = json.dumps(RECORDS).encode()
PARTS = [BODY[i:i + 3000] for i in range(0, len(BODY), 3000)]


def test_a_streamed_pop_hands_every_chunk_to_the_sink_as_it_arrives():
    chunks: list[bytes] = []
    with Server(pieces(PARTS)) as server, client_for(server.url) as client:
        written = client.usage_queue_pop_stream(count=300, sink=chunks.append)
    assert b"".join(chunks) == BODY and written == len(BODY)
    assert len(chunks) > 1  # handed over as it came, not held whole
    assert max(map(len, chunks)) <= 64 * 1024


def test_a_streamed_pop_is_not_capped():
    big = json.dumps(RECORDS * 40).encode()  # ~2 MB against a cap of 64 KiB
    chunks: list[bytes] = []
    parts = [big[i:i + MiB // 4] for i in range(0, len(big), MiB // 4)]
    with Server(pieces(parts, pause=0)) as server, \
            client_for(server.url, max_answer_bytes=64 * 1024) as client:
        written = client.usage_queue_pop_stream(count=12000, sink=chunks.append)
        with pytest.raises(UpstreamTooLarge):
            client.usage_queue_pop_raw(count=12000)  # the in-memory pop is
    assert written == len(big) and b"".join(chunks) == big


def test_a_pop_cut_mid_answer_raises_after_the_sink_got_what_arrived():
    chunks: list[bytes] = []
    with Server(pieces(PARTS, cut=True)) as server, client_for(server.url) as client:
        with pytest.raises(UpstreamUnreachable, match="broke the connection"):
            client.usage_queue_pop_stream(count=300, sink=chunks.append)
    assert b"".join(chunks) == b"".join(PARTS[:-1])


def test_a_pop_past_its_deadline_raises_after_the_sink_got_what_arrived():
    chunks: list[bytes] = []
    with Server(drip) as server, client_for(server.url, timeout=1.5) as client:
        took, outcome = timed(lambda: client.usage_queue_pop_stream(count=5, sink=chunks.append))
    print(f"streamed pop against a drip cut after {took:.2f} s with {len(b''.join(chunks))} "
          "bytes handed to the sink")
    assert isinstance(outcome, UpstreamUnreachable) and "CLIPROXY_TIMEOUT" in str(outcome)
    assert 1 <= len(b"".join(chunks)) <= int(DRIP_SECONDS / DRIP_EVERY)
    assert took < 10


def test_a_refused_pop_gives_the_sink_nothing():
    def error(handler: BaseHTTPRequestHandler, server: Server) -> None:
        body = b'{"error": "boom"}'
        handler.send_response(500)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        server.write(handler, body)

    chunks: list[bytes] = []
    with Server(error) as server, client_for(server.url) as client:
        with pytest.raises(UpstreamUnexpected, match="HTTP 500: boom"):
            client.usage_queue_pop_stream(count=5, sink=chunks.append)
    assert chunks == []




def test_what_the_sink_raises_comes_out_unchanged_and_the_client_goes_on():
    def full(chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    with Server(pieces(PARTS)) as server, client_for(server.url) as client:
        with pytest.raises(OSError, match="No space left"):
            client.usage_queue_pop_stream(count=300, sink=full)
        chunks: list[bytes] = []
        assert client.usage_queue_pop_stream(count=300, sink=chunks.append) == len(BODY)
    assert b"".join(chunks) == BODY


def test_a_refusal_with_a_huge_body_is_still_a_refusal():
    def refuse(handler: BaseHTTPRequestHandler, server: Server) -> None:
        handler.send_response(401)
        handler.send_header("Content-Length", str(5 * MiB))
        handler.end_headers()
        server.write(handler, b"x" * (5 * MiB))

    with Server(refuse) as server, client_for(server.url, max_answer_bytes=MiB) as client:
        with pytest.raises(UpstreamRefused, match="CLIPROXY_MANAGEMENT_KEY"):
            client.list_keys()
        # Remembered by the latch: nothing more is sent with that key.
        with pytest.raises(UpstreamRefused, match="Nothing was sent"):
            client.list_keys()
    assert server.requests == 1
