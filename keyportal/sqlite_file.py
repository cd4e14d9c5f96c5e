"""The SQLite database file holds password hashes, sessions, key hashes and escrowed keys:
only the portal's own user may read it. The portal creates the file itself, mode 0600, before
SQLite would (SQLite creates it with the process's umask, usually 0644, and gives its -wal and
-shm files the database file's mode). An existing file keeps its mode; the system check
keyportal.W005 says when group or others can read it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SQLITE_ENGINE = "django.db.backends.sqlite3"


def sqlite_files(databases: Mapping[str, Mapping[str, Any]]) -> Iterable[tuple[str, Path]]:
    """(alias, path) of each configured SQLite database kept in a file."""
    for alias, config in databases.items():
        if config.get("ENGINE") != SQLITE_ENGINE:
            continue
        name = str(config.get("NAME") or "")
        if not name or name == ":memory:" or name.startswith("file:") or "mode=memory" in name:
            continue
        yield alias, Path(name)


def create_private(path: Path) -> bool:
    """Creates an empty `path` with mode 0600 if it does not exist yet (whatever the umask).
    True when it was created here; a missing folder is left for SQLite to report."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (FileExistsError, FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.fchmod(fd, 0o600)  # os.open's mode is masked by the umask; this is not
    finally:
        os.close(fd)
    return True


def create_private_sqlite_files(databases: Mapping[str, Mapping[str, Any]]) -> None:
    for _alias, path in sqlite_files(databases):
        create_private(path)


def readable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def exposed_files(path: Path) -> list[Path]:
    """The database file and its -wal and -shm files that group or others may use."""
    return [
        candidate
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        if readable_by_others(candidate)
    ]
