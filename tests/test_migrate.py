"""`manage.py migrate` alone leaves a working portal: the shared cache's table comes with the
migrations, so no page or command fails with "no such table" on a fresh install."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from tests.conftest import MANAGEMENT_KEY

CACHE_TABLE = "keyportal_cache"
# A POST to /login counts the attempt in the shared cache (the rate limits), so it fails
# without the cache table; the test client needs no server.
LOGIN = """
from django.test import Client
answer = Client().post("/login", {"email": "ann@example.com"})
print("login", answer.status_code)
"""


def manage(db_file: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db_file}",
        "CACHE_URL": "",  # the default: the database cache
        "DEBUG": "true",  # pages use the plain static files: no collectstatic in a test
        **extra_env,
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=env,
        capture_output=True, text=True, timeout=180,
    )


def tables(db_file: Path) -> set[str]:
    with sqlite3.connect(db_file) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_migrate_alone_leaves_a_working_portal(tmp_path, fake_proxy):
    db_file = tmp_path / "db.sqlite3"

    migrated = manage(db_file, "migrate", "--noinput")

    assert migrated.returncode == 0, migrated.stderr
    assert CACHE_TABLE in tables(db_file)

    page = manage(db_file, "shell", "-c", LOGIN)
    assert page.returncode == 0, page.stderr
    assert "login 200" in page.stdout
    with sqlite3.connect(db_file) as db:  # the rate-limit counters went to that table
        assert db.execute(f"SELECT COUNT(*) FROM {CACHE_TABLE}").fetchone()[0] > 0

    # A command that asks the proxy reads the refusal latch from the cache first.
    fake_proxy.api_keys = ["operator-own-key"]
    dry_run = manage(db_file, "reconcile_keys", "--dry-run",
                     CLIPROXY_URL=fake_proxy.url, CLIPROXY_MANAGEMENT_KEY=MANAGEMENT_KEY)
    assert dry_run.returncode == 0, dry_run.stderr
    assert "Dry run: nothing was changed." in dry_run.stdout
    assert fake_proxy.api_keys == ["operator-own-key"]


def test_an_install_that_made_the_cache_table_by_hand_still_migrates(tmp_path):
    db_file = tmp_path / "db.sqlite3"
    made = manage(db_file, "createcachetable")
    assert made.returncode == 0, made.stderr
    with sqlite3.connect(db_file) as db:
        db.execute(f"INSERT INTO {CACHE_TABLE} VALUES ('kept', 'x', '2999-01-01 00:00:00')")

    migrated = manage(db_file, "migrate", "--noinput")
    again = manage(db_file, "migrate", "--noinput")
    # Unapplying the step leaves the table: other database caches may share it.
    back = manage(db_file, "migrate", "keyportal", "0002", "--noinput")

    for run in (migrated, again, back):
        assert run.returncode == 0, run.stderr
    with sqlite3.connect(db_file) as db:
        assert db.execute(f"SELECT cache_key FROM {CACHE_TABLE}").fetchall() == [("kept",)]


def test_a_cache_that_is_not_in_the_database_gets_no_table(tmp_path):
    db_file = tmp_path / "db.sqlite3"
    migrated = manage(db_file, "migrate", "--noinput", CACHE_URL="locmemcache://")
    assert migrated.returncode == 0, migrated.stderr
    assert CACHE_TABLE not in tables(db_file)
