"""Unissued pool keys are sealed at rest: a copy of the database (a backup, the SQLite file)
reveals no key that will be handed to someone later, and a changed secret loses no pool
capacity for good."""

from __future__ import annotations

import sqlite3
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from accounts.models import User
from pool.escrow import POOL_VALUE_MARK
from pool.models import ApiKey, key_digest
from pool.services import PoolEmpty, key_assign
from tests.test_migrate import manage

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState


def stored_values() -> dict[int, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, value FROM pool_apikey WHERE value IS NOT NULL")
        return dict(cursor.fetchall())


def reconcile() -> str:
    out = StringIO()
    call_command("reconcile_keys", stdout=out)
    return out.getvalue()


def test_generated_pool_keys_are_sealed_in_the_database(proxy_keys, fake_proxy):
    raw = stored_values()

    assert len(raw) == 3
    assert all(v.startswith(POOL_VALUE_MARK) for v in raw.values())
    for value in proxy_keys:  # the proxy got the keys themselves...
        assert value.startswith("sk-")
        assert not any(value in stored or value[-12:] in stored for stored in raw.values())
    # ...and the portal reads them back whole, matching their hashes.
    for key in ApiKey.objects.filter(status=Status.POOL):
        assert key.value in proxy_keys and key_digest(key.value) == key.key_hash


def test_a_key_handed_out_is_the_one_the_proxy_knows(proxy_keys, proxy_accepts):
    ann = User.objects.create_user("ann@example.com")

    issued = key_assign(user=ann, label="laptop")

    assert issued.value in proxy_keys and proxy_accepts(issued.value)
    assert issued.key.pk not in stored_values()  # issuing dropped the sealed copy


def test_each_seal_differs_so_equal_prefixes_leak_nothing(proxy_keys):
    raw = list(stored_values().values())
    assert len(set(raw)) == len(raw)
    assert len({v[len(POOL_VALUE_MARK):][:16] for v in raw}) == len(raw)  # random nonces


def test_a_changed_secret_retires_unreadable_keys_instead_of_handing_them_out(
    proxy_keys, settings, fake_proxy
):
    settings.PORTAL_ESCROW_KEY = Fernet.generate_key().decode()
    settings.PORTAL_POOL_MIN = settings.PORTAL_POOL_TARGET = 2
    ann = User.objects.create_user("ann@example.com")

    with pytest.raises(PoolEmpty):
        key_assign(user=ann, label="laptop")

    assert ApiKey.objects.filter(status=Status.POOL).count() == 0
    assert ApiKey.objects.filter(status=Status.REVOKED, owner__isnull=True).count() == 3
    assert not ann.api_keys.exists()
    report = reconcile()  # takes them off the proxy and refills the pool
    assert not set(proxy_keys) & set(fake_proxy.api_keys)
    assert ApiKey.objects.filter(status=Status.POOL, proxy_state=State.PUSHED).count() == 2
    assert "2 new pool keys created to refill the pool" in report
    assert key_assign(user=ann, label="laptop").value in fake_proxy.api_keys


def test_reconcile_reseals_keys_the_proxy_still_lists(proxy_keys, settings, fake_proxy):
    before = stored_values()
    settings.PORTAL_ESCROW_KEY = Fernet.generate_key().decode()

    reconcile()

    after = stored_values()
    assert set(after) == set(before) and all(after[i] != before[i] for i in before)
    assert sorted(k.value for k in ApiKey.objects.filter(status=Status.POOL)) == sorted(proxy_keys)
    assert fake_proxy.api_keys[1:] == proxy_keys  # nothing at the proxy changed


def test_reconcile_retires_unreadable_keys_the_proxy_lacks(proxy_keys, settings, fake_proxy):
    lost = proxy_keys[0]
    fake_proxy.api_keys = [k for k in fake_proxy.api_keys if k != lost]
    settings.PORTAL_ESCROW_KEY = Fernet.generate_key().decode()

    report = reconcile()

    gone = ApiKey.objects.get(key_hash=key_digest(lost))
    assert gone.status == Status.REVOKED and gone.value is None
    assert "cannot be read" in report
    assert lost not in fake_proxy.api_keys


def test_migration_seals_plaintext_values_and_unseals_going_back(tmp_path):
    db_file = tmp_path / "db.sqlite3"
    assert manage(db_file, "migrate", "pool", "0004", "--noinput").returncode == 0
    plain = "sk-kp-" + "a" * 43
    with sqlite3.connect(db_file) as db:
        db.execute(
            "INSERT INTO pool_apikey (value, key_hash, prefix, last4, label, status, proxy_state,"
            " created_at, suspended_for, limit_tokens_day, limit_tokens_month, limit_cost_day,"
            " limit_cost_month) VALUES (?, ?, 'sk-kp-', 'aaaa', '', 'pool', 'pushed',"
            " '2026-01-01', '', NULL, NULL, NULL, NULL)",
            (plain, key_digest(plain)),
        )

    forward = manage(db_file, "migrate", "pool", "0005", "--noinput")
    assert forward.returncode == 0, forward.stderr
    with sqlite3.connect(db_file) as db:
        (stored,) = db.execute("SELECT value FROM pool_apikey").fetchone()
    assert stored.startswith(POOL_VALUE_MARK) and plain not in stored
    assert plain.encode() not in db_file.read_bytes()

    back = manage(db_file, "migrate", "pool", "0004", "--noinput")
    assert back.returncode == 0, back.stderr
    with sqlite3.connect(db_file) as db:
        assert db.execute("SELECT value FROM pool_apikey").fetchone()[0] == plain
