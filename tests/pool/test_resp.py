"""pool.resp against a tiny fake RESP server on 127.0.0.1: frames, partial frames, the proxy's
control messages, a refused AUTH (one try, a clear sentence, never the key), and a port that
does not speak RESP."""

from __future__ import annotations

import socket
import time

import pytest

from pool.resp import (
    RespError, UsageSubscriber, _Incomplete, encode_command, is_control_message, parse_frame,
)
from pool.upstream import UpstreamRefused, UpstreamUnexpected, UpstreamUnreachable
from tests.fakes.resp import SUBSCRIBED, push

KEY = "resp-test-management-key-do-not-leak"




def subscriber(port: int, timeout: float = 3) -> UsageSubscriber:
    return UsageSubscriber(host="127.0.0.1", port=port, management_key=KEY, timeout=timeout)


def test_frames_of_every_kind_parse_and_a_cut_frame_asks_for_more():
    frame = b"*5\r\n+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n"
    assert parse_frame(frame) == (["OK", RespError("ERR no"), 42, b"abc", None], len(frame))
    for cut in range(len(frame)):
        with pytest.raises(_Incomplete):
            parse_frame(frame[:cut])
    with pytest.raises(UpstreamUnexpected):
        parse_frame(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(UpstreamUnexpected):
        parse_frame(b"$3\r\nabcd\r\n")  # the length lies


def test_control_messages_are_told_from_records():
    assert is_control_message(b'{"support_refresh":true}')
    assert is_control_message(b'{"refresh": true}')
    assert not is_control_message(b'{"api_key":"k","refresh":true}')
    assert not is_control_message(b'{"api_key":"k","model":"m"}')
    assert not is_control_message(b"not json refresh")


def test_subscribes_skips_control_messages_and_reads_records_sent_in_pieces(resp_servers):
    records = [b'{"api_key":"k1","model":"m"}', b'{"api_key":"k2","model":"m"}']

    def script(conn, server):
        assert server.read_command(conn) == [b"AUTH", KEY.encode()]
        conn.sendall(b"+OK\r\n")
        assert server.read_command(conn) == [b"SUBSCRIBE", b"usage"]
        conn.sendall(SUBSCRIBED + push(b'{"support_refresh":true}'))
        stream = push(records[0]) + push(b'{"refresh":true}') + push(records[1])
        for i in range(0, len(stream), 7):  # partial frames: 7 bytes at a time
            conn.sendall(stream[i:i + 7])
            time.sleep(0.002)
        time.sleep(2)

    server = resp_servers(script)
    with subscriber(server.port) as sub:
        sub.connect()
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            payload = sub.read(timeout=0.5)
            if payload is not None:
                got.append(payload)
        assert got == records
        assert sub.skipped == 2
        assert sub.read(timeout=0.05) is None  # nothing more: None, not an error


def test_refused_auth_is_one_clear_sentence_one_try_and_never_the_key(resp_servers):
    def script(conn, server):
        server.read_command(conn)
        conn.sendall(b"-ERR invalid management key\r\n")
        time.sleep(0.5)

    server = resp_servers(script)
    sub = subscriber(server.port)
    with pytest.raises(UpstreamRefused) as refused:
        sub.connect()
    message = str(refused.value)
    assert "invalid management key" in message and "CLIPROXY_MANAGEMENT_KEY" in message
    assert KEY not in message
    # One AUTH, no SUBSCRIBE after it, and no second connection (no retry storm).
    assert [c.split(b"\r\n")[2] for c in server.received] == [b"AUTH"]
    time.sleep(0.2)
    assert server.connections == 1


def test_a_port_that_speaks_http_is_not_a_stream(resp_servers):
    def script(conn, server):
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n400 Bad Request")
        conn.close()

    server = resp_servers(script)
    with pytest.raises(UpstreamUnexpected) as exc:
        subscriber(server.port).connect()
    assert KEY not in str(exc.value)


def test_a_server_that_hangs_up_on_auth_is_not_a_stream(resp_servers):
    def script(conn, server):
        conn.recv(4096)
        conn.close()

    server = resp_servers(script)
    with pytest.raises(UpstreamUnexpected):
        subscriber(server.port).connect()


def test_silence_in_the_handshake_is_bounded_by_the_timeout(resp_servers):
    def script(conn, server):
        time.sleep(5)

    server = resp_servers(script)
    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable) as exc:
        subscriber(server.port, timeout=0.5).connect()
    assert "did not answer" in str(exc.value)
    print(f"handshake gave up after {time.monotonic() - started:.2f} s (timeout 0.5 s)")


def test_a_dropped_subscription_raises_unreachable_so_the_caller_reconnects(resp_servers):
    def script(conn, server):
        server.read_command(conn)
        conn.sendall(b"+OK\r\n")
        server.read_command(conn)
        conn.sendall(SUBSCRIBED + push(b'{"api_key":"k","model":"m"}'))
        conn.close()  # as the proxy does to a subscriber 256 messages behind

    server = resp_servers(script)
    with subscriber(server.port) as sub:
        sub.connect()
        assert sub.read(timeout=5) == b'{"api_key":"k","model":"m"}'
        with pytest.raises(UpstreamUnreachable):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sub.read(timeout=0.5)


def test_nothing_listening_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamUnreachable):
        subscriber(port).connect()


def test_encode_command_is_resp_bulk_strings():
    assert encode_command("AUTH", "x y") == b"*2\r\n$4\r\nAUTH\r\n$3\r\nx y\r\n"
