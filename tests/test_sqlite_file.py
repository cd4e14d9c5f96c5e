"""The SQLite database file is private to the portal's user: created 0600, and a warning from
`manage.py check` when group or others can read it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from keyportal.checks import sqlite_file_mode
from keyportal.sqlite_file import create_private, sqlite_files

ROOT = Path(__file__).resolve().parent.parent


def _manage(args: list[str], database: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": f"sqlite:///{database}",
                   "CLIPROXY_URL": "http://127.0.0.1:8317",
                   "CLIPROXY_MANAGEMENT_KEY": "management-secret"}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=environment, capture_output=True,
        text=True, timeout=300, preexec_fn=lambda: os.umask(0o022),
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_database_the_portal_creates_is_0600_with_its_wal_file(tmp_path):
    database = tmp_path / "portal.sqlite3"
    result = _manage(["migrate", "--noinput"], database)
    assert result.returncode == 0, result.stderr
    assert _mode(database) == 0o600
    wal = Path(f"{database}-wal")
    if wal.exists():
        assert _mode(wal) == 0o600
    check = _manage(["check"], database)
    assert "keyportal.W005" not in check.stdout + check.stderr


def test_check_warns_when_others_can_read_the_file(tmp_path):
    database = tmp_path / "portal.sqlite3"
    assert _manage(["migrate", "--noinput"], database).returncode == 0
    database.chmod(0o644)  # as an older portal, or a copy, may have left it
    for args in (["check"], ["check", "--deploy"]):
        result = _manage(args, database)
        output = result.stdout + result.stderr
        assert "keyportal.W005" in output and f"chmod 600 {database}" in output
    assert _mode(database) == 0o644  # an existing file's mode is left alone


def test_create_private_ignores_the_umask_and_leaves_existing_files(tmp_path):
    old = os.umask(0o000)
    try:
        path = tmp_path / "a.sqlite3"
        assert create_private(path) is True and _mode(path) == 0o600
        path.chmod(0o640)
        assert create_private(path) is False and _mode(path) == 0o640
        assert create_private(tmp_path / "missing-folder" / "b.sqlite3") is False
    finally:
        os.umask(old)


def test_memory_and_other_databases_are_not_files():
    databases = {
        "a": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        "b": {"ENGINE": "django.db.backends.sqlite3", "NAME": "file:memorydb?mode=memory"},
        "c": {"ENGINE": "django.db.backends.postgresql", "NAME": "keyportal"},
        "d": {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/kp/db.sqlite3"},
    }
    assert list(sqlite_files(databases)) == [("d", Path("/srv/kp/db.sqlite3"))]


@pytest.mark.django_db
def test_the_check_is_quiet_for_the_test_database():
    assert sqlite_file_mode() == []
