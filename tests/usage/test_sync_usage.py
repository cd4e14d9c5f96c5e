"""sync_usage against the fake proxy (a real HTTP server on 127.0.0.1), both generations."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from django.core import mail
from django.core.management import CommandError
from django.db.models import Sum

from accounts.models import User
from keyportal.locks import lease_acquire
from pool.models import ApiKey
from pool.services import pool_keys_create
from tests.usage.conftest import sync, table
from usage import services
from usage.models import (
    QuarantinedRecord, SnapshotCursor, SyncRun, UnissuedKeyUsage, UsageBatch, UsageSnapshot,
)

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 22, 3, 10, tzinfo=timezone.utc).timestamp()
FOREIGN = "operator-own-key-1"


def serve(proxy, held, n: int, *, start: float = T0, **usage) -> list[dict]:
    """`n` requests on a key, 1 ms apart (distinct nanosecond timestamps, as the proxy has)."""
    return [proxy.add_usage(held.value, timestamp=start + i / 1000, **usage) for i in range(n)]


def totals() -> dict:
    return UsageSnapshot.objects.aggregate(
        requests=Sum("requests"), failures=Sum("failures"), tokens=Sum("total_tokens")
    )


@pytest.fixture(params=["queue", "snapshot"])
def proxy(request, settings):
    """Each test below runs against both generations."""
    return request.getfixturevalue("fake_proxy" if request.param == "queue" else "snapshot_proxy")


def test_usage_is_filed_under_key_model_and_hour(proxy, people_keys):
    ann1, ann2, bob = people_keys
    serve(proxy, ann1, 3)
    serve(proxy, ann1, 2, start=T0 + 3600, model="claude-mock-upstream", input_tokens=13,
          output_tokens=5)
    serve(proxy, bob, 1, failed=True, input_tokens=0, output_tokens=0)

    out = sync()

    rows = {(r.api_key_id, r.model, r.hour.hour): r for r in UsageSnapshot.objects.all()}
    assert set(rows) == {
        (ann1.key.pk, "mock-gpt", 3), (ann1.key.pk, "claude-mock-upstream", 4),
        (bob.key.pk, "mock-gpt", 3),
    }
    first = rows[(ann1.key.pk, "mock-gpt", 3)]
    assert (first.requests, first.input_tokens, first.output_tokens, first.total_tokens) == (
        3, 33, 21, 54)
    assert rows[(bob.key.pk, "mock-gpt", 3)].failures == 1
    assert f"read 6, stored 6, foreign 0" in out and "people touched 2" in out
    ann1.key.refresh_from_db()
    latest = datetime.fromtimestamp(T0 + 3600 + 0.001, tz=timezone.utc)
    assert abs(ann1.key.last_used_at - latest) < timedelta(microseconds=2)
    run = SyncRun.objects.get()
    assert run.ok and run.records_read == 6 and run.records_stored == 6 and run.people == 2


def test_rerun_changes_nothing(proxy, people_keys):
    serve(proxy, people_keys[0], 4)
    sync()
    before = table()

    out = sync()

    assert table() == before
    assert "read 0, stored 0" in out


def test_new_usage_after_a_sync_is_added_once(proxy, people_keys):
    ann1 = people_keys[0]
    serve(proxy, ann1, 2)
    sync()
    serve(proxy, ann1, 3, start=T0 + 10)
    sync()
    sync()
    assert totals()["requests"] == 5


def test_proxy_restart_between_runs_neither_double_counts_nor_loses(proxy, people_keys):
    ann1, _ann2, bob = people_keys
    serve(proxy, ann1, 3)
    sync()
    proxy.restart()  # counters back to zero
    # More requests after the restart than before it: a count alone cannot tell.
    serve(proxy, ann1, 5, start=T0 + 60)
    serve(proxy, bob, 1, start=T0 + 61)

    sync()
    sync()

    assert totals()["requests"] == 3 + 5 + 1
    assert UsageSnapshot.objects.get(api_key=ann1.key).requests == 8


def test_snapshot_restart_with_fewer_details_than_before(snapshot_proxy, people_keys):
    ann1 = people_keys[0]
    serve(snapshot_proxy, ann1, 4)
    sync()
    snapshot_proxy.restart()
    serve(snapshot_proxy, ann1, 1, start=T0 + 100)
    sync()
    assert totals()["requests"] == 5


def test_foreign_keys_are_counted_not_stored_and_no_plaintext_is_kept(proxy, people_keys, capsys):
    ann1 = people_keys[0]
    serve(proxy, ann1, 2)
    proxy.add_usage(FOREIGN, timestamp=T0)
    proxy.add_usage(FOREIGN, timestamp=T0 + 0.5)

    out = sync()

    assert "read 4, stored 2, foreign 2" in out
    assert totals()["requests"] == 2
    assert SyncRun.objects.get().records_foreign == 2
    stored_text = json.dumps(
        [list(UsageBatch.objects.values_list("rows", flat=True)),
         list(SnapshotCursor.objects.values_list("key_hash", "model")),
         list(SyncRun.objects.values_list("message", flat=True))]
    )
    for plaintext in (ann1.value, FOREIGN):
        assert plaintext not in stored_text and plaintext not in out
        assert plaintext not in capsys.readouterr().err


def test_second_run_does_not_report_old_foreign_usage_again(snapshot_proxy, people_keys):
    snapshot_proxy.add_usage(FOREIGN, timestamp=T0)
    assert "foreign 1" in sync()
    assert "foreign 0" in sync()


def test_usage_on_unissued_pool_key_is_flagged_to_staff_once(proxy, people_keys):
    User.objects.create_user("staff@example.com", password="x-long-pass-1", is_staff=True)
    pool_key = pool_keys_create(count=1)[0]
    proxy.add_usage(pool_key.value, timestamp=T0)

    out = sync()

    assert "on unissued keys 1" in out and "staff are told by email" in out
    assert UnissuedKeyUsage.objects.filter(api_key=pool_key).exists()
    assert UsageSnapshot.objects.get(api_key=pool_key).requests == 1
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["staff@example.com"]
    assert pool_key.masked in mail.outbox[0].body and pool_key.value not in mail.outbox[0].body

    proxy.add_usage(pool_key.value, timestamp=T0 + 1)
    sync()
    assert len(mail.outbox) == 1  # once per key
    assert UsageSnapshot.objects.get(api_key=pool_key).requests == 2


def test_statistics_off_is_said_plainly(proxy, people_keys):
    proxy.statistics_enabled = False
    serve(proxy, people_keys[0], 2)  # not recorded: statistics are off

    with pytest.raises(CommandError) as error:
        sync()

    message = str(error.value)
    assert "statistics are off" in message
    assert "usage-statistics-enabled" in message and '{"value": true}' in message
    assert not UsageSnapshot.objects.exists()
    assert not SyncRun.objects.get().ok


def test_wrong_management_key_stops_after_one_request(proxy, people_keys, settings):
    serve(proxy, people_keys[0], 2)
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"

    with pytest.raises(CommandError, match="CLIPROXY_MANAGEMENT_KEY"):
        sync()
    with pytest.raises(CommandError):
        sync()  # the refusal is remembered: nothing is sent

    assert len(proxy.management_requests) == 1
    assert not UsageSnapshot.objects.exists()
    assert [r.ok for r in SyncRun.objects.all()] == [False, False]


def test_unreachable_proxy_fails_naming_the_url(people_keys, settings):
    settings.CLIPROXY_URL = "http://127.0.0.1:9"  # discard port: nothing listens
    settings.CLIPROXY_MANAGEMENT_KEY = "k"
    with pytest.raises(CommandError, match="127.0.0.1:9"):
        sync()
    assert not UsageSnapshot.objects.exists()


def test_timeout_writes_nothing_and_loses_nothing(fake_proxy, people_keys, settings):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.CLIPROXY_TIMEOUT = 0.2
    serve(fake_proxy, people_keys[0], 3)
    fake_proxy.inject("/usage-queue", delay=1.0, body=b"[]")

    with pytest.raises(CommandError, match="did not answer"):
        sync()
    assert not UsageSnapshot.objects.exists() and not UsageBatch.objects.exists()

    sync()
    assert totals()["requests"] == 3


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"records": []}', b"[1, 2"])
def test_garbage_queue_answer_is_set_aside_and_blocks_nothing(
    fake_proxy, people_keys, settings, body
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    fake_proxy.inject("/usage-queue", body=body)

    with pytest.raises(CommandError, match="usage queue answer"):
        sync()

    assert not UsageSnapshot.objects.exists()
    batch = UsageBatch.objects.get()
    assert batch.applied_at is not None and batch.raw is None and batch.quarantined == 1
    aside = QuarantinedRecord.objects.get()
    assert "usage queue answer" in aside.reason and aside.record == ""  # may hold keys: not kept
    serve(fake_proxy, people_keys[0], 2)
    sync()  # the next answer is sound: counted, nothing pending
    assert totals()["requests"] == 2


def test_malformed_queue_records_are_quarantined_and_the_rest_counted(
    fake_proxy, people_keys, settings
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    good = serve(fake_proxy, people_keys[0], 1)[0]
    fake_proxy.queue.clear()
    bad = dict(good, timestamp="yesterday")
    fake_proxy.inject("/usage-queue", body=[good, bad, "nonsense"])

    out = sync()

    assert "read 3, stored 1" in out and "quarantined 2" in out
    assert totals()["requests"] == 1
    reasons = sorted(QuarantinedRecord.objects.values_list("reason", flat=True))
    assert reasons == ["a usage record is not an object", "timestamp is not RFC 3339"]
    run = SyncRun.objects.get()
    assert run.ok and run.records_quarantined == 2
    # The record is kept for staff, its key masked.
    kept = QuarantinedRecord.objects.get(reason__startswith="timestamp").record
    assert people_keys[0].value not in kept and people_keys[0].value[-4:] in kept


def test_a_malformed_snapshot_detail_is_quarantined_once(snapshot_proxy, people_keys):
    serve(snapshot_proxy, people_keys[0], 2)
    snapshot = snapshot_proxy.snapshot()
    snapshot["usage"]["apis"]["k"] = {"models": {"m": {"details": [{"timestamp": 5}]}}}
    snapshot_proxy.snapshot = lambda: snapshot  # what GET /usage answers from now on

    out = sync()
    sync()  # the same snapshot again: the cursor moved past the bad detail as well

    assert "quarantined 1" in out
    assert totals()["requests"] == 2
    assert list(QuarantinedRecord.objects.values_list("source", "reason")) == [
        ("snapshot", "timestamp is not text")
    ]


@pytest.mark.parametrize("body", [b"{not json", b'{"usage": []}'])
def test_garbage_snapshot_writes_nothing(snapshot_proxy, people_keys, body):
    serve(snapshot_proxy, people_keys[0], 2)
    snapshot_proxy.inject("/usage", body=body, method="GET")

    with pytest.raises(CommandError):
        sync()
    assert not UsageSnapshot.objects.exists() and not SnapshotCursor.objects.exists()

    sync()  # the next answer is sound: everything is there
    assert totals()["requests"] == 2


def test_crash_right_after_a_queue_pop_loses_nothing_and_counts_nothing_twice(
    fake_proxy, people_keys, monkeypatch
):
    ann1, _ann2, bob = people_keys
    serve(fake_proxy, ann1, 3)
    serve(fake_proxy, bob, 2, start=T0 + 5)

    def crash(*args, **kwargs):
        raise RuntimeError("killed between pop and commit")

    with monkeypatch.context() as patched:
        patched.setattr(services, "_ingest_rows", crash)
        with pytest.raises(CommandError, match="saved but could not be counted"):
            sync()

    assert not fake_proxy.queue  # popped: the proxy no longer has it
    pending = UsageBatch.objects.get()
    assert pending.applied_at is None and pending.raw is not None and pending.size > 0
    assert people_keys[0].value.encode() not in bytes(pending.raw)  # sealed
    assert "RuntimeError" in pending.error
    assert not UsageSnapshot.objects.exists()

    out = sync()
    sync()

    assert "read 5, stored 5" in out
    assert totals()["requests"] == 5
    counted = UsageBatch.objects.get()
    assert counted.applied_at is not None and counted.raw is None and counted.record_count == 5


def test_pending_batch_is_counted_even_when_the_proxy_is_down_next_time(
    fake_proxy, people_keys, monkeypatch, settings
):
    serve(fake_proxy, people_keys[0], 3)
    with monkeypatch.context() as patched:
        patched.setattr(services, "_ingest_rows", lambda *a, **k: 1 / 0)
        with pytest.raises(CommandError):
            sync()
    settings.CLIPROXY_URL = "http://127.0.0.1:9"

    with pytest.raises(CommandError, match="cannot be reached"):
        sync()

    assert totals()["requests"] == 3
    assert SyncRun.objects.order_by("-id").first().records_stored == 3


def test_unissued_usage_is_told_once_staff_exist(proxy, people_keys):
    pool_key = pool_keys_create(count=1)[0]
    proxy.add_usage(pool_key.value, timestamp=T0)
    sync()
    assert not mail.outbox  # nobody to tell yet
    User.objects.create_user("staff@example.com", password="x-long-pass-1", is_staff=True)
    sync()
    sync()
    assert len(mail.outbox) == 1 and pool_key.masked in mail.outbox[0].body


def test_counted_batches_are_dropped_after_the_keep_period(fake_proxy, people_keys):
    serve(fake_proxy, people_keys[0], 2)
    sync()
    old = UsageBatch.objects.get()
    UsageBatch.objects.filter(pk=old.pk).update(applied_at=old.applied_at - timedelta(days=8))
    serve(fake_proxy, people_keys[0], 1, start=T0 + 10)

    sync()

    assert list(UsageBatch.objects.values_list("record_count", flat=True)) == [1]
    assert totals()["requests"] == 3  # the counts stay


def test_two_syncs_never_overlap(proxy, people_keys):
    serve(proxy, people_keys[0], 2)
    # Another process holds the lease.
    assert lease_acquire(name=services.SYNC_LEASE, ttl=timedelta(minutes=5))
    sent = len(proxy.management_requests)

    with pytest.raises(CommandError, match="Another usage sync is running"):
        sync()

    assert len(proxy.management_requests) == sent
    assert not UsageSnapshot.objects.exists() and not SyncRun.objects.exists()
    assert not UsageBatch.objects.exists()


def test_an_expired_lease_of_a_killed_sync_does_not_block(proxy, people_keys):
    serve(proxy, people_keys[0], 2)
    assert lease_acquire(name=services.SYNC_LEASE, ttl=timedelta(seconds=-1))
    sync()
    assert totals()["requests"] == 2


def test_last_used_only_moves_forward(proxy, people_keys):
    ann1 = people_keys[0]
    later = datetime.fromtimestamp(T0 + 7200, tz=timezone.utc)
    ApiKey.objects.filter(pk=ann1.key.pk).update(last_used_at=later)
    serve(proxy, ann1, 1)
    sync()
    ann1.key.refresh_from_db()
    assert ann1.key.last_used_at == later


def test_queue_drains_in_batches(fake_proxy, people_keys, settings):
    settings.USAGE_QUEUE_BATCH = 4
    serve(fake_proxy, people_keys[0], 10)
    assert "read 10, stored 10" in sync()
    assert list(UsageBatch.objects.values_list("record_count", flat=True)) == [4, 4, 2]
    assert fake_proxy.requests_to("/usage-queue") == 1 + 3  # the mode probe, then 3 pops


def test_forced_mode_skips_the_probe(snapshot_proxy, people_keys, settings):
    settings.CLIPROXY_USAGE_MODE = "snapshot"
    serve(snapshot_proxy, people_keys[0], 1)
    assert sync().startswith("snapshot:")
    assert snapshot_proxy.requests_to("/usage-queue") == 0


def test_both_generations_end_in_the_same_tables(settings, people_keys):
    from tests.conftest import MANAGEMENT_KEY
    from tests.fakes.proxy import FakeProxy

    results = []
    for generation in ("queue", "snapshot"):
        UsageSnapshot.objects.all().delete()
        SnapshotCursor.objects.all().delete()
        proxy = FakeProxy(generation=generation, management_key=MANAGEMENT_KEY).start()
        try:
            settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = proxy.url, MANAGEMENT_KEY
            ann1, ann2, bob = people_keys
            serve(proxy, ann1, 3)
            serve(proxy, ann2, 2, start=T0 + 4000, model="claude-mock-upstream",
                  input_tokens=100, output_tokens=20, cached_tokens=40, reasoning_tokens=5)
            serve(proxy, bob, 1, failed=True, input_tokens=0, output_tokens=0)
            proxy.add_usage(FOREIGN, timestamp=T0)
            assert "foreign 1" in sync()
        finally:
            proxy.stop()
        results.append(table())
    assert results[0] == results[1] and len(results[0]) == 3


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_upserts_lose_no_update(people_keys):
    """Three writers adding to the same hour row at once (the lease keeps syncs apart; the
    upsert must hold on its own anyway). PostgreSQL only: the SQLite test database is in
    memory, where concurrent connections fail with "table is locked" instead of waiting."""
    import threading

    from django.db import connection

    from pool.models import key_digest

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")

    key_hash = key_digest(people_keys[0].value)
    row = [key_hash, "mock-gpt", "2026-11-22T03", 0, 11, 7, 0, 0, 0, 18,
           "2026-11-22T03:10:00.000000000Z", 0]
    errors = []

    def worker() -> None:
        try:
            for _i in range(20):
                services.usage_ingest(rows=[row, row])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    assert UsageSnapshot.objects.get().requests == 3 * 20 * 2
