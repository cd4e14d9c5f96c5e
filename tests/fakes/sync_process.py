"""`manage.py sync_usage` as a real process, on a real SQLite file, against the fake proxy
(served from this process on 127.0.0.1): for the tests of stop signals, a locked database,
a full disk and the spool (tests/usage/test_stop_signals.py, tests/usage/test_spool.py).

Every wait is for a state, bounded by a deadline; nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.fakes.kill_trial import SETUP_SCRIPT
from tests.fakes.proxy import FakeProxy

ROOT = Path(__file__).resolve().parent.parent.parent
MANAGEMENT_KEY = "sync-process-management-key"
WAIT = 60.0  # generous: a busy CI machine

TOTALS_SCRIPT = """
import json
from django.db.models import Sum
from usage.models import QuarantinedRecord, SyncRun, UsageBatch, UsageSnapshot
print(json.dumps({
    "counted": UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0,
    "quarantined": QuarantinedRecord.objects.count(),
    "pending": UsageBatch.objects.filter(applied_at__isnull=True).count(),
    "runs": SyncRun.objects.count(),
    "failed_runs": SyncRun.objects.filter(ok=False).count(),
}))
"""


class SyncProcess:
    """A database file with `keys` issued keys, a fake proxy that knows them, and the
    environment to run manage.py against both."""

    def __init__(self, workdir: Path, *, keys: int = 6, batch: int = 100,
                 database: Path | None = None, database_url: str = "",
                 generation: str = "queue",
                 retry_seconds: float = 2.0, busy_timeout: float = 0.5) -> None:
        self.workdir = workdir
        self.database = database or workdir / "sync.sqlite3"
        self.spool = workdir / "spool"
        self.proxy = FakeProxy(management_key=MANAGEMENT_KEY, retention_seconds=3600,
                               generation=generation)
        self.proxy.start()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CLIPROXY", "USAGE"))},
            "DATABASE_URL": database_url or f"sqlite:///{self.database}",
            "SECRET_KEY": "sync-process-secret-key-sync-process-secret-key-sync",
            "DEBUG": "false",
            "CACHE_URL": "dbcache://keyportal_cache",
            "CLIPROXY_URL": self.proxy.url,
            "CLIPROXY_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "CLIPROXY_PUBLIC_URL": "https://relay.example.com",  # not loopback: no W008
            "CLIPROXY_TIMEOUT": "20",
            "CLIPROXY_USAGE_MODE": generation,
            "USAGE_QUEUE_BATCH": str(batch),
            # The fake proxy has no RESP port: --follow polls (the stream has its own tests).
            "USAGE_STREAM": "false",
            "USAGE_SPOOL_DIR": str(self.spool),
            "USAGE_DB_RETRY_SECONDS": str(retry_seconds),
            "SQLITE_BUSY_TIMEOUT": str(busy_timeout),
            "PORTAL_POOL_MIN": "0",
            "EMAIL_URL": "consolemail://",
            "LOG_LEVEL": "CRITICAL",
            "PYTHONUNBUFFERED": "1",
        }
        self.manage("migrate", "--noinput")
        out = self.manage("shell", "-c", SETUP_SCRIPT.replace("KEYS", str(keys)))
        self.values: list[str] = json.loads(out.splitlines()[-1])
        self.proxy.api_keys = list(self.values)
        self.served = 0

    def close(self) -> None:
        self.proxy.stop()

    def serve(self, n: int) -> None:
        """`n` requests served by the proxy (queued or in its snapshot)."""
        t0 = time.time() - 3600
        for i in range(n):
            self.proxy.add_usage(self.values[(self.served + i) % len(self.values)],
                                 timestamp=t0 + (self.served + i) / 1000,
                                 input_tokens=10 + i % 7, output_tokens=i % 5)
        self.served += n

    def manage(self, *args: str, check: bool = True) -> str:
        done = self.run(*args)
        if check and done.returncode != 0:
            raise RuntimeError(f"manage.py {args[0]} failed ({done.returncode}): "
                               f"{done.stderr[-2000:]}")
        return done.stdout

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                              timeout=timeout, capture_output=True, text=True)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def totals(self) -> dict[str, int]:
        return json.loads(self.manage("shell", "-c", TOTALS_SCRIPT).splitlines()[-1])

    def spooled(self) -> list[Path]:
        return sorted(self.spool.glob("[0-9]*.pop")) if self.spool.is_dir() else []


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = WAIT,
             process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: "
                                 f"{process.stderr.read()[-2000:] if process.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(0.01)


def finish(process: subprocess.Popen[str], timeout: float = WAIT) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def signal_on_pop(process_box: list[subprocess.Popen[str]], signum: int, *,
                  at_pop: int = 1) -> Callable[[str, str], None]:
    """An `on_management` hook: sends `signum` to the sync process while its `at_pop`-th
    pop is in flight (the proxy answers right after)."""
    seen = [0]

    def hook(method: str, path: str) -> None:
        if path == "/usage-queue" or path == "/usage":
            seen[0] += 1
            if seen[0] == at_pop and process_box:
                process_box[0].send_signal(signum)

    return hook


class Locker:
    """Another process holding SQLite's write lock (BEGIN EXCLUSIVE) until `release()`."""

    SCRIPT = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "c.execute('ROLLBACK')\n"
    )

    def __init__(self, database: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(database)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "locked":
            raise AssertionError("the locker could not lock the database")

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=WAIT)


def checkpoint(database: Path) -> None:
    """Folds SQLite's WAL back into the database and truncates it, so that the next writes
    need new space on the disk."""
    c = sqlite3.connect(str(database), timeout=30)
    try:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        c.close()


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
