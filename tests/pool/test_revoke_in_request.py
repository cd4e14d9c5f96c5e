"""Revoking inside a request (POST /api/revoke-key, the admin's revoke/suspend/resume
actions) waits for the proxy at most PORTAL_REQUEST_PROXY_BUDGET seconds in all and never for
another process's write: past that the key stays "removal pending" and the next reconcile
finishes the job. The bound is a property of the code path (a stalled proxy must not tie up
a web worker), so the tests measure it against a proxy that stalls for longer."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command

from keyportal.locks import lease_acquire, lease_release
from pool.models import ApiKey
from pool.services import PROXY_WRITE_LEASE, key_assign, key_suspend, keys_reconcile_in_request

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState
# Seconds: the 2 s budget with room for a slow machine, against a 5 s stall and the 10 s timeout.
BOUND = 4.0
STALL = 5.0


@pytest.fixture
def issued(ann, proxy_keys):
    """Ann's key, at the fake proxy next to the operator's key and two pool keys."""
    return key_assign(user=ann, label="laptop")


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def reconcile() -> str:
    out = StringIO()
    call_command("reconcile_keys", stdout=out)
    return out.getvalue()


def revoke_by_api(client, key: ApiKey):
    return client.post("/api/revoke-key", json.dumps({"id": key.pk}),
                       content_type="application/json")


def listing(fake_proxy) -> dict:
    """The answer GET /api-keys gives now, for a fault that delays it."""
    return {"api-keys": list(fake_proxy.api_keys)}


def state(key: ApiKey) -> tuple[str, str]:
    key.refresh_from_db()
    return key.status, key.proxy_state


@pytest.fixture(autouse=True)
def _production_timeouts(settings) -> None:
    # The test environment shortens CLIPROXY_TIMEOUT; a stall must meet the real one.
    settings.CLIPROXY_TIMEOUT = 10
    settings.PORTAL_REQUEST_PROXY_BUDGET = 2


def test_api_revoke_answers_within_the_bound_while_the_proxy_stalls(
    client, ann, issued, fake_proxy
):
    fake_proxy.inject("/api-keys", delay=STALL, times=5)
    client.force_login(ann)

    response, elapsed = timed(lambda: revoke_by_api(client, issued.key))

    assert response.status_code == 200 and elapsed < BOUND
    assert response.json()["status"] == "revoked"
    assert response.json()["proxy_state"] == "removal_pending"
    assert state(issued.key) == (Status.REVOKED, State.REMOVAL_PENDING)
    assert issued.value in fake_proxy.api_keys  # nothing was written meanwhile
    # The next reconcile (cron, the normal timeout) finishes the job.
    fake_proxy.faults.clear()
    reconcile()
    assert state(issued.key) == (Status.REVOKED, State.REMOVED)
    assert issued.value not in fake_proxy.api_keys and "operator-own-key" in fake_proxy.api_keys


def test_api_revoke_does_not_wait_for_another_writer(client, ann, issued, fake_proxy):
    holder = lease_acquire(name=PROXY_WRITE_LEASE, ttl=timedelta(minutes=10))  # another process
    sent = len(fake_proxy.management_requests)
    client.force_login(ann)

    response, elapsed = timed(lambda: revoke_by_api(client, issued.key))

    assert response.status_code == 200 and elapsed < BOUND
    assert state(issued.key) == (Status.REVOKED, State.REMOVAL_PENDING)
    assert len(fake_proxy.management_requests) == sent  # the busy list was not even read
    lease_release(name=PROXY_WRITE_LEASE, holder=holder)
    reconcile()
    assert state(issued.key) == (Status.REVOKED, State.REMOVED)


def test_a_slow_answer_within_the_budget_still_removes_at_once(client, ann, issued, fake_proxy):
    fake_proxy.inject("/api-keys", method="GET", delay=0.3, body=listing(fake_proxy))
    client.force_login(ann)
    revoke_by_api(client, issued.key)
    assert state(issued.key) == (Status.REVOKED, State.REMOVED)
    assert issued.value not in fake_proxy.api_keys


def test_the_budget_covers_every_call_not_each(issued, fake_proxy, settings):
    # The list comes back just in time, the write stalls: the write gets what is left.
    settings.PORTAL_REQUEST_PROXY_BUDGET = 1.5
    fake_proxy.inject("/api-keys", method="GET", delay=1.0, body=listing(fake_proxy))
    fake_proxy.inject("/api-keys", method="PUT", delay=STALL)
    ApiKey.objects.filter(pk=issued.key.pk).update(
        status=Status.REVOKED, proxy_state=State.REMOVAL_PENDING)
    puts = fake_proxy.requests_to("/api-keys", "PUT")

    report, elapsed = timed(keys_reconcile_in_request)

    assert report is None and elapsed < BOUND - 1
    assert fake_proxy.requests_to("/api-keys", "PUT") == puts + 1
    assert state(issued.key) == (Status.REVOKED, State.REMOVAL_PENDING)


def test_admin_actions_answer_within_the_bound_while_the_proxy_stalls(
    admin_client, issued, fake_proxy
):
    fake_proxy.inject("/api-keys", delay=STALL, times=5)
    other = key_assign(user=issued.key.owner, label="phone").key
    changelist = "/admin/pool/apikey/"

    for action, key in (("revoke_keys", issued.key), ("suspend_keys", other)):
        response, elapsed = timed(lambda: admin_client.post(
            changelist, {"action": action, "_selected_action": [key.pk]}))
        assert response.status_code == 302 and elapsed < BOUND
    assert state(issued.key) == (Status.REVOKED, State.REMOVAL_PENDING)
    assert state(other) == (Status.SUSPENDED, State.REMOVAL_PENDING)

    response, elapsed = timed(lambda: admin_client.post(
        changelist, {"action": "resume_keys", "_selected_action": [other.pk]}))
    assert response.status_code == 302 and elapsed < BOUND
    assert state(other)[0] == Status.ACTIVE


def test_commands_keep_the_normal_timeout(issued, fake_proxy, settings):
    # A stall longer than the page budget but within CLIPROXY_TIMEOUT: reconcile_keys waits.
    settings.PORTAL_REQUEST_PROXY_BUDGET = 0.5
    fake_proxy.inject("/api-keys", method="GET", delay=1.0, body=listing(fake_proxy))
    key_suspend(key=issued.key, reason=ApiKey.SuspendedFor.STAFF)
    reconcile()
    assert state(issued.key) == (Status.SUSPENDED, State.REMOVED)
