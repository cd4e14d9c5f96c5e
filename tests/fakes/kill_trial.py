"""kill -9 trials of `sync_usage --follow` against the fake proxy: the fault as it really
happens, in real processes, on a real database file (or the PostgreSQL database given).

A trial fills the fake proxy's queue, starts `manage.py sync_usage --follow`, kills it with
SIGKILL at a random moment after it began popping, starts it again, and so on; then one clean
`sync_usage` run. It then compares three ledgers:
- what the proxy handed out (`FakeProxy.popped`, counted as the proxy removes records, so a
  pop whose answer never reached the portal counts too);
- what the portal stored (the record counts of its UsageBatch rows: every body that reached
  the database);
- what the portal counted (usage rows plus quarantined records).
`lost_after_store` (stored but not counted, or counted twice) must be 0. `lost_on_wire` is what
the proxy popped but the portal never stored: a kill inside the window between the proxy
answering and the body reaching the spool (the network read; of an answer cut by the kill,
the complete records that reached the spool file are recovered and counted).

Used by tests/usage/test_kill.py (small) and bench/kill_sync.py (the 60k-record trial).
Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.proxy import FakeProxy

ROOT = Path(__file__).resolve().parent.parent.parent


def manage_output(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """The output of `manage.py ARGS` run as its own process with `env`; RuntimeError with the
    end of its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, timeout=timeout,
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout
MANAGEMENT_KEY = "kill-trial-management-key"
STARTUP_TIMEOUT = 60.0


@dataclass
class TrialResult:
    served: int = 0
    popped: int = 0
    stored: int = 0
    counted: int = 0
    quarantined: int = 0
    kills: int = 0
    kills_while_popping: int = 0
    waits_for_lease: int = 0  # restarts that found the killed holder's lease still taken
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def lost_on_wire(self) -> int:
        return self.popped - self.stored

    @property
    def lost_after_store(self) -> int:
        return self.stored - self.counted

    def summary(self) -> str:
        return (
            f"served {self.served:,}, popped {self.popped:,}, stored {self.stored:,}, "
            f"counted {self.counted:,} (quarantined {self.quarantined:,}); "
            f"{self.kills} kills ({self.kills_while_popping} while popping), "
            f"{self.waits_for_lease} restarts waited for the lease; "
            f"lost after the body arrived: {self.lost_after_store:,}; "
            f"cut on the wire: {self.lost_on_wire:,}; {self.seconds:.1f} s"
        )


SETUP_SCRIPT = """
import json
from accounts.models import User
from pool.models import ApiKey, key_digest
n = int("KEYS")
values = []
for i in range(n):
    person = User.objects.create(email=f"trial{i}@example.com")
    value = f"sk-kp-trial-{i:06d}-" + "x" * 24
    ApiKey.objects.create(owner=person, status="active", proxy_state="pushed",
                          key_hash=key_digest(value), prefix="sk-kp-", last4=value[-4:])
    values.append(value)
print(json.dumps(values))
"""

TOTALS_SCRIPT = """
import json
from django.db.models import Sum
from usage.models import QuarantinedRecord, UsageBatch, UsageSnapshot
print(json.dumps({
    "counted": UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0,
    # Not the note filed for the rest of an answer cut by a kill (its complete records are
    # counted, what came after them is not a record).
    "quarantined": QuarantinedRecord.objects.exclude(batch__spool__endswith=":rest").count(),
    "stored": UsageBatch.objects.aggregate(n=Sum("record_count"))["n"] or 0,
    "pending": UsageBatch.objects.filter(applied_at__isnull=True).count(),
}))
"""


class Trial:
    def __init__(self, *, workdir: Path, database_url: str = "", seed: int = 1,
                 batch: int = 1000, interval: float = 0.2, kill_within: float = 0.6) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.proxy = FakeProxy(management_key=MANAGEMENT_KEY, retention_seconds=3600)
        self.batch = batch
        self.interval = interval
        self.kill_within = kill_within  # seconds after the first pop: the kill lands in there
        db = database_url or f"sqlite:///{workdir / 'trial.sqlite3'}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CLIPROXY", "USAGE"))},
            "DATABASE_URL": db,
            "SECRET_KEY": "kill-trial-secret-key-kill-trial-secret-key-kill",
            "DEBUG": "false",
            "CACHE_URL": "dbcache://keyportal_cache",
            "CLIPROXY_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "CLIPROXY_USAGE_MODE": "queue",
            "USAGE_QUEUE_BATCH": str(batch),
            "USAGE_STREAM": "false",  # the fake proxy has no RESP: the poll path
            "PORTAL_POOL_MIN": "0",
            "EMAIL_URL": "consolemail://",
            "LOG_LEVEL": "ERROR",
            "PYTHONUNBUFFERED": "1",
        }

    def manage(self, *args: str, timeout: float = 300) -> str:
        return manage_output(self.env, *args, timeout=timeout)

    def run(self, *, records: int, kills: int, keys: int = 30) -> TrialResult:
        started = time.monotonic()
        self.proxy.start()
        try:
            self.env["CLIPROXY_URL"] = self.proxy.url
            self.env["CLIPROXY_PUBLIC_URL"] = "https://relay.example.com"  # no W008
            return self._run(records=records, kills=kills, keys=keys, started=started)
        finally:
            self.proxy.stop()

    def _run(self, *, records: int, kills: int, keys: int, started: float) -> TrialResult:
        result = TrialResult(served=records)
        self.manage("migrate", "--noinput")
        # A database that bench/ingest.py migrated with a local-memory cache has no cache
        # table yet (migrate creates it for the cache configured at the time).
        self.manage("createcachetable")
        self.manage("flush", "--noinput")
        values = json.loads(self.manage("shell", "-c", SETUP_SCRIPT.replace("KEYS", str(keys))).splitlines()[-1])
        self.proxy.api_keys = list(values)
        t0 = time.time() - 3600
        for i in range(records):
            self.proxy.add_usage(values[i % len(values)], timestamp=t0 + i / 1000,
                                 input_tokens=10 + i % 7, output_tokens=i % 5)
        for _round in range(kills):
            if not self.proxy.queue:
                break
            killed_while_popping, waited = self._kill_once()
            result.kills += 1
            result.kills_while_popping += killed_while_popping
            result.waits_for_lease += waited
        out = self.manage("sync_usage")  # the clean run: pending pops, then the rest
        result.log.append(out.strip())
        totals = json.loads(self.manage("shell", "-c", TOTALS_SCRIPT).splitlines()[-1])
        if totals["pending"]:
            raise RuntimeError(f"{totals['pending']} batches still pending after a clean run")
        result.popped = self.proxy.popped
        result.stored = totals["stored"]
        result.counted = totals["counted"] + totals["quarantined"]
        result.quarantined = totals["quarantined"]
        result.seconds = time.monotonic() - started
        return result

    def _kill_once(self) -> tuple[bool, bool]:
        """Starts a follower and SIGKILLs it at a random moment after its first pop. Returns
        (was a pop answered in the last moment before the kill, did it wait for the lease)."""
        before = self.proxy.popped
        follower = subprocess.Popen(
            [sys.executable, "manage.py", "sync_usage", "--follow", "--interval",
             str(self.interval)],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while self.proxy.popped == before and self.proxy.queue:
                if time.monotonic() > deadline or follower.poll() is not None:
                    raise RuntimeError("the follower never popped: "
                                       f"{(follower.stderr.read() if follower.stderr else '')[-800:]}")
                time.sleep(0.005)
            time.sleep(self.rng.uniform(0, self.kill_within))
            popping = self.proxy.popped != before and bool(self.proxy.queue)
            follower.send_signal(signal.SIGKILL)
        finally:
            follower.wait(timeout=30)
        err = follower.stderr.read() if follower.stderr else ""
        return popping, "Another usage sync is running" in err
