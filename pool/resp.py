"""A small RESP2 client for CLIProxyAPI's usage stream (7.x).

The proxy speaks the Redis protocol on its HTTP port (it tells the two apart by the first
bytes): `AUTH <management key>` then `SUBSCRIBE usage` answers `["subscribe","usage",1]`, and
from then on every usage record arrives as a push `["message","usage","<record JSON>"]`. The
first push is `{"support_refresh":true}` and later ones `{"refresh":true}` (config changes):
they are not records and `UsageSubscriber.read` skips them. Every subscriber gets a copy of
every record, and while anybody is subscribed `/usage-queue` stays empty. A subscriber that
falls 256 messages behind is dropped by the proxy: read promptly, and reconnect.

Failures reuse pool.upstream's typed errors, with one sentence that never holds the key:
- UpstreamUnreachable: no connection, a timeout in the handshake, or the connection closed.
- UpstreamRefused: AUTH refused. The proxy counts a refused AUTH as a failed management login
  (5 of them ban the address for 30 minutes), so a caller must not retry on the spot.
- UpstreamUnexpected: the other end does not speak RESP (6.x answers an HTTP 400) or sent a
  frame the protocol does not allow.
Only the standard library: one socket, one buffer, no thread.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from pool.upstream import UpstreamNotConfigured, UpstreamRefused, UpstreamUnexpected, \
    UpstreamUnreachable

MAX_FRAME = 16 * 1024 * 1024  # one record is a few kB; anything this large is not a record
MAX_DEPTH = 4  # pushes are flat arrays; nesting deeper than this is garbage
RECV_SIZE = 65536

# Pushes on the usage channel that are not usage records (compared after json.loads).
CONTROL_KEYS = frozenset({"support_refresh", "refresh"})


class _Incomplete(Exception):
    """The buffer ends inside a frame: read more."""


class _Closed(UpstreamUnreachable):
    """The other end closed the connection."""


def encode_command(*parts: str | bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespError:
    """An error reply (`-ERR ...`): a value, not an exception, so that the caller decides."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RespError({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and other.text == self.text


def parse_frame(buffer: bytes | bytearray, start: int = 0, depth: int = 0) -> tuple[Any, int]:
    """One RESP2 value from `buffer` at `start`: (value, offset after it). Raises _Incomplete
    when the buffer ends inside the frame and UpstreamUnexpected when it is not RESP. Simple
    strings come out as str, bulk strings as bytes (None for the null bulk), integers as
    int, errors as RespError, arrays as lists."""
    if start >= len(buffer):
        raise _Incomplete
    end = buffer.find(b"\r\n", start)
    if end < 0:
        if len(buffer) - start > MAX_FRAME:
            raise UpstreamUnexpected(str(_NOT_RESP))
        raise _Incomplete
    kind, line = buffer[start:start + 1], bytes(buffer[start + 1:end])
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _length(line, allow_negative=True), after
    if kind == b"$":
        size = _length(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        if buffer[after + size:after + size + 2] != b"\r\n":
            raise UpstreamUnexpected(str(_NOT_RESP))
        return bytes(buffer[after:after + size]), after + size + 2
    if kind == b"*":
        count = _length(line)
        if count < 0:
            return None, after
        if depth >= MAX_DEPTH:
            raise UpstreamUnexpected(str(_NOT_RESP))
        items = []
        for _i in range(count):
            item, after = parse_frame(buffer, after, depth + 1)
            items.append(item)
        return items, after
    raise UpstreamUnexpected(str(_NOT_RESP))


_NOT_RESP = gettext_lazy(
    "The proxy's port answered something that is not the Redis protocol (RESP)."
)


def _length(line: bytes, *, allow_negative: bool = False) -> int:
    try:
        value = int(line)
    except ValueError:
        raise UpstreamUnexpected(str(_NOT_RESP)) from None
    if value > MAX_FRAME or (value < -1 and not allow_negative):
        raise UpstreamUnexpected(str(_NOT_RESP))
    return value


def is_control_message(payload: bytes) -> bool:
    """`{"support_refresh":true}` / `{"refresh":true}`: the proxy's own notices on the
    channel, not usage records. Only short payloads are parsed to find out."""
    if len(payload) > 200 or b"refresh" not in payload:
        return False
    try:
        value = json.loads(payload)
    except ValueError:
        return False
    return isinstance(value, dict) and bool(value) and set(value) <= CONTROL_KEYS


class UsageSubscriber:
    """One subscription to a channel (`usage`). Build it, `connect()`, then `read()` in a loop;
    `close()` (or the `with` block) ends it."""

    def __init__(self, *, host: str, port: int, management_key: str, timeout: float,
                 tls: bool = False, channel: str = "usage") -> None:
        if not management_key:
            raise UpstreamNotConfigured(_(
                "CLIPROXY_MANAGEMENT_KEY is not set: the portal cannot subscribe to the proxy's "
                "usage stream."
            ))
        self.host, self.port, self.tls, self.channel = host, port, tls, channel
        self.timeout = timeout
        self._key = management_key
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self.skipped = 0  # control messages seen (support_refresh, refresh)

    @classmethod
    def from_settings(cls, *, channel: str = "usage") -> UsageSubscriber:
        """The RESP endpoint is CLIPROXY_URL's host and port (the proxy serves both there)."""
        from pool.upstreams.registry import cliproxyapi_endpoint  # noqa: PLC0415 (models)

        where = cliproxyapi_endpoint()  # CLIPROXY_*, or the CLIProxyAPI staff added
        if not where.management_url:
            raise UpstreamNotConfigured(
                _("No proxy is configured: set CLIPROXY_URL (and CLIPROXY_MANAGEMENT_KEY).")
            )
        parts = urlsplit(where.management_url)
        tls = parts.scheme == "https"
        if not parts.hostname:
            raise UpstreamNotConfigured(_("CLIPROXY_URL has no host name."))
        return cls(
            host=parts.hostname, port=parts.port or (443 if tls else 80),
            management_key=where.secret, timeout=settings.CLIPROXY_TIMEOUT,
            tls=tls, channel=channel,
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> UsageSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # -- the handshake -------------------------------------------------------------------

    def connect(self) -> None:
        """Connects, authenticates and subscribes, within `timeout` in all. Raises
        UpstreamRefused (no retry: see the module), UpstreamUnexpected (not RESP: a 6.x proxy
        answers HTTP) or UpstreamUnreachable."""
        deadline = time.monotonic() + self.timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError:
            raise UpstreamUnreachable(_(
                "The proxy's usage stream at %(where)s cannot be reached (connection failed); "
                "check CLIPROXY_URL and that the proxy is running."
            ) % {"where": self.where}) from None
        if self.tls:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError):
                sock.close()
                raise UpstreamUnreachable(
                    _("The proxy's usage stream at %(where)s refused the TLS handshake.")
                    % {"where": self.where}
                ) from None
        self._sock = sock
        self._buffer.clear()
        try:
            self._send(encode_command("AUTH", self._key))
            reply = self._reply(deadline)
            if isinstance(reply, RespError):
                raise UpstreamRefused(_(
                    "The proxy's usage stream at %(where)s refused the management key "
                    "(%(reason)s): check CLIPROXY_MANAGEMENT_KEY. It is not tried again on the "
                    "spot: the proxy bans an address after 5 failed attempts."
                ) % {"where": self.where, "reason": _short(reply.text)})
            if reply != "OK":
                raise UpstreamUnexpected(str(_NOT_RESP))
            self._send(encode_command("SUBSCRIBE", self.channel))
            reply = self._reply(deadline)
            if isinstance(reply, RespError):
                raise UpstreamUnexpected(
                    _("The proxy's usage stream at %(where)s refused SUBSCRIBE %(channel)s "
                      "(%(reason)s).")
                    % {"where": self.where, "channel": self.channel,
                       "reason": _short(reply.text)}
                )
            if (not isinstance(reply, list) or len(reply) != 3 or reply[0] != b"subscribe"
                    or reply[1] != self.channel.encode()):
                raise UpstreamUnexpected(str(_NOT_RESP))
        except _Closed:
            # Hung up on the handshake without a word: a plain HTTP server (not RESP).
            self.close()
            raise UpstreamUnexpected(_(
                "The proxy at %(where)s closed the connection on the Redis protocol's AUTH: it "
                "has no usage stream (RESP)."
            ) % {"where": self.where}) from None
        except BaseException:
            self.close()
            raise

    # -- reading pushes ------------------------------------------------------------------

    def read(self, *, timeout: float) -> bytes | None:
        """The next usage record's JSON (bytes, untouched), or None when none came within
        `timeout` seconds. Control messages are skipped. Raises UpstreamUnreachable when the
        proxy closed the connection (it drops subscribers that fall behind) and
        UpstreamUnexpected on a frame that is not a push of this channel."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            frame = self._next_frame(deadline)
            if frame is None:
                return None
            if isinstance(frame, RespError):
                raise UpstreamUnexpected(
                    _("The proxy's usage stream at %(where)s sent an error (%(reason)s).")
                    % {"where": self.where, "reason": _short(frame.text)}
                )
            if not isinstance(frame, list) or len(frame) != 3 or frame[0] != b"message":
                # pong or another subscribe confirmation: not a record, not an error
                continue
            payload = frame[2]
            if not isinstance(payload, bytes):
                raise UpstreamUnexpected(str(_NOT_RESP))
            if is_control_message(payload):
                self.skipped += 1
                continue
            return payload

    def _next_frame(self, deadline: float) -> Any | None:
        """A whole frame from the buffer, reading the socket until `deadline`; None on time."""
        while True:
            try:
                frame, used = parse_frame(self._buffer)
            except _Incomplete:
                pass
            else:
                del self._buffer[:used]
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._fill(left)

    def _fill(self, timeout: float) -> None:
        if self._sock is None:
            raise UpstreamUnreachable(
                _("The proxy's usage stream at %(where)s is not connected.")
                % {"where": self.where}
            )
        self._sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self._sock.recv(RECV_SIZE)
        except (TimeoutError, socket.timeout):
            return
        except OSError:
            raise self._broken() from None
        if not chunk:
            self.close()
            raise _Closed(_(
                "The proxy's usage stream at %(where)s closed the connection (it drops a "
                "subscriber that falls 256 messages behind, and closes them all when it stops)."
            ) % {"where": self.where})
        self._buffer += chunk

    def _reply(self, deadline: float) -> Any:
        frame = self._next_frame(deadline)
        if frame is None:
            raise UpstreamUnreachable(
                _("The proxy's usage stream at %(where)s did not answer within %(s)g s "
                  "(CLIPROXY_TIMEOUT).") % {"where": self.where, "s": self.timeout}
            )
        return frame

    def _broken(self) -> UpstreamUnreachable:
        self.close()
        return UpstreamUnreachable(
            _("The connection to the proxy's usage stream at %(where)s broke.")
            % {"where": self.where}
        )

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except OSError:
            raise self._broken() from None


def _short(text: str) -> str:
    """The proxy's error sentence, cut; its errors never echo the key."""
    return " ".join(text.split())[:200] or "no reason given"
