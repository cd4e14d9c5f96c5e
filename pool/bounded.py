"""HTTP calls to the proxy bounded from connect to last byte, and in size.

`requests` times each socket read, not the answer: a proxy that sends its headers and then one
byte every half second never trips a read timeout, and held `sync_usage` for 151 s with
CLIPROXY_TIMEOUT=5 (and a page's worker for as long). Nothing capped an answer's size either:
a 50 MB pop took 319 MB of memory. So every call here:

- is sent with `stream=True` and a timeout (connect and each read) no longer than the time
  left, then read in chunks of at most CHUNK bytes, each handed over as soon as it arrives
  (`read1`), against a monotonic deadline;
- has a watchdog timer that shuts the connection's socket down at the deadline, which wakes
  any read blocked in between (headers dripped byte by byte included), so the bound holds
  whatever the server does;
- is read into memory only up to a cap (refused as soon as it is passed, or at once when the
  announced Content-Length is over it), or handed to a sink chunk by chunk (no cap: the caller
  writes it to disk, never holding it whole).

The clients (pool/upstream.py, pool/keytest.py) turn the errors below into their own typed
errors with a sentence for a person.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

CHUNK = 64 * 1024  # what one read may hand over: memory per call stays this plus the cap
WATCH_AGAIN = 0.05  # a connection still being opened at the deadline is looked at again


class DeadlinePassed(Exception):
    """The deadline came before the last byte (the connection is closed)."""


class AnswerBroken(Exception):
    """The connection broke before the answer was complete (not the deadline)."""


class AnswerTooLarge(Exception):
    """The answer is (or announces it is) larger than the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(cap)
        self.cap = cap


# --- the watchdog -----------------------------------------------------------------------------

# The call this thread is sending: the connection pool below tells it which connection it got,
# so that the watchdog (another thread) can shut that connection's socket down.
_sending = threading.local()


class _Call:
    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.conn: Any = None
        self.expired = False
        self._done = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._arm(timeout)

    def _arm(self, seconds: float) -> None:
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            sock = getattr(self.conn, "sock", None)
            if sock is None:
                # Not connected yet (the connect timeout ends that soon): look again, so that
                # a connection opened just now cannot start a drip past the deadline.
                self._arm(WATCH_AGAIN)
                return
        try:
            # shutdown, not close: it wakes a recv() blocked in the sending thread at once.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def finish(self) -> None:
        with self._lock:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()


class _WatchedPool:
    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        call = getattr(_sending, "call", None)
        if call is not None:
            call.conn = conn  # new or kept alive: either way the one this call reads from
        return conn


class _WatchedHTTPPool(_WatchedPool, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPool, HTTPSConnectionPool):
    pass


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS  # type: ignore[attr-defined]

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # An HTTP(S)_PROXY in the environment gets its own manager: watched the same way.
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def session() -> requests.Session:
    """A `requests.Session` whose connections the watchdog can reach."""
    made = requests.Session()
    adapter = _WatchedAdapter()
    made.mount("http://", adapter)
    made.mount("https://", adapter)
    return made


# --- one call ---------------------------------------------------------------------------------


class Answer:
    """A response whose headers arrived within the deadline; its body is read with `read()`
    or `stream()`, still within it. Use it as a context manager: leaving it stops the watchdog
    and closes a connection that was not read to the end."""

    def __init__(self, response: requests.Response, call: _Call) -> None:
        self.response = response
        self._call = call
        self._complete = False

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._call.finish()
        if not self._complete:
            self.response.close()  # half read: the connection is not fit to be reused

    def _chunks(self) -> Any:
        raw = self.response.raw
        while True:
            if self._call.expired or time.monotonic() >= self._call.deadline:
                raise DeadlinePassed
            try:
                chunk = raw.read1(CHUNK, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError,
                    ValueError) as exc:
                if self._call.expired:
                    raise DeadlinePassed from None
                raise AnswerBroken(type(exc).__name__) from None
            if not chunk:
                if self._call.expired:  # the watchdog's shutdown reads as an end of file
                    raise DeadlinePassed
                self._complete = True
                return
            yield chunk

    def read(self, *, cap: int) -> bytes:
        """The whole body, refused over `cap` bytes: memory stays within cap + CHUNK. The
        response's `.content`, `.text` and `.json()` then work as usual."""
        announced = self.response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > cap:
            raise AnswerTooLarge(cap)  # refused before a byte of it is read
        body = bytearray()
        for chunk in self._chunks():
            body += chunk
            if len(body) > cap:
                raise AnswerTooLarge(cap)
        content = bytes(body)
        # requests keeps a streamed body here once read; setting it lets every caller use the
        # response as if it had not been streamed.
        self.response._content = content  # type: ignore[attr-defined]
        self.response._content_consumed = True  # type: ignore[attr-defined]
        return content

    def stream(self, sink: Callable[[bytes], None]) -> int:
        """Hands the body to `sink` chunk by chunk as it arrives; returns the bytes handed
        over. On DeadlinePassed or AnswerBroken, what arrived before went to the sink; what
        the sink raises (a full disk) comes out unchanged, the connection closed."""
        written = 0
        for chunk in self._chunks():
            sink(chunk)
            written += len(chunk)
        self.response._content = b""  # type: ignore[attr-defined]
        self.response._content_consumed = True  # type: ignore[attr-defined]
        return written


def send(session: requests.Session, method: str, url: str, *, timeout: float,
         **kwargs: Any) -> Answer:
    """Sends one request; returns once its headers are in, all within `timeout` seconds from
    now (the body is read from the Answer, within the same deadline). Raises DeadlinePassed,
    or what `requests` raises (connection refused, connect or read timeout)."""
    call = _Call(timeout)
    _sending.call = call
    try:
        response = session.request(method, url, timeout=timeout, stream=True, **kwargs)
    except BaseException as exc:
        call.finish()
        if call.expired and isinstance(exc, (requests.RequestException, OSError)):
            raise DeadlinePassed from None
        raise
    finally:
        _sending.call = None
    if call.expired:
        call.finish()
        response.close()
        raise DeadlinePassed
    return Answer(response, call)
