"""The Claude Code Hub driver against the fake CCH, through the portal's services and
reconcile: suspend and resume, limits folded and pushed person first, the expiry, the day
aligned to the portal's time zone, health, and an unfinished request given up."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from io import StringIO

import pytest
import requests
from django.core.management import call_command

from accounts.models import User
from pool.models import ApiKey, Upstream, UpstreamAccount
from pool.services import RelayUnavailable, key_assign, key_resume, key_suspend
from pool.upstreams.cch_driver import CchDriver, reset_time
from pool.upstreams.registry import upstreams

from tests.fakes.cch import ADMIN_TOKEN, MODEL, FakeCch

pytestmark = pytest.mark.django_db
Status = ApiKey.Status


@pytest.fixture
def cch(settings) -> Iterator[FakeCch]:
    fake = FakeCch(time_zone="Asia/Shanghai").start()
    settings.CCH_URL, settings.CCH_ADMIN_TOKEN = fake.url, ADMIN_TOKEN
    yield fake
    fake.stop()


@pytest.fixture
def person() -> User:
    return User.objects.create(email="ann@example.com", name="Ann")


def issue(person: User) -> tuple[ApiKey, str]:
    issued = key_assign(user=person, label="laptop")
    return issued.key, issued.value


def remote(cch: FakeCch, key: ApiKey) -> dict:
    return cch.keys[int(key.remote_id)]


def cch_user(cch: FakeCch, person: User) -> dict:
    return cch.users[int(UpstreamAccount.objects.get(person=person).remote_id)]


def works(cch: FakeCch, value: str) -> int:
    return requests.post(f"{cch.url}/v1/messages", headers={"x-api-key": value},
                         json={"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]},
                         timeout=10).status_code


def reconcile() -> None:
    call_command("reconcile_keys", stdout=StringIO())


def test_reset_time_is_the_portals_midnight_there() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    assert reset_time(portal_zone="UTC", relay_zone="Asia/Shanghai", now=now) == "08:00"
    assert reset_time(portal_zone="Asia/Shanghai", relay_zone="UTC", now=now) == "16:00"
    assert reset_time(portal_zone="Asia/Kolkata", relay_zone="UTC", now=now) == "18:30"
    assert reset_time(portal_zone="Europe/Berlin", relay_zone="Europe/Berlin", now=now) == "00:00"


def test_the_persons_day_at_cch_starts_at_the_portals_midnight(cch, person) -> None:
    key, _value = issue(person)
    assert cch_user(cch, person)["dailyResetTime"] == "08:00"  # UTC portal, Shanghai CCH
    assert remote(cch, key)["dailyResetTime"] == "08:00"
    assert remote(cch, key)["canLoginWebUi"] is False


def test_suspend_and_resume_switch_the_key_at_cch(cch, person) -> None:
    key, value = issue(person)
    assert key_suspend(key=key, reason="limit")
    reconcile()
    assert remote(cch, key)["isEnabled"] is False and works(cch, value) == 401
    key.refresh_from_db()
    assert key_resume(key=key)
    reconcile()
    assert remote(cch, key)["isEnabled"] is True and works(cch, value) == 200


def test_limits_are_folded_and_the_person_goes_first(cch, person) -> None:
    User.objects.filter(pk=person.pk).update(limit_cost_day=Decimal(1))
    person.refresh_from_db()
    key, _value = issue(person)
    ApiKey.objects.filter(pk=key.pk).update(limit_cost_day=Decimal("0.5"))
    reconcile()
    assert remote(cch, key)["limitDailyUsd"] == Decimal("0.50")
    # Raised above the key's old limit: CCH would refuse the key's before the person's.
    User.objects.filter(pk=person.pk).update(limit_cost_day=Decimal(5))
    ApiKey.objects.filter(pk=key.pk).update(limit_cost_day=Decimal(10))
    reconcile()
    assert cch_user(cch, person)["dailyQuota"] == Decimal(5)
    assert remote(cch, key)["limitDailyUsd"] == Decimal(5)  # the smaller of the two
    User.objects.filter(pk=person.pk).update(limit_cost_day=None)
    ApiKey.objects.filter(pk=key.pk).update(limit_cost_day=None)
    reconcile()
    assert cch_user(cch, person)["dailyQuota"] is None and remote(cch, key)["limitDailyUsd"] is None
    key.refresh_from_db()
    assert key.pushed["limits"]["cost_day"] is None


def test_an_expiry_goes_to_the_key_and_comes_off_again(cch, person) -> None:
    key, value = issue(person)
    when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)
    ApiKey.objects.filter(pk=key.pk).update(expires_at=when)
    reconcile()
    assert remote(cch, key)["expiresAt"] == when
    ApiKey.objects.filter(pk=key.pk).update(expires_at=None)
    reconcile()
    assert remote(cch, key)["expiresAt"] is None and works(cch, value) == 200


def test_health_says_where_the_days_are(cch) -> None:
    (upstream,) = upstreams()
    driver = CchDriver(upstream)
    health = driver.health()
    assert health.ok and "Asia/Shanghai" in health.detail and "UTC" in health.detail


def test_health_with_a_wrong_token_is_one_sentence_without_it(cch, settings) -> None:
    (upstream,) = upstreams()
    assert CchDriver(upstream).health().ok  # its time zone is remembered now...
    settings.CCH_ADMIN_TOKEN = "wrong-token-for-cch-7777"
    health = CchDriver(Upstream.objects.get(pk=upstream.pk)).health()  # ...but asked again
    assert not health.ok and "wrong-token-for-cch-7777" not in health.detail


def test_a_request_unfinished_for_hours_is_given_up_and_said(cch, person) -> None:
    key, value = issue(person)
    assert works(cch, value) == 200
    assert cch.settled()
    old = datetime.now(timezone.utc) - timedelta(hours=3)
    cch.logs.insert(0, {"id": 999, "keyId": int(key.remote_id), "at": old, "model": MODEL,
                        "statusCode": None, "inputTokens": None, "outputTokens": None,
                        "cacheCreationInputTokens": None, "cacheReadInputTokens": None,
                        "costUsd": None, "durationMs": None})
    (upstream,) = upstreams()
    read = CchDriver(upstream).usage_read(keys=[key], cursor={})
    assert [r.record_id for r in read.records] == [str(cch.logs[1]["id"])]
    assert len(read.notes) == 1 and "have not finished" in read.notes[0]
    # The cursor moved past it: the next read neither counts nor mentions it again.
    again = CchDriver(upstream).usage_read(keys=[key], cursor=read.cursor)
    assert again.records == [] and again.notes == []


def test_health_with_a_users_key_instead_of_the_admin_token_is_not_ok(cch, person,
                                                                       settings) -> None:
    _key, value = issue(person)
    settings.CCH_ADMIN_TOKEN = value  # passes CCH's read routes, not its admin ones
    (upstream,) = upstreams()
    health = CchDriver(upstream).health()
    assert not health.ok and "HTTP 403" in health.detail and value not in health.detail


def test_a_default_key_that_cannot_be_switched_off_takes_its_user_with_it(cch, person) -> None:
    cch.honours_without_default = False  # an older CCH: a default key with every user
    original = cch.route

    def refuse_patch(method, path, query, body, headers):  # type: ignore[no-untyped-def]
        if method == "PATCH":
            return 500, {"errorCode": "internal_error"}
        return original(method, path, query, body, headers)

    cch.route = refuse_patch  # type: ignore[method-assign]
    with pytest.raises(RelayUnavailable):
        issue(person)
    (user,) = cch.users.values()
    (default,) = cch.keys.values()
    assert user["deleted"] and default["isEnabled"]  # its keys stay, refused with the user
    assert works(cch, default["value"]) == 401
    assert not UpstreamAccount.objects.exists() and not ApiKey.objects.exists()
