"""A tiny RESP server on 127.0.0.1 for tests of pool.resp and usage.stream: each accepted
connection runs a script (a function of the connection and the server) in a thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from pool.resp import _Incomplete, parse_frame

SUBSCRIBED = b"*3\r\n$9\r\nsubscribe\r\n$5\r\nusage\r\n:1\r\n"


def push(payload: bytes) -> bytes:
    """A `message usage <payload>` push, as the proxy sends it."""
    return b"*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$%d\r\n%s\r\n" % (len(payload), payload)


class FakeResp:
    """Accepts connections; `script(conn, server)` answers each one."""

    def __init__(self, script: Callable[[socket.socket, FakeResp], Any]) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.received: list[bytes] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.script(conn, self)
        except OSError:
            pass

    def read_command(self, conn: socket.socket) -> list[bytes]:
        buffer = b""
        conn.settimeout(5)
        while True:
            try:
                value, used = parse_frame(buffer)
                self.received.append(buffer[:used])
                return value
            except _Incomplete:
                chunk = conn.recv(4096)
                if not chunk:
                    raise OSError("closed")
                buffer += chunk

    def handshake(self, conn: socket.socket) -> None:
        """Accepts AUTH (any key) and SUBSCRIBE, with the proxy's first control message."""
        self.read_command(conn)
        conn.sendall(b"+OK\r\n")
        self.read_command(conn)
        conn.sendall(SUBSCRIBED + push(b'{"support_refresh":true}'))

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
