"""Revokes (with their reconcile) and usage syncs at the same time on PostgreSQL: no deadlock,
no error, every revoked key off the proxy and every request counted."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections
from django.db.models import Sum

from pool.models import ApiKey
from pool.services import ProxyBusy, key_revoke, keys_reconcile_in_request, keys_reconcile_quietly
from tests.usage.conftest import issue
from usage.models import UsageSnapshot
from usage.services import SyncBusy, usage_sync

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

KEYS = 60
REVOKERS = 6
SECONDS = 8.0


def test_revokes_and_syncs_side_by_side_never_deadlock(fake_proxy, settings):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    settings.USAGE_QUEUE_BATCH = 200
    settings.PORTAL_REQUEST_PROXY_BUDGET = 5
    held = issue(KEYS, [f"p{i}@example.com" for i in range(KEYS)])
    fake_proxy.api_keys = [h.value for h in held] + ["operator-own-key"]
    fake_proxy.restart()
    ApiKey.objects.update(proxy_state=ApiKey.ProxyState.PUSHED)
    errors: list[BaseException] = []
    served = [0]
    stop = threading.Event()
    deadline = time.monotonic() + SECONDS

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - every error is the test's business
                errors.append(exc)
            finally:
                connections.close_all()
        return run

    def traffic():
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            for h in held:  # every key used between two pops: each batch touches them all
                fake_proxy.add_usage(h.value, timestamp=time.time() - 60 + i / 1e6)
                served[0] += 1
                i += 1
            time.sleep(0.01)

    def syncing():
        while time.monotonic() < deadline:
            try:
                usage_sync()
            except SyncBusy:
                time.sleep(0.01)

    to_revoke = list(reversed(held))  # revoked against the ids' order, many at once
    lock = threading.Lock()

    def revoking():
        while time.monotonic() < deadline:
            with lock:
                if not to_revoke:
                    return
                h = to_revoke.pop()
            key = ApiKey.objects.get(pk=h.key.pk)
            assert key_revoke(key=key, by=key.owner)
            try:
                keys_reconcile_in_request()
            except ProxyBusy:
                pass

    threads = [threading.Thread(target=guarded(traffic))]
    threads += [threading.Thread(target=guarded(syncing)) for _ in range(2)]
    threads += [threading.Thread(target=guarded(revoking)) for _ in range(REVOKERS)]
    for t in threads[1:]:
        t.start()
    threads[0].start()
    for t in threads[1:]:
        t.join(timeout=SECONDS + 60)
    stop.set()
    threads[0].join(timeout=10)

    assert not [t for t in threads if t.is_alive()], "a thread hangs"
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
    keys_reconcile_quietly()
    usage_sync()
    revoked = ApiKey.objects.filter(status=ApiKey.Status.REVOKED)
    assert revoked.count() > REVOKERS
    assert not set(fake_proxy.api_keys) & {h.value for h in held if h.key.pk in
                                           set(revoked.values_list("pk", flat=True))}
    assert UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] == served[0]
