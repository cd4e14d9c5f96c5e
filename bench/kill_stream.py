"""kill -9 trial of `sync_usage --follow` on the live stream, against the real CLIProxyAPI
7.2.140 (run through `bench/kill_sync.py --stream`).

Client requests go through the real proxy at `--rate` per second from a thread, with 20 keys
the portal issued and pushed itself. The follower (subscribed to `usage`) is killed with
SIGKILL `--kills` times at a random moment within 3 s of its subscription, and started
again at once. Then traffic stops, a last follower counts what is left and stops on SIGTERM.
The ledgers: requests the proxy answered 200 (each is one record it reported), and requests
the portal counted. Loss per kill = (answered - counted) / kills: what a killed follower had
received but not committed (its buffer, and what sat in its socket). Records that arrive
while no follower runs wait in /usage-queue and are drained at the next subscription.

Then the request-to-count latency: `--latency-requests` requests, one at a time, each timed
from the proxy's answer to the moment the portal's database counts it (median, p95).
SQLite in a temporary folder. Loopback only.
"""

from __future__ import annotations

import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.realproxy import MockUpstream, RealProxy
from tests.usage.realportal import Portal

KEYS = 20
SUBSCRIBED = "Following the proxy's live usage stream."


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.01)


class Traffic(threading.Thread):
    def __init__(self, proxy: RealProxy, keys: list[tuple[int, str]], rate: float,
                 rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.proxy, self.keys, self.every, self.rng = proxy, keys, 1 / rate, rng
        self.answered = 0
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            _pk, value = self.keys[self.rng.randrange(len(self.keys))]
            if self.proxy.claude(value) == 200:
                self.answered += 1
            else:
                self.failed += 1
            next_at += self.every
            self.stop.wait(max(next_at - time.monotonic(), 0))


def main(*, kills: int, seed: int, rate: float, latency_requests: int) -> int:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="keyportal-kill-stream-") as tmp, \
            MockUpstream() as upstream, \
            RealProxy(version="7.2.140", upstream=upstream, workdir=Path(tmp)) as proxy:
        (Path(tmp) / "portal").mkdir()
        portal = Portal(Path(tmp) / "portal", proxy_url=proxy.url)
        portal.migrate()
        keys = portal.issue_keys(KEYS, people=5)
        for _pk, value in keys:
            proxy.wait_for_key(value)
        started = time.monotonic()
        traffic = Traffic(proxy, keys, rate, rng)
        traffic.start()
        kill_log = []
        for i in range(kills):
            follower = portal.start_follower()
            index = len(portal.followers) - 1
            _wait(lambda: SUBSCRIBED in portal.follower_log(index), 60, "subscription")
            alive = rng.uniform(0.2, 3.0)
            time.sleep(alive)
            before = (traffic.answered, portal.counted())
            follower.send_signal(signal.SIGKILL)
            follower.wait(timeout=30)
            kill_log.append((alive, before))
        portal.start_follower()  # the last one: drains the queue and follows
        index = len(portal.followers) - 1
        _wait(lambda: SUBSCRIBED in portal.follower_log(index), 60, "subscription")
        time.sleep(2)
        traffic.stop.set()
        traffic.join(timeout=60)
        answered = traffic.answered
        # Settled: the count stops moving (bounded), then the latency run.
        deadline = time.monotonic() + 60
        last, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_counted = portal.counted()
            if now_counted != last:
                last, still_since = now_counted, time.monotonic()
            elif time.monotonic() - still_since > 3 or now_counted >= answered:
                break
            time.sleep(0.1)
        counted = portal.counted()
        seconds = time.monotonic() - started

        latencies = []
        for i in range(latency_requests):
            pk, value = keys[i % len(keys)]
            before = portal.counted(pk)
            if proxy.claude(value) != 200:
                continue
            answered_at = time.monotonic()
            _wait(lambda: portal.counted(pk) > before, 60, "latency request counted")
            latencies.append(time.monotonic() - answered_at)
        portal.stop_followers()

    lost = answered - counted
    print(f"stream (real CLIProxyAPI 7.2.140, SQLite): {kills} kill -9 of sync_usage --follow "
          f"within 0.2-3 s of subscribing, seed {seed}, ~{rate:g} requests/s")
    print(f"requests answered 200 (records the proxy reported): {answered:,}; counted "
          f"{counted:,}; lost {lost:,} ({lost / max(kills, 1):.1f} per kill); "
          f"{traffic.failed} requests not answered 200; {seconds:.1f} s")
    if latencies:
        q = statistics.quantiles(latencies, n=20, method="inclusive")
        print(f"request-to-count latency over {len(latencies)} requests: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms")
    return 0 if lost <= 0 and counted == answered else 1
