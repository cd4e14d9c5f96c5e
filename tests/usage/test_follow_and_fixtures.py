"""--follow stops cleanly on a signal; the real captured answers of both generations."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from django.db.models import Sum
from django.utils import timezone

from keyportal.models import Lease
from pool.models import ApiKey, key_digest
from tests.usage.conftest import sync, table
from usage.management.commands import sync_usage as command
from usage.models import SyncRun, UsageSnapshot
from usage.records import queue_rows
from usage.services import SYNC_LEASE, usage_batch_apply, usage_pop_store, usage_snapshot_ingest

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_follow_drains_until_a_signal_then_stops_cleanly(fake_proxy, people_keys, monkeypatch,
                                                         signum):
    real_pass = command.usage_sync_pass
    passes = []

    def counting_pass(**kwargs):
        passes.append(1)
        fake_proxy.add_usage(people_keys[0].value)  # traffic keeps coming between passes
        report = real_pass(**kwargs)
        if len(passes) == 3:
            os.kill(os.getpid(), signum)  # what systemd or Ctrl-C sends
        return report

    monkeypatch.setattr(command, "usage_sync_pass", counting_pass)
    out = sync("--follow", "--interval", "0.01")

    assert len(passes) == 3
    assert out.rstrip().endswith("Stopped.")
    assert UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] == 3
    assert SyncRun.objects.count() == 3
    assert Lease.objects.get(name=SYNC_LEASE).holder == ""  # released for the next run
    assert signal.getsignal(signal.SIGTERM) is not None


def _client_keys() -> None:
    for value in ("client-key-1", "client-key-2"):
        # Revoked keys: the portal's, with no owner and no value to satisfy the pool rules.
        ApiKey.objects.create(
            key_hash=key_digest(value), prefix="", last4=value[-4:], status=ApiKey.Status.REVOKED
        )


def test_captured_answers_of_both_generations_fill_the_same_tables():
    """Both captures hold the same four requests (two keys, one failed upstream)."""
    _client_keys()
    body = (FIXTURES / "usage-queue-v7.2.140.json").read_bytes()
    rows, aside = queue_rows(body)
    assert aside == [] and len(rows) == 4
    batch_id = usage_pop_store(body=body)
    usage_batch_apply(batch_id=batch_id, now=timezone.now())  # opens the stored body
    from_queue = table()

    UsageSnapshot.objects.all().delete()
    snapshot = json.loads((FIXTURES / "usage-snapshot-v6.9.47.json").read_text())
    result = usage_snapshot_ingest(apis=snapshot["usage"]["apis"])

    assert result.read == 4 and result.stored == 4
    assert table() == from_queue
    assert sum(r[3] for r in from_queue) == snapshot["usage"]["total_requests"]
    assert sum(r[4] for r in from_queue) == snapshot["usage"]["failure_count"]
    assert sum(r[10] for r in from_queue) == snapshot["usage"]["total_tokens"]
