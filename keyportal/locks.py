"""`lease(name)`: one holder at a time, across processes, on any database the portal runs on."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from keyportal.models import Lease


class LeaseHeld(Exception):
    """Somebody else holds the lease."""


def _holder_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def lease_acquire(*, name: str, ttl: timedelta) -> str | None:
    """Take the lease; returns a holder token, or None when somebody else holds it."""
    holder = _holder_id()
    now = timezone.now()
    try:
        with transaction.atomic():
            Lease.objects.get_or_create(name=name)
    except IntegrityError:
        pass  # another process created the row first: fine, the UPDATE below decides
    taken = Lease.objects.filter(
        Q(holder="") | Q(expires_at__lt=now), name=name
    ).update(holder=holder, expires_at=now + ttl)
    return holder if taken else None


def lease_renew(*, name: str, holder: str, ttl: timedelta) -> bool:
    return bool(
        Lease.objects.filter(name=name, holder=holder).update(expires_at=timezone.now() + ttl)
    )


def lease_release(*, name: str, holder: str) -> None:
    Lease.objects.filter(name=name, holder=holder).update(holder="", expires_at=None)


@contextmanager
def lease(name: str, *, ttl: timedelta = timedelta(minutes=10), wait: float = 0) -> Iterator[str]:
    """Hold `name` for the block. Waits up to `wait` seconds for the holder to let go, then
    raises LeaseHeld."""
    deadline = time.monotonic() + wait
    while (holder := lease_acquire(name=name, ttl=ttl)) is None:
        if time.monotonic() >= deadline:
            raise LeaseHeld(name)
        time.sleep(0.1)
    try:
        yield holder
    finally:
        lease_release(name=name, holder=holder)
