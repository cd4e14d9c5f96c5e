"""Leases die with their holder: a killed holder's lease is taken at once on its machine, and
after its time to live from elsewhere; a live holder keeps it through its heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from keyportal.locks import (
    HOST, LeaseLost, _start_time, lease, lease_acquire, lease_holder, lease_release,
)
from keyportal.models import Lease

pytestmark = pytest.mark.django_db


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def _held_by(holder: str, *, for_seconds: float = 600) -> None:
    Lease.objects.update_or_create(
        name="job", defaults={"holder": holder,
                              "expires_at": timezone.now() + timedelta(seconds=for_seconds)},
    )


def test_a_lease_whose_holder_was_killed_is_taken_at_once(sleeper):
    holder = f"{HOST}:{sleeper.pid}:{_start_time(sleeper.pid)}:0123456789ab"
    _held_by(holder)
    assert lease_acquire(name="job") is None  # alive: its lease stands

    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait()

    taken = lease_acquire(name="job")
    assert taken is not None and lease_holder("job") == taken


def test_a_recycled_pid_is_not_mistaken_for_the_holder(sleeper):
    _held_by(f"{HOST}:{sleeper.pid}:1:0123456789ab")  # same pid, another process's start
    assert lease_acquire(name="job") is not None


def test_a_holder_on_another_machine_keeps_its_lease_until_its_time_runs_out():
    _held_by("other-host:4242:777:0123456789ab")
    assert lease_acquire(name="job") is None
    _held_by("other-host:4242:777:0123456789ab", for_seconds=-1)
    assert lease_acquire(name="job") is not None


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_keeps_a_live_holder_past_its_time_to_live():
    with lease("job", ttl=timedelta(seconds=0.3)) as held:
        time.sleep(1.0)  # three times the time to live
        assert lease_acquire(name="job") is None
        assert lease_holder("job") == held.holder and not held.lost.is_set()
    assert lease_holder("job") == ""


@pytest.mark.django_db(transaction=True)
def test_a_holder_that_lost_its_lease_finds_out_and_its_fence_refuses():
    with lease("job", ttl=timedelta(seconds=0.3)) as held:
        Lease.objects.filter(name="job").update(holder="other-host:1:1:newholder")
        assert held.lost.wait(timeout=3)  # the next heartbeat sees it
        with pytest.raises(LeaseLost), transaction.atomic():
            held.fence()
    assert lease_holder("job") == "other-host:1:1:newholder"  # not released by the loser


@pytest.mark.django_db(transaction=True)
def test_a_follower_waits_as_a_standby_and_takes_over(fake_proxy, monkeypatch):
    from tests.usage.conftest import sync
    from usage.management.commands import sync_usage as command
    from usage.services import SYNC_LEASE

    other = lease_acquire(name=SYNC_LEASE)  # a live sync elsewhere
    threading.Timer(0.3, lambda: lease_release(name=SYNC_LEASE, holder=other)).start()
    passes = []

    def one_pass(**kwargs):
        passes.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # stop after the first pass of our own
        return command.usage_sync_pass.__wrapped__(**kwargs)

    one_pass.__wrapped__ = command.usage_sync_pass  # type: ignore[attr-defined]
    monkeypatch.setattr(command, "usage_sync_pass", one_pass)
    out = sync("--follow", "--interval", "0.05")

    assert passes == [1] and "read 0" in out and out.rstrip().endswith("Stopped.")
