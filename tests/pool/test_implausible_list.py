"""Reconcile refuses a key list from the proxy that cannot be right: empty (or null) while
the portal has keys there, or lacking most of them. It writes nothing, says why in one
sentence, alerts staff (at most every 30 minutes), and `reconcile_keys --force` goes ahead
when the proxy really was reset. A fresh install and ordinary drift are not refusals."""

from __future__ import annotations

import logging
from io import StringIO

import pytest
from django.core import mail
from django.core.management import CommandError, call_command

from accounts.models import User
from keyportal.models import AuditEvent
from pool.models import ApiKey
from pool.services import (
    ImplausibleKeyList, key_resume, key_suspend, keys_reconcile, keys_reconcile_quietly,
)
from pool.upstream import ProxyClient, UpstreamError

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState
OPERATOR = ["operator-key-1", "operator-key-2", "operator-key-3"]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)


@pytest.fixture
def values(fake_proxy, ann, bob, staff) -> list[str]:
    """The operator's 3 keys and 6 of the portal's at the proxy: keys 0-3 issued to Ann and
    Bob, 4-5 in the pool. Returns the portal's 6 values, in that order."""
    fake_proxy.api_keys = list(OPERATOR)
    run("generate_keys", "--count", "6")
    keys = list(ApiKey.objects.order_by("id"))
    for key, owner in zip(keys[:4], [ann, ann, bob, bob]):
        ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE, owner=owner, value=None)
    return [k.value for k in keys]


def states() -> list[tuple]:
    return list(ApiKey.objects.order_by("pk").values_list("status", "proxy_state", "escrow"))


def puts(fake_proxy) -> int:
    return fake_proxy.requests_to("/api-keys", "PUT")


def test_a_null_list_is_refused_and_nothing_is_written(values, fake_proxy):
    fake_proxy.api_keys = []  # the proxy answers {"api-keys": null}
    before, written = states(), puts(fake_proxy)

    with pytest.raises(CommandError) as caught:
        run("reconcile_keys")

    message = str(caught.value)
    assert "0 of the 6 keys" in message and "reconcile_keys --force" in message
    assert fake_proxy.api_keys == [] and puts(fake_proxy) == written
    assert states() == before
    [alert] = mail.outbox
    assert alert.to == ["ops@example.com"] and "--force" in alert.body
    assert not any(v in alert.body or v in message for v in values)
    # Cron a minute later: refused again, but staff are not emailed twice.
    with pytest.raises(CommandError):
        run("reconcile_keys")
    assert len(mail.outbox) == 1 and states() == before


@pytest.mark.parametrize(
    "body, listed, total",
    [({"api-keys": None}, 0, 0), ({"api-keys": []}, 0, 0), ({"api-keys": OPERATOR}, 0, 3)],
    ids=["null", "empty", "operator-keys-only"],
)
def test_an_answer_without_the_portals_keys_is_refused(values, fake_proxy, body, listed, total):
    fake_proxy.inject("/api-keys", method="GET", body=body)
    at_proxy, before, written = list(fake_proxy.api_keys), states(), puts(fake_proxy)

    with ProxyClient.from_settings() as client, pytest.raises(ImplausibleKeyList) as caught:
        keys_reconcile(client=client)

    assert (caught.value.expected, caught.value.listed, caught.value.total) == (6, listed, total)
    assert isinstance(caught.value, UpstreamError)
    assert fake_proxy.api_keys == at_proxy and puts(fake_proxy) == written
    assert states() == before


def test_a_list_lacking_most_of_the_portals_keys_is_refused(values, fake_proxy):
    fake_proxy.api_keys = OPERATOR + values[4:]  # 4 of 6 lost: more than half, and at least 3
    at_proxy, before, written = list(fake_proxy.api_keys), states(), puts(fake_proxy)

    with pytest.raises(CommandError, match="only 2 of the 6 keys"):
        run("reconcile_keys")

    assert fake_proxy.api_keys == at_proxy and puts(fake_proxy) == written
    assert states() == before


@pytest.mark.parametrize("lost", [[0, 4], [0, 4, 5]], ids=["two", "exactly-half"])
def test_a_few_keys_missing_is_drift_and_reconciles(values, fake_proxy, lost):
    fake_proxy.api_keys = OPERATOR + [v for i, v in enumerate(values) if i not in lost]

    out = run("reconcile_keys")

    pool_lost = [i for i in lost if i >= 4]
    assert f"{len(pool_lost)} pool keys added to the proxy" in out
    assert "1 issued keys found missing" in out
    assert set(fake_proxy.api_keys) == set(OPERATOR) | {v for i, v in enumerate(values) if i != 0}
    first = ApiKey.objects.order_by("id").first()
    assert first.proxy_state == State.MISSING


def test_the_share_is_a_setting(values, fake_proxy, settings):
    settings.PORTAL_RECONCILE_MAX_LOSS = 0.8
    fake_proxy.api_keys = OPERATOR + values[4:]  # 4 of 6 lost: two thirds, under 0.8
    run("reconcile_keys")
    assert ApiKey.objects.filter(proxy_state=State.MISSING).count() == 4


def test_force_takes_a_reset_proxy_as_it_is(values, fake_proxy):
    # Key 3 was suspended (its value went to escrow) and resumed: it waits to go back.
    key3 = ApiKey.objects.order_by("id")[3]
    key_suspend(key=key3, reason=ApiKey.SuspendedFor.STAFF)
    run("reconcile_keys")
    key_resume(key=key3)
    fake_proxy.api_keys = []  # then the proxy's config was reset

    with pytest.raises(CommandError):
        run("reconcile_keys")
    out = run("reconcile_keys", "--force")

    assert "Forced: the proxy listed only 0 of the 5 keys" in out
    assert sorted(fake_proxy.api_keys) == sorted([values[3], values[4], values[5]])
    issued = ApiKey.objects.order_by("id")[:4]
    assert [k.proxy_state for k in issued] == [State.MISSING] * 3 + [State.PUSHED]
    event = AuditEvent.objects.filter(action=AuditEvent.Action.RECONCILE_RUN).latest("id")
    assert event.after["forced"] is True and event.after["missing"] == 3
    # Settled: the next run is an ordinary one.
    assert "No change." in run("reconcile_keys")


def test_a_fresh_install_with_an_empty_list_proceeds(fake_proxy, settings):
    settings.PORTAL_POOL_MIN, settings.PORTAL_POOL_TARGET = 2, 4
    assert fake_proxy.api_keys == []

    out = run("reconcile_keys")

    assert "4 new pool keys created" in out
    assert len(fake_proxy.api_keys) == 4
    assert ApiKey.objects.filter(proxy_state=State.PUSHED).count() == 4


def test_a_dry_run_reports_the_refusal_and_alerts_nobody(values, fake_proxy):
    fake_proxy.api_keys = []
    with pytest.raises(CommandError, match="reconcile_keys --force"):
        run("reconcile_keys", "--dry-run")
    assert mail.outbox == []


def test_reconcile_after_a_change_logs_the_refusal_and_goes_on(values, fake_proxy, caplog):
    fake_proxy.api_keys = []
    before = states()
    with caplog.at_level(logging.WARNING, logger="pool.services"):
        assert keys_reconcile_quietly() is None
    assert "reconcile_keys --force" in caplog.text
    assert not any(v in caplog.text for v in values)
    assert states() == before and len(mail.outbox) == 1


def test_an_empty_list_is_refused_however_few_keys_the_portal_has(fake_proxy):
    fake_proxy.api_keys = list(OPERATOR)
    run("generate_keys", "--count", "2")
    fake_proxy.api_keys = []  # fewer keys lost than the floor of 3, but the list is empty
    with pytest.raises(CommandError, match="0 of the 2 keys"):
        run("reconcile_keys")
    assert fake_proxy.api_keys == []


def test_a_small_portal_losing_its_keys_from_a_kept_list_is_drift(fake_proxy):
    fake_proxy.api_keys = list(OPERATOR)
    run("generate_keys", "--count", "2")
    pushed = fake_proxy.api_keys[3:]
    fake_proxy.api_keys = list(OPERATOR)  # removed by hand; the operator's keys are still there
    assert "2 pool keys added to the proxy" in run("reconcile_keys")
    assert fake_proxy.api_keys[:3] == OPERATOR and sorted(fake_proxy.api_keys[3:]) == sorted(pushed)
