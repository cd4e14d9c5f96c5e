"""Nothing popped from the proxy's queue is lost once its body has arrived, whichever step the
sync dies at; records that cannot be counted are quarantined and never block the rest.

Each step of a pop is interrupted by raising there (the real kill -9 trials are in
tests/usage/test_kill.py and bench/kill_sync.py)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from django.core.management import CommandError
from django.db import connection
from django.db.models import Sum

from pool.models import ApiKey
from tests.usage.conftest import sync
from usage import services
from usage.models import QuarantinedRecord, SyncRun, UsageBatch, UsageSnapshot

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 22, 3, 10, tzinfo=timezone.utc).timestamp()


class Killed(Exception):
    """Stands for the process dying at this line."""


def requests_counted() -> int:
    return UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0


def fill(proxy, people_keys, n: int) -> None:
    for i in range(n):
        proxy.add_usage(people_keys[i % 3].value, timestamp=T0 + i / 1000)


def _die_before(target, name):
    real = getattr(target, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second pop: one pop is safely counted before it
            raise Killed(name)
        return real(*args, **kwargs)

    return dying


def _die_after(target, name):
    real = getattr(target, name)
    calls = []

    def dying(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise Killed(name)
        return result

    return dying


# (where, how): every step from "the body has arrived" to "the next pop".
STEPS = [
    ("stored, not yet parsed", lambda: (services, "_queue_rows", _die_before)),
    ("counting: rows written, transaction open", lambda: (services, "_last_used_forward", _die_before)),
    ("counting: last write before commit", lambda: (services, "_flag_unissued", _die_after)),
    ("counted and committed, before the next pop", lambda: (services, "usage_batch_apply", _die_after)),
]


@pytest.mark.parametrize("step", [s for s, _ in STEPS])
def test_a_sync_killed_at_any_step_after_the_body_arrived_loses_nothing(
    fake_proxy, people_keys, settings, monkeypatch, step
):
    settings.USAGE_QUEUE_BATCH = 5
    fill(fake_proxy, people_keys, 23)
    target, name, how = dict(STEPS)[step]()
    with monkeypatch.context() as patched:
        patched.setattr(target, name, how(target, name))
        with pytest.raises((CommandError, Killed)):
            sync()
    assert len(fake_proxy.queue) == 23 - 10  # two pops left the proxy for good

    sync()  # the next run: pending pops first, then the rest of the queue

    assert requests_counted() == 23
    assert not UsageBatch.objects.filter(applied_at__isnull=True).exists()
    assert not UsageBatch.objects.filter(raw__isnull=False).exists()  # no key left at rest


def test_a_sync_killed_between_the_spool_and_the_database_loses_nothing(
    fake_proxy, people_keys, settings, monkeypatch
):
    """The body is in the spool (sealed, fsynced) before the database is written: dying
    right before the database write loses nothing, and the pop is counted once. The only
    window left is the network read itself (docs/sync.md documents it)."""
    settings.USAGE_QUEUE_BATCH = 5
    fill(fake_proxy, people_keys, 23)
    with monkeypatch.context() as patched:
        patched.setattr(services, "usage_pop_store", _die_before(services, "usage_pop_store"))
        with pytest.raises(Killed):
            sync()
    assert len(fake_proxy.queue) == 23 - 10

    sync()

    assert requests_counted() == 23
    assert not UsageBatch.objects.filter(applied_at__isnull=True).exists()


def _record(value: str, **changes) -> dict:
    base = {
        "timestamp": "2026-11-22T03:10:00.000000001Z", "api_key": value, "model": "mock-gpt",
        "failed": False, "tokens": {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18},
    }
    return {**base, **changes}


# name -> (record changes, the reason stored). Texts the database cannot store are written
# as JSON escapes, exactly as the proxy's answer would carry them.
POISON = {
    "2^62 input tokens": ({"tokens": {"input_tokens": 2**62, "total_tokens": 2**62}},
                          "a token count is negative or not below 2^40"),
    "negative tokens": ({"tokens": {"output_tokens": -1}},
                        "a token count is negative or not below 2^40"),
    "tokens as text": ({"tokens": {"input_tokens": "11"}}, "a token count is not an integer"),
    "model with a lone surrogate": ({"model": "LONE"},
                                    "model is not valid Unicode text (a lone surrogate)"),
    "model with a NUL": ({"model": "NUL"}, "model contains a NUL character"),
    "year 9999": ({"timestamp": "9999-12-31T23:59:59.999999999Z"},
                  "timestamp is outside the years 2000-2099"),
    "year 1": ({"timestamp": "0001-01-01T00:00:00Z"}, "timestamp is outside the years 2000-2099"),
    "an offset into year 10000": ({"timestamp": "9999-12-31T23:00:00-05:00"},
                                  "timestamp is outside the years 2000-2099"),
    "api_key with a lone surrogate": ({"api_key": "sk-kp-LONE"},
                                      "api_key is not valid Unicode text (a lone surrogate)"),
}


def _body(records: list[dict]) -> bytes:
    text = json.dumps(records)
    return text.replace("LONE", "\\ud800").replace("NUL", "\\u0000").encode()


@pytest.mark.parametrize("poison", list(POISON))
def test_a_poison_record_is_quarantined_and_its_batch_counted(
    fake_proxy, people_keys, settings, poison
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    changes, reason = POISON[poison]
    good = [_record(people_keys[i].value) for i in range(3)]
    bad = _record(people_keys[0].value, **changes)
    fake_proxy.inject("/usage-queue", body=_body([good[0], bad, good[1], good[2]]))

    out = sync()

    assert "read 4, stored 3" in out and "quarantined 1" in out
    assert requests_counted() == 3
    aside = QuarantinedRecord.objects.get()
    assert aside.reason == reason and aside.source == "queue"
    assert people_keys[0].value not in aside.record  # masked
    assert SyncRun.objects.get().records_quarantined == 1
    # Nothing is left to block the next run, which counts new usage as usual.
    fill(fake_proxy, people_keys, 3)
    assert "read 3, stored 3" in sync()
    assert requests_counted() == 6


def test_two_huge_records_no_longer_overflow_every_later_run(fake_proxy, people_keys, settings):
    settings.CLIPROXY_USAGE_MODE = "queue"
    huge = _record(people_keys[0].value, tokens={"input_tokens": 2**62, "total_tokens": 2**62})
    fake_proxy.inject("/usage-queue", body=_body([huge, huge]))
    sync()
    fill(fake_proxy, people_keys, 4)
    sync()
    assert requests_counted() == 4 and QuarantinedRecord.objects.count() == 2


@pytest.mark.postgres
def test_a_row_the_database_refuses_is_found_and_quarantined(fake_proxy, people_keys, settings):
    """A counter one request away from int64's end: the sum overflows in the database itself
    (not at the boundary). The batch is split until that row is found; the rest counts.
    (SQLite turns an overflowing sum into a float instead of refusing it.)"""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    settings.CLIPROXY_USAGE_MODE = "queue"
    ann = people_keys[0]
    fill(fake_proxy, people_keys, 3)
    sync()
    row = UsageSnapshot.objects.get(api_key=ann.key)
    UsageSnapshot.objects.filter(pk=row.pk).update(input_tokens=2**63 - 5)
    fill(fake_proxy, people_keys, 6)  # two more on each key, same hour

    out = sync()

    assert "quarantined 2" in out  # ann's two records of that hour
    assert requests_counted() == 3 + 4
    reasons = set(QuarantinedRecord.objects.values_list("reason", flat=True))
    assert len(reasons) == 1 and reasons.pop().startswith("refused by the database")


def test_batch_splitting_finds_the_refused_rows(fake_proxy, people_keys, settings, monkeypatch):
    """The same splitting on any database: the backend refuses every row of Bob's key."""
    from django.db import DataError

    bob_pk = people_keys[2].key.pk
    real_write = services._write

    def refusing(cursor, kind, params):
        if kind == "usage" and any(p[0] == bob_pk for p in params):
            raise DataError("value out of range")
        return real_write(cursor, kind, params)

    monkeypatch.setattr(services, "_write", refusing)
    fill(fake_proxy, people_keys, 9)  # three each

    out = sync()

    assert "read 9, stored 6" in out and "quarantined 3" in out
    assert requests_counted() == 6
    kept = QuarantinedRecord.objects.values_list("key_hash", flat=True)
    assert set(kept) == {people_keys[2].key.key_hash}


def test_a_body_sealed_with_another_secret_waits_for_it(fake_proxy, people_keys, settings,
                                                        monkeypatch):
    fill(fake_proxy, people_keys, 3)
    with monkeypatch.context() as patched:
        patched.setattr(services, "_queue_rows", lambda body, reader=None: 1 / 0)
        with pytest.raises(CommandError):
            sync()
    original = settings.SECRET_KEY
    settings.SECRET_KEY = "another-secret-key-another-secret-key-another"

    with pytest.raises(CommandError, match="sealed with another PORTAL_ESCROW_KEY"):
        sync()
    assert requests_counted() == 0 and UsageBatch.objects.get().raw is not None

    settings.SECRET_KEY = original
    sync()
    assert requests_counted() == 3


def test_a_batch_left_pending_by_the_previous_version_is_counted(fake_proxy, people_keys):
    """Before bodies were stored whole, a pending batch held rows with hashed keys."""
    key = people_keys[1].key
    row = [key.key_hash, "mock-gpt", "2026-11-22T03", 0, 11, 7, 0, 0, 0, 18,
           "2026-11-22T03:10:00.000000001Z"]
    UsageBatch.objects.create(record_count=2, rows=[row, row])

    sync()

    assert requests_counted() == 2
    assert UsageSnapshot.objects.get().api_key_id == key.pk


def test_snapshot_details_the_database_cannot_store_are_quarantined(snapshot_proxy, people_keys):
    good = snapshot_proxy.add_usage(people_keys[0].value, timestamp=T0)
    snapshot = snapshot_proxy.snapshot()
    apis = snapshot["usage"]["apis"]
    detail = apis[people_keys[0].value]["models"]["mock-gpt"]["details"][0]
    apis[people_keys[1].value] = {"models": {"m\ud800": {"details": [dict(detail)]}}}
    apis["sk-kp-\ud800"] = {"models": {"mock-gpt": {"details": [dict(detail)]}}}
    huge = dict(detail, tokens={"input_tokens": 2**62})
    apis[people_keys[2].value] = {"models": {"mock-gpt": {"details": [huge]}}}
    snapshot_proxy.snapshot = lambda: snapshot
    assert good

    out = sync()
    sync()  # the cursors moved past them: set aside once

    assert "quarantined 3" in out
    assert requests_counted() == 1
    assert QuarantinedRecord.objects.filter(source="snapshot").count() == 3


def test_last_used_and_counts_survive_a_revoked_key_between_pop_and_count(
    fake_proxy, people_keys, monkeypatch
):
    """A key revoked while its usage waits in a pending batch still gets that usage."""
    fill(fake_proxy, people_keys, 3)
    with monkeypatch.context() as patched:
        patched.setattr(services, "_last_used_forward", lambda used: 1 / 0)
        with pytest.raises(CommandError):
            sync()
    ApiKey.objects.filter(pk=people_keys[0].key.pk).update(status="revoked")
    sync()
    assert requests_counted() == 3


def test_a_sync_that_lost_its_lease_commits_no_snapshot(snapshot_proxy, people_keys):
    """A frozen sync whose lease was taken over meanwhile must not count the same tail as
    the sync that took over: its fence refuses inside the counting transaction."""
    from datetime import timedelta

    from keyportal.locks import Held, lease_acquire
    from usage.models import SnapshotCursor
    from usage.services import SYNC_LEASE, SyncFailed, usage_sync_pass

    fill(snapshot_proxy, people_keys, 3)
    assert lease_acquire(name=SYNC_LEASE)  # the sync that took over
    stale = Held(SYNC_LEASE, "this-host:1:1:frozen", timedelta(seconds=30))

    with pytest.raises(SyncFailed, match="took over the lease"):
        usage_sync_pass(held=stale)

    assert requests_counted() == 0 and not SnapshotCursor.objects.exists()
