"""The generic layer every relay that makes its own keys goes through (pool.upstreams.relays,
usage.relays): issue, reconcile and usage by cursor, checked with a recording driver so that
what is tested is the layer itself (the CRS and CCH drivers have their own tests against their
fakes and the real relays)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError

from accounts.models import User
from pool.models import ApiKey, Upstream
from pool.services import RelayUnavailable, key_assign, key_revoke, key_suspend
from pool.upstream import UpstreamUnreachable
from pool.upstreams import registry
from pool.upstreams.base import Driver, Health, NewKey, RelayLimits, RelayUsage, UsageRead
from pool.upstreams.relays import relays_reconcile
from usage.models import QuarantinedRecord, UsageSnapshot
from usage.relays import relay_rows

Status = ApiKey.Status


class Relay:
    """What the recording driver's relay holds: keys, their on/off and limits, requests."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.records: list[RelayUsage] = []
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.made = 0

    def check(self) -> None:
        if self.down:
            raise UpstreamUnreachable("The relay did not answer.")


RELAY = Relay()


class RecordingDriver(Driver):
    kind = "crs"

    def key_issue(self, *, person, label, limits, account) -> NewKey:
        RELAY.check()
        RELAY.made += 1
        remote = f"id-{RELAY.made}"
        RELAY.keys[remote] = {"active": True, "limits": limits, "deleted": False}
        RELAY.calls.append(("issue", remote))
        return NewKey(remote, f"cr_{RELAY.made:064x}")

    def key_revoke(self, *, key) -> None:
        RELAY.check()
        RELAY.keys[key.remote_id]["deleted"] = True
        RELAY.calls.append(("revoke", key.remote_id))

    def key_set_active(self, *, key, active) -> None:
        RELAY.check()
        RELAY.keys[key.remote_id]["active"] = active
        RELAY.calls.append(("active" if active else "inactive", key.remote_id))

    def key_limits_push(self, *, key, limits) -> None:
        RELAY.check()
        RELAY.keys[key.remote_id]["limits"] = limits
        RELAY.calls.append(("limits", key.remote_id))

    def usage_read(self, *, keys, cursor) -> UsageRead:
        RELAY.check()
        done = int(cursor.get("n", 0))
        return UsageRead(records=RELAY.records[done:], cursor={"n": len(RELAY.records)})

    def health(self) -> Health:
        return Health(not RELAY.down, "ok")


@pytest.fixture
def relay(settings, monkeypatch) -> Relay:
    global RELAY
    RELAY = Relay()
    settings.CRS_URL = "http://127.0.0.1:9"  # declared; never reached: the driver is recorded
    settings.CRS_ADMIN_USERNAME, settings.CRS_ADMIN_PASSWORD = "admin", "pw"
    monkeypatch.setattr(registry, "driver_for", lambda upstream: RecordingDriver(upstream))
    import pool.upstreams.relays as relays_module
    import usage.relays as usage_relays

    monkeypatch.setattr(relays_module, "driver_for", lambda upstream: RecordingDriver(upstream))
    monkeypatch.setattr(usage_relays, "driver_for", lambda upstream: RecordingDriver(upstream))
    return RELAY


@pytest.fixture
def person(db) -> User:
    return User.objects.create_user("ann@example.com")


def _request(key: ApiKey, n: int, *, uncached=1000, out=200, read=0, write=0) -> RelayUsage:
    return RelayUsage(key=key.remote_id, record_id=f"r{n}", model="claude-sonnet-4-5-20250929",
                      at=datetime(2026, 12, 2, 8, 30, tzinfo=timezone.utc) + timedelta(seconds=n),
                      uncached=uncached, output=out, cache_read=read, cache_write=write)


def test_with_only_crs_declared_a_key_is_made_at_the_relay_and_works_at_once(relay, person):
    issued = key_assign(user=person, label="laptop")

    key = issued.key
    assert key.upstream.kind == Upstream.Kind.CRS and key.upstream.from_environment
    assert key.status == Status.ACTIVE and key.remote_id == "id-1"
    assert issued.value.startswith("cr_") and key.masked == f"cr_{'0' * 3}…{issued.value[-4:]}"
    assert relay.keys["id-1"]["active"] is True
    assert not ApiKey.objects.filter(status=Status.POOL).exists()  # no pool, no CLIProxyAPI


def test_a_relay_that_does_not_answer_files_no_key(relay, person):
    relay.down = True
    with pytest.raises(RelayUnavailable):
        key_assign(user=person, label="laptop")
    assert not ApiKey.objects.exists()


def test_reconcile_pushes_what_changed_once(relay, person):
    key = key_assign(user=person, label="a").key
    relay.calls.clear()
    assert relays_reconcile()[0].changed is False  # just issued: nothing differs

    person.limit_cost_day = Decimal("0.01")
    person.save()
    report = relays_reconcile()[0]
    assert report.limits_pushed == 1 and relay.keys["id-1"]["limits"].cost_day == Decimal("0.01")
    key_suspend(key=key, reason=ApiKey.SuspendedFor.STAFF)
    relays_reconcile()
    assert relay.keys["id-1"]["active"] is False
    key.refresh_from_db()
    assert key.proxy_state == ApiKey.ProxyState.REMOVED
    before = list(relay.calls)
    assert relays_reconcile()[0].changed is False and relay.calls == before  # idempotent

    key_revoke(key=key, by=person)
    call_command("reconcile_keys", stdout=StringIO())
    assert relay.keys["id-1"]["deleted"] is True
    relay.calls.clear()
    relays_reconcile()
    assert relay.calls == []  # a revoked key removed there is left alone


def test_a_relay_away_keeps_the_change_for_the_next_run(relay, person):
    key = key_assign(user=person, label="a").key
    key_revoke(key=key, by=person)
    relay.down = True
    report = relays_reconcile()[0]
    assert report.errors and "did not answer" in report.errors[0]
    assert ApiKey.objects.get(id=key.id).proxy_state == ApiKey.ProxyState.REMOVAL_PENDING
    relay.down = False
    relays_reconcile()
    assert relay.keys["id-1"]["deleted"] is True


def test_sync_counts_relay_usage_once_with_its_cursor(relay, person):
    key = key_assign(user=person, label="a").key
    relay.records += [_request(key, 1), _request(key, 2, read=5000, write=300)]

    call_command("sync_usage", stdout=StringIO(), stderr=StringIO())
    call_command("sync_usage", stdout=StringIO(), stderr=StringIO())  # nothing new

    row = UsageSnapshot.objects.get(api_key=key)
    assert (row.requests, row.input_tokens, row.output_tokens) == (2, 2000, 400)
    assert (row.cached_tokens, row.cache_creation_tokens) == (5000, 300)
    assert row.total_tokens == 2000 + 400 + 5000 + 300
    # claude-sonnet-4-5: $3 input, $15 output, $0.30 cache read, $3.75 cache write per MTok
    bill = (Decimal(2000) * 3 + 400 * 15 + Decimal(5000) * Decimal("0.30")
            + Decimal(300) * Decimal("3.75")) / 1_000_000
    assert row.cost == bill
    assert Upstream.objects.get(kind="crs").usage_cursor == {"n": 2}


def test_a_database_that_refuses_the_count_keeps_the_cursor(relay, person, monkeypatch):
    key = key_assign(user=person, label="a").key
    relay.records.append(_request(key, 1))
    import usage.services as services

    real = services._ingest_rows

    def refuse(*args, **kwargs):
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(services, "_ingest_rows", refuse)
    monkeypatch.setattr(services, "DB_RETRY_SECONDS", 0, raising=False)
    with pytest.raises(Exception):
        call_command("sync_usage", stdout=StringIO(), stderr=StringIO())
    assert Upstream.objects.get(kind="crs").usage_cursor == {}
    assert not UsageSnapshot.objects.exists()

    monkeypatch.setattr(services, "_ingest_rows", real)
    call_command("sync_usage", stdout=StringIO(), stderr=StringIO())
    assert UsageSnapshot.objects.get(api_key=key).requests == 1


def test_records_that_cannot_be_counted_are_set_aside_and_the_rest_counted(relay, person):
    key = key_assign(user=person, label="a").key
    good = _request(key, 1)
    bad = [
        RelayUsage(key="id-unknown", record_id="x", model="m", at=good.at),
        RelayUsage(key=key.remote_id, record_id="y", model="bad\x00model", at=good.at),
        RelayUsage(key=key.remote_id, record_id="z", model="m", at=good.at, output=-1),
        RelayUsage(key=key.remote_id, record_id="w", model="m", at=good.at, uncached=2**41),
    ]
    rows, aside = relay_rows([good, *bad], {key.remote_id: key.key_hash})
    assert len(rows) == 1 and len(aside) == 4

    relay.records += [good, *bad]
    call_command("sync_usage", stdout=StringIO(), stderr=StringIO())
    assert UsageSnapshot.objects.get(api_key=key).requests == 1
    assert QuarantinedRecord.objects.filter(source="relay").count() == 4
    assert all(key.key_hash not in q.record for q in QuarantinedRecord.objects.all())


def test_a_relay_down_fails_the_sync_in_one_sentence_and_counts_later(relay, person):
    key = key_assign(user=person, label="a").key
    relay.records.append(_request(key, 1))
    relay.down = True
    err = StringIO()
    with pytest.raises(Exception) as failed:
        call_command("sync_usage", stdout=StringIO(), stderr=err)
    assert "did not answer" in str(failed.value)
    relay.down = False
    call_command("sync_usage", stdout=StringIO(), stderr=StringIO())
    assert UsageSnapshot.objects.get(api_key=key).requests == 1


def test_limits_pushed_to_a_relay_fold_the_person_into_the_key(relay, person):
    person.limit_cost_day = Decimal("5")
    person.save()
    key = key_assign(user=person, label="a").key
    assert relay.keys[key.remote_id]["limits"] == RelayLimits(
        cost_day=Decimal("5"), expires_at=key.expires_at)
    key.limit_cost_day = Decimal("1")
    key.save()
    relays_reconcile()
    assert relay.keys[key.remote_id]["limits"].cost_day == Decimal("1")  # the smaller one
