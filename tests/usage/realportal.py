"""A portal in real processes against the real CLIProxyAPI: `manage.py` subprocesses on a
SQLite database file, keys pushed to the proxy by the portal's own commands (generate_keys),
usage read back straight from the file. Used by tests/usage/test_stream_real.py and
bench/kill_sync.py --stream. Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.fakes.kill_trial import manage_output
from tests.realproxy import MANAGEMENT_KEY

ROOT = Path(__file__).resolve().parent.parent.parent

ISSUE_SCRIPT = """
import json
from accounts.models import User
from pool.services import key_assign
out = []
for i in range(int("COUNT")):
    person, _ = User.objects.get_or_create(email=f"person{i % int('PEOPLE')}@example.com")
    issued = key_assign(user=person, label=f"k{i}")
    out.append([issued.key.pk, issued.value])
print(json.dumps(out))
"""


class Portal:
    """The portal's settings for one test, its database file and its processes."""

    def __init__(self, workdir: Path, *, proxy_url: str, template: Path | None = None,
                 **extra_env: str) -> None:
        self.workdir = workdir
        self.db_path = workdir / "portal.sqlite3"
        if template is not None:
            shutil.copyfile(template, self.db_path)
        self.env = {
            **{k: v for k, v in os.environ.items()
               if not k.startswith(("CLIPROXY", "USAGE", "PORTAL", "DATABASE"))},
            "DATABASE_URL": f"sqlite:///{self.db_path}",
            "SECRET_KEY": "real-proxy-trial-secret-key-real-proxy-trial-secret",
            "DEBUG": "false",
            "CACHE_URL": "dbcache://keyportal_cache",
            "CLIPROXY_URL": proxy_url,
            "CLIPROXY_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "CLIPROXY_PUBLIC_URL": "https://relay.example.com",  # not loopback: no W008
            "CLIPROXY_TIMEOUT": "5",
            "CLIPROXY_USAGE_MODE": "auto",
            "USAGE_STREAM": "true",
            "USAGE_STREAM_COMMIT_SECONDS": "1",
            "USAGE_FOLLOW_INTERVAL": "1",
            "PORTAL_POOL_MIN": "0",
            "PORTAL_KEY_PREFIX": "sk-kp-",
            "EMAIL_URL": "consolemail://",
            "LOG_LEVEL": "ERROR",
            "TIME_ZONE": "UTC",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.followers: list[subprocess.Popen[str]] = []

    # -- commands ------------------------------------------------------------------------

    def manage(self, *args: str, timeout: float = 300) -> str:
        return manage_output(self.env, *args, timeout=timeout)

    def migrate(self) -> None:
        self.manage("migrate", "--noinput")

    def issue_keys(self, count: int, *, people: int = 1) -> list[tuple[int, str]]:
        """`count` keys pushed to the proxy by `generate_keys`, handed to people; (pk, value)."""
        self.manage("generate_keys", "--count", str(count))
        script = ISSUE_SCRIPT.replace("COUNT", str(count)).replace("PEOPLE", str(people))
        return [tuple(pair) for pair in json.loads(self.manage("shell", "-c", script).splitlines()[-1])]

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", code)

    def start_follower(self, *args: str) -> subprocess.Popen[str]:
        log = open(self.workdir / f"follower-{len(self.followers)}.log", "w")
        follower = subprocess.Popen(
            [sys.executable, "manage.py", "sync_usage", "--follow", *args], cwd=ROOT,
            env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        log.close()
        self.followers.append(follower)
        return follower

    def follower_log(self, index: int = -1) -> str:
        index = index % max(len(self.followers), 1)
        path = self.workdir / f"follower-{index}.log"
        return path.read_text() if path.exists() else ""

    def stop_followers(self) -> None:
        for follower in self.followers:
            if follower.poll() is None:
                follower.send_signal(signal.SIGTERM)
        for follower in self.followers:
            try:
                follower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait(timeout=10)

    # -- reading the database file -------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # A reader of its own each time; the follower writes in between (WAL or not).
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30) as db:
            return db.execute(sql, params).fetchall()

    def counted(self, key_pk: int | None = None) -> int:
        if key_pk is None:
            rows = self.query("SELECT COALESCE(SUM(requests), 0) FROM usage_usagesnapshot")
        else:
            rows = self.query("SELECT COALESCE(SUM(requests), 0) FROM usage_usagesnapshot "
                              "WHERE api_key_id = ?", (key_pk,))
        return int(rows[0][0])

    def wait_until(self, predicate, *, timeout: float, what: str, poll: float = 0.02) -> float:
        """Polls `predicate` until true; returns the seconds it took. Raises AssertionError
        (with the follower's log) after `timeout`."""
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{what}: not within {timeout:g} s.\n"
                                     f"follower log:\n{self.follower_log()[-3000:]}")
            for follower in self.followers:
                if follower.poll() is not None and follower.returncode not in (0, -9):
                    raise AssertionError(f"the follower exited ({follower.returncode}):\n"
                                         f"{self.follower_log()[-3000:]}")
            time.sleep(poll)
        return time.monotonic() - started
