"""usage.stream in process, against a tiny fake RESP server (the stream) and the fake proxy
(the HTTP queue): a stop commits what is buffered, a dropped subscription is re-made and the
queue drained, a refused AUTH falls back to polling without trying again, a lost lease
commits nothing more. The real proxy: tests/usage/test_stream_real.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime, timezone as dt_timezone
from io import StringIO

import pytest
from django.core.management import call_command
from django.db.models import Sum
from django.utils import translation

from pool.resp import UsageSubscriber
from tests.fakes.resp import FakeResp, push
from usage import stream as stream_module
from usage.management.commands import sync_usage as command
from usage.models import SyncRun, UsageSnapshot
from usage.services import sync_lease
from usage.stream import UsageStream

pytestmark = pytest.mark.django_db

WAIT = 30.0  # bounded waits for a state; generous for a busy machine


def record(value: str, n: int) -> bytes:
    return json.dumps({
        "timestamp": datetime(2026, 12, 1, 10, 0, n, tzinfo=dt_timezone.utc).isoformat(),
        "api_key": value, "model": "claude-mock-upstream", "failed": False,
        "request_id": f"r{n}", "tokens": {"input_tokens": 10, "output_tokens": 5,
                                          "total_tokens": 15},
    }).encode()


@pytest.fixture(autouse=True)
def _english():
    # The messages are asserted in English, whatever an earlier test left active.
    with translation.override("en"):
        yield




@pytest.fixture
def stream_settings(settings, fake_proxy):
    settings.USAGE_STREAM = True
    settings.USAGE_STREAM_COMMIT_SECONDS = 1
    return settings


def subscriber_to(server: FakeResp):
    return lambda: UsageSubscriber(host="127.0.0.1", port=server.port,
                                   management_key="k", timeout=3)


def counted() -> int:
    return UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0


def run_until(stream: UsageStream, condition) -> None:
    """Runs the stream here; a watcher sets its stop once `condition()` holds (bounded)."""
    def watch() -> None:
        deadline = time.monotonic() + WAIT
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stream.run()
    watcher.join(timeout=WAIT)


def test_a_stop_commits_what_is_buffered_then_returns(stream_settings, people_keys,
                                                      resp_servers, monkeypatch):
    monkeypatch.setattr(stream_module, "QUIET", 3600)  # nothing commits on its own
    monkeypatch.setattr(stream_module, "BUSY_COMMIT_GAP", 3600)
    stream_settings.USAGE_STREAM_COMMIT_SECONDS = 3600
    values = [k.value for k in people_keys]

    def script(conn, server):
        server.handshake(conn)
        conn.sendall(b"".join(push(record(v, i)) for i, v in enumerate(values)))
        time.sleep(WAIT)

    server = resp_servers(script)
    with sync_lease() as held:
        stream = UsageStream(held=held, stop=threading.Event(), subscriber=subscriber_to(server))
        run_until(stream, lambda: len(stream._buffer) == 3)
    assert counted() == 3
    run = SyncRun.objects.get(mode="stream")
    assert run.ok and run.records_stored == 3


def test_a_dropped_subscription_is_made_again_and_the_queue_drained(
    stream_settings, people_keys, resp_servers, fake_proxy
):
    value = people_keys[0].value
    fake_proxy.add_usage(value)  # queued before anybody subscribed
    sent = threading.Event()

    def script(conn, server):
        server.handshake(conn)
        if server.connections == 1:
            conn.sendall(push(record(value, 1)))
            conn.close()  # dropped, as the proxy drops a subscriber 256 messages behind
            fake_proxy.add_usage(value)  # queued while nobody listened
            return
        conn.sendall(push(record(value, 2)))
        sent.set()
        time.sleep(WAIT)

    server = resp_servers(script)
    with sync_lease() as held:
        stream = UsageStream(held=held, stop=threading.Event(), subscriber=subscriber_to(server))
        run_until(stream, lambda: sent.is_set() and stream._period.commits >= 2
                  and not stream._buffer)
    assert stream.subscriptions == 2
    assert counted() == 4  # two from the stream, two drained from the queue
    assert SyncRun.objects.filter(mode="queue").aggregate(n=Sum("records_read"))["n"] == 2


def test_a_lost_lease_commits_nothing_more(stream_settings, people_keys, resp_servers,
                                           monkeypatch):
    monkeypatch.setattr(stream_module, "QUIET", 3600)
    monkeypatch.setattr(stream_module, "BUSY_COMMIT_GAP", 3600)
    stream_settings.USAGE_STREAM_COMMIT_SECONDS = 3600
    value = people_keys[0].value

    def script(conn, server):
        server.handshake(conn)
        conn.sendall(push(record(value, 1)))
        time.sleep(WAIT)

    server = resp_servers(script)
    warnings: list[str] = []
    with sync_lease() as held:
        stream = UsageStream(held=held, stop=threading.Event(), warn=warnings.append,
                             subscriber=subscriber_to(server))

        def lose_when_buffered() -> bool:
            if stream._buffer:
                held.lost.set()  # another holder took over: it gets the same records
                return True
            return False

        run_until(stream, lose_when_buffered)
    assert counted() == 0
    assert any("took over the lease" in w for w in warnings)


def test_a_refused_auth_falls_back_to_polling_and_is_not_tried_again(
    stream_settings, people_keys, resp_servers, fake_proxy, monkeypatch
):
    def script(conn, server):
        server.read_command(conn)
        conn.sendall(b"-ERR invalid management key\r\n")
        time.sleep(1)

    server = resp_servers(script)
    monkeypatch.setattr(command, "usage_stream_follow", _follow_with(subscriber_to(server)))
    real_pass = command.usage_sync_pass
    passes = []

    def counting_pass(**kwargs):
        passes.append(1)
        fake_proxy.add_usage(people_keys[0].value)
        report = real_pass(**kwargs)
        if len(passes) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return report

    monkeypatch.setattr(command, "usage_sync_pass", counting_pass)
    out, err = StringIO(), StringIO()
    call_command("sync_usage", "--follow", "--interval", "0.01", stdout=out, stderr=err)

    assert server.connections == 1  # one AUTH: three polls did not try it again
    assert "refused the management key" in err.getvalue()
    assert "Polling every" in err.getvalue()
    assert counted() == 3
    assert out.getvalue().rstrip().endswith("Stopped.")


def _follow_with(subscriber):
    def follow(*, held, stop, report=None, warn=None, tick=None):
        UsageStream(held=held, stop=stop, report=report, warn=warn, subscriber=subscriber,
                    tick=tick).run()
    return follow


def test_a_handshake_cut_after_a_subscription_is_a_fault_not_a_proxy_without_stream(
    stream_settings, people_keys, resp_servers
):
    value = people_keys[0].value
    sent = threading.Event()

    def script(conn, server):
        if server.connections == 2:
            conn.recv(4096)
            conn.close()  # hung up on AUTH: at first sight, "no RESP here"
            return
        server.handshake(conn)
        if server.connections == 1:
            conn.close()
            return
        conn.sendall(push(record(value, 1)))
        sent.set()
        time.sleep(WAIT)

    server = resp_servers(script)
    with sync_lease() as held:
        stream = UsageStream(held=held, stop=threading.Event(), subscriber=subscriber_to(server))
        run_until(stream, lambda: sent.is_set() and stream._period.commits >= 1
                  and not stream._buffer)  # StreamUnavailable would end run() at once
    assert server.connections == 3 and stream.subscriptions == 2
    assert counted() == 1
