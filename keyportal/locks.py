"""`lease(name)`: one holder at a time, across processes and machines, on any database the
portal runs on; and a lease dies with its holder.

A holder is `host:pid:start:nonce` (`start` is the process's start time, so a recycled pid is
not mistaken for the holder). While the block runs, a heartbeat thread renews the lease every
third of its time to live (30 s by default). So when the holder is killed (kill -9, OOM, a
lost machine):
- on the same machine, the next process sees the holder's process is gone and takes the lease
  at once;
- from another machine, the lease is free once its time to live passes without a heartbeat.
A holder that was frozen past its time to live (and so may have been replaced) notices at its
next heartbeat: `Held.lost` is set, and `Held.fence()` raises inside a transaction, so work
that must not run twice (the snapshot cursors) checks before it commits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import (
    DatabaseError, IntegrityError, connection, connections, transaction,
)
from django.db.models import Q
from django.utils import timezone

from keyportal.models import Lease

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(seconds=30)
HOST = socket.gethostname()[:40]


class LeaseHeld(Exception):
    """Somebody else holds the lease."""


class LeaseLost(Exception):
    """The lease passed to another holder while this one still worked (it was frozen, or cut
    off from the database, for longer than the time to live)."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _holder_id() -> str:
    pid = os.getpid()
    return f"{HOST}:{pid}:{_start_time(pid)}:{uuid.uuid4().hex[:12]}"


def holder_is_dead(holder: str) -> bool:
    """True only when `holder` ran on this machine and its process is gone (or its pid now
    belongs to another process). A holder on another machine is never judged here: its time
    to live decides."""
    try:
        host, pid_text, start, _nonce = holder.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != HOST:
        return False
    if pid == os.getpid():
        return False  # this process: alive by definition (another block of it holds it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    return bool(start) and _start_time(pid) not in ("", start)


def lease_acquire(*, name: str, ttl: timedelta = DEFAULT_TTL) -> str | None:
    """Take the lease; returns a holder token, or None when somebody alive holds it."""
    holder = _holder_id()
    now = timezone.now()
    try:
        with transaction.atomic():
            Lease.objects.get_or_create(name=name)
    except IntegrityError:
        pass  # another process created the row first: fine, the UPDATE below decides
    free = Q(holder="") | Q(expires_at__lt=now)
    if Lease.objects.filter(free, name=name).update(holder=holder, expires_at=now + ttl):
        return holder
    current = Lease.objects.filter(name=name).values_list("holder", flat=True).first()
    if current and holder_is_dead(current):
        # Conditional on the dead holder still being there: of two processes that both saw
        # it dead, one takes the lease.
        if Lease.objects.filter(name=name, holder=current).update(
            holder=holder, expires_at=now + ttl
        ):
            log.warning("Lease %s taken over from %s, whose process is gone.", name, current)
            return holder
    return None


def lease_renew(*, name: str, holder: str, ttl: timedelta = DEFAULT_TTL) -> bool:
    return bool(
        Lease.objects.filter(name=name, holder=holder).update(expires_at=timezone.now() + ttl)
    )


def lease_release(*, name: str, holder: str) -> None:
    Lease.objects.filter(name=name, holder=holder).update(holder="", expires_at=None)


def lease_holder(name: str) -> str:
    return Lease.objects.filter(name=name).values_list("holder", flat=True).first() or ""


class Held:
    """A lease this process holds, kept alive by a heartbeat thread."""

    def __init__(self, name: str, holder: str, ttl: timedelta) -> None:
        self.name, self.holder, self.ttl = name, holder, ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-{name}", daemon=True
        )

    def _beat(self) -> None:
        every = max(self.ttl.total_seconds() / 3, 0.05)
        try:
            while not self._stop.wait(every):
                try:
                    if connection.vendor == "postgresql":
                        # Never queue behind a row lock for long: the next beat tries again.
                        with connection.cursor() as cursor:
                            cursor.execute("SET lock_timeout = '2s'")
                    if not lease_renew(name=self.name, holder=self.holder, ttl=self.ttl):
                        self.lost.set()
                        log.error("Lease %s was taken over by another holder.", self.name)
                        return
                except DatabaseError as exc:  # the database is busy or away: try again
                    log.warning("Lease %s heartbeat failed (%s); retrying.", self.name, exc)
                    if connection.vendor != "sqlite":
                        connection.close()  # a dropped server connection: a new one next beat
        finally:
            connections.close_all()  # this thread's connections only

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def fence(self) -> None:
        """Inside a transaction: raises LeaseLost unless this holder still holds the lease,
        and keeps the lease row locked until the transaction ends, so that nobody takes it
        over before this transaction's work is committed."""
        still = Lease.objects.select_for_update().filter(name=self.name, holder=self.holder)
        if self.lost.is_set() or not still.exists():
            self.lost.set()
            raise LeaseLost(self.name)


@contextmanager
def lease(name: str, *, ttl: timedelta = DEFAULT_TTL, wait: float = 0) -> Iterator[Held]:
    """Hold `name` for the block (renewed by a heartbeat). Waits up to `wait` seconds for the
    holder to let go, then raises LeaseHeld."""
    deadline = time.monotonic() + wait
    while (holder := lease_acquire(name=name, ttl=ttl)) is None:
        if time.monotonic() >= deadline:
            raise LeaseHeld(name)
        time.sleep(0.1)
    held = Held(name, holder, ttl)
    held.start()
    try:
        yield held
    finally:
        held.stop()
        try:
            lease_release(name=name, holder=holder)
        except DatabaseError as exc:
            # The database is locked or away: the lease frees itself (this process is gone
            # in a moment, and the time to live runs out elsewhere). Raising here would hide
            # what the block itself reported.
            log.warning("Lease %s not released (%s); it expires on its own.", name, exc)
