"""Limits: keys that reach a limit leave the proxy until the window resets in the portal's
time zone, and owners are emailed at 80 % and 100 % once per window. Time is frozen by
passing `now` to the services; the dates lie in the future so that the wall clock used by
reconcile never brings a key back early."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as tz
from decimal import Decimal
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core import mail
from django.core.management import call_command

from accounts.models import User
from keyportal.models import AuditEvent
from pool.models import ApiKey
from tests.usage.conftest import issue
from usage.limits import limits_enforce, windows_at
from usage.models import LimitNotice, UsageSnapshot
from usage.services import usage_sync_pass

pytestmark = pytest.mark.django_db
Status, State, Action = ApiKey.Status, ApiKey.ProxyState, AuditEvent.Action

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 23:30 in Shanghai on 10 March, still 15:30 on the same day in UTC.
NOW = datetime(2036, 3, 10, 15, 30, tzinfo=tz.utc)
SHANGHAI_MIDNIGHT = datetime(2036, 3, 11, 0, 0, tzinfo=SHANGHAI)


@pytest.fixture(autouse=True)
def _shanghai(settings) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"


def use(proxy, value: str, tokens: int, at: datetime = NOW - timedelta(minutes=20)) -> None:
    """One request through the proxy of `tokens` tokens in all."""
    proxy.add_usage(value, input_tokens=tokens - tokens // 2, output_tokens=tokens // 2,
                    timestamp=at.timestamp())


def row(key: ApiKey, *, at: datetime, tokens: int = 0, cost: str | None = None,
        requests: int = 1, model: str = "m") -> None:
    UsageSnapshot.objects.create(
        api_key=key, model=model, hour=at.replace(minute=0, second=0, microsecond=0),
        requests=requests, total_tokens=tokens, cost=None if cost is None else Decimal(cost),
    )


def limit(obj, **limits) -> None:
    type(obj).objects.filter(pk=obj.pk).update(**limits)
    obj.refresh_from_db()


def test_a_key_over_its_daily_limit_leaves_the_proxy_and_returns_after_local_midnight(
    fake_proxy, live_key, proxy_accepts
):
    key, value = live_key
    limit(key, limit_tokens_day=100)
    use(fake_proxy, value, 60)
    usage_sync_pass(now=NOW)
    key.refresh_from_db()
    assert key.status == Status.ACTIVE and proxy_accepts(value)  # 60 of 100: still fine

    use(fake_proxy, value, 50)
    report = usage_sync_pass(now=NOW)

    key.refresh_from_db()
    assert report.limits.suspended == 1 and report.as_dict()["keys_suspended"] == 1
    assert (key.status, key.suspended_for) == (Status.SUSPENDED, "key_tokens_day")
    assert key.suspended_until == SHANGHAI_MIDNIGHT  # the next midnight in TIME_ZONE, not UTC
    assert key.proxy_state == State.REMOVED and key.escrow
    assert not proxy_accepts(value) and value not in fake_proxy.api_keys
    assert "operator-own-key" in fake_proxy.api_keys

    # One second before local midnight nothing changes; after it the key is back.
    usage_sync_pass(now=SHANGHAI_MIDNIGHT - timedelta(seconds=1))
    assert not proxy_accepts(value)
    usage_sync_pass(now=SHANGHAI_MIDNIGHT + timedelta(minutes=5))
    key.refresh_from_db()
    assert (key.status, key.suspended_for, key.suspended_until) == (Status.ACTIVE, "", None)
    assert key.proxy_state == State.PUSHED and not key.escrow
    assert proxy_accepts(value)

    [suspended] = AuditEvent.objects.filter(action=Action.KEY_SUSPENDED)
    [restored] = AuditEvent.objects.filter(action=Action.KEY_RESTORED)
    assert suspended.actor_kind == restored.actor_kind == "system"
    assert suspended.target_id == restored.target_id == str(key.pk)
    assert "key_tokens_day" in suspended.detail and value not in suspended.detail


def test_the_sync_command_suspends_and_says_so(fake_proxy, live_key, proxy_accepts):
    # The command runs on the wall clock: usage now, a limit already reached.
    key, value = live_key
    limit(key, limit_tokens_day=10)
    fake_proxy.add_usage(value, input_tokens=20, output_tokens=0)
    out = StringIO()
    call_command("sync_usage", stdout=out)
    assert "1 keys suspended for reaching a limit." in out.getvalue()
    assert not proxy_accepts(value)
    key.refresh_from_db()
    assert key.status == Status.SUSPENDED


def test_the_decision_is_kept_when_the_proxy_is_down_and_the_proxy_follows_later(
    fake_proxy, live_key, proxy_accepts, settings
):
    key, value = live_key
    limit(key, limit_tokens_day=100)
    row(key, at=NOW, tokens=150)
    settings.CLIPROXY_URL = "http://127.0.0.1:9"  # nothing listens there

    report = limits_enforce(now=NOW)

    key.refresh_from_db()
    assert report.suspended == 1 and report.proxy_postponed
    assert (key.status, key.proxy_state) == (Status.SUSPENDED, State.REMOVAL_PENDING)
    assert proxy_accepts(value)  # the proxy has not heard yet

    settings.CLIPROXY_URL = fake_proxy.url
    report = limits_enforce(now=NOW + timedelta(minutes=1))  # the next sync
    assert report.suspended == 0 and report.proxy is not None
    assert not proxy_accepts(value)


def test_a_person_limit_suspends_all_their_keys_and_no_one_elses(db):
    ann1, ann2, bob = issue(3, ["ann@example.com", "ann@example.com", "bob@example.com"])
    ann = ann1.key.owner
    limit(ann, limit_tokens_day=1000)
    limit(bob.key.owner, limit_tokens_day=1000)
    row(ann1.key, at=NOW, tokens=600)
    row(ann2.key, at=NOW, tokens=500)  # neither key alone is over; together they are
    row(bob.key, at=NOW, tokens=900)

    assert limits_enforce(now=NOW, reconcile=False).suspended == 2

    states = dict(ApiKey.objects.values_list("pk", "suspended_for"))
    assert states == {ann1.key.pk: "person_tokens_day", ann2.key.pk: "person_tokens_day",
                      bob.key.pk: ""}


def test_a_key_added_while_its_owner_is_over_is_suspended_too(db):
    [first] = issue(1, ["ann@example.com"])
    limit(first.key.owner, limit_tokens_day=100)
    row(first.key, at=NOW, tokens=100)
    limits_enforce(now=NOW, reconcile=False)
    [second] = issue(1, ["ann@example.com"])
    assert limits_enforce(now=NOW + timedelta(minutes=1), reconcile=False).suspended == 1
    second.key.refresh_from_db()
    assert second.key.suspended_for == "person_tokens_day"


def test_yesterdays_usage_does_not_count_today_but_counts_this_month(db):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_tokens_day=100, limit_tokens_month=1000)
    yesterday = NOW - timedelta(days=1)
    row(held.key, at=yesterday, tokens=950)
    row(held.key, at=NOW, tokens=60)

    limits_enforce(now=NOW, reconcile=False)

    held.key.refresh_from_db()
    # Only the monthly limit is reached; the key comes back on 1 April, local time.
    assert held.key.suspended_for == "key_tokens_month"
    assert held.key.suspended_until == datetime(2036, 4, 1, tzinfo=SHANGHAI)


def test_when_both_windows_are_reached_the_later_return_wins(db):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_tokens_day=100)
    limit(held.key.owner, limit_tokens_month=100)
    row(held.key, at=NOW, tokens=200)
    limits_enforce(now=NOW, reconcile=False)
    held.key.refresh_from_db()
    assert held.key.suspended_for == "person_tokens_month"
    assert held.key.suspended_until == datetime(2036, 4, 1, tzinfo=SHANGHAI)


def test_a_staff_suspended_or_revoked_key_is_left_alone(db, admin_user):
    ann1, ann2 = issue(2, ["ann@example.com"])
    limit(ann1.key, limit_tokens_day=1)
    limit(ann2.key, limit_tokens_day=1)
    ApiKey.objects.filter(pk=ann1.key.pk).update(status=Status.SUSPENDED, suspended_for="staff")
    ApiKey.objects.filter(pk=ann2.key.pk).update(status=Status.REVOKED)
    row(ann1.key, at=NOW, tokens=5)
    row(ann2.key, at=NOW, tokens=5)
    assert limits_enforce(now=NOW, reconcile=False).suspended == 0
    assert ApiKey.objects.get(pk=ann1.key.pk).suspended_for == "staff"


def test_emails_go_out_at_80_and_100_percent_once_per_window(db):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_tokens_day=100)

    def enforce(at: datetime) -> list[str]:
        before = len(mail.outbox)
        limits_enforce(now=at, reconcile=False)
        return [m.subject for m in mail.outbox[before:]]

    row(held.key, at=NOW - timedelta(hours=2), tokens=79)
    assert enforce(NOW) == []
    row(held.key, at=NOW - timedelta(hours=1), tokens=1)  # 80 %
    [subject] = enforce(NOW)
    assert "80 %" in subject and held.key.masked in subject
    assert enforce(NOW + timedelta(minutes=1)) == []  # a second sync sends nothing
    row(held.key, at=NOW, tokens=25)  # 105 %
    [subject] = enforce(NOW + timedelta(minutes=2))
    assert "100 %" in subject
    assert "works again at 2036-03-11 00:00 CST" in mail.outbox[-1].body
    assert enforce(NOW + timedelta(minutes=3)) == []

    # A new day is a new window: the key comes back, and 80 % is told again.
    tomorrow = SHANGHAI_MIDNIGHT + timedelta(hours=1)
    assert enforce(tomorrow) == []
    row(held.key, at=tomorrow, tokens=90)
    [subject] = enforce(tomorrow + timedelta(minutes=1))
    assert "80 %" in subject
    assert LimitNotice.objects.count() == 3
    assert all(m.to == ["ann@example.com"] for m in mail.outbox)


def test_a_jump_past_both_thresholds_sends_one_email(db):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key.owner, limit_tokens_day=100)
    row(held.key, at=NOW, tokens=500)
    limits_enforce(now=NOW, reconcile=False)
    [message] = mail.outbox
    assert "100 %" in message.subject and "All your keys are now suspended" in message.body
    assert set(LimitNotice.objects.values_list("subject", "threshold")) == {
        (f"person:{held.key.owner_id}", 80), (f"person:{held.key.owner_id}", 100)}


def test_an_email_that_could_not_be_sent_is_tried_again(db, settings):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_tokens_day=100)
    row(held.key, at=NOW, tokens=85)
    settings.EMAIL_BACKEND = "tests.usage.test_limits.BrokenMail"
    limits_enforce(now=NOW, reconcile=False)
    assert not LimitNotice.objects.exists()
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    limits_enforce(now=NOW, reconcile=False)
    assert len(mail.outbox) == 1 and LimitNotice.objects.count() == 1


class BrokenMail:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def send_messages(self, messages) -> int:
        raise OSError("mail server down")


def test_unknown_cost_counts_as_zero_and_the_email_says_so(db):
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_cost_day=Decimal("1.00"))
    row(held.key, at=NOW, cost="0.85", model="priced")
    row(held.key, at=NOW, cost=None, requests=3, model="unpriced")

    report = limits_enforce(now=NOW, reconcile=False)

    assert report.suspended == 0
    [message] = mail.outbox
    assert "80 %" in message.subject and "daily cost limit" in message.subject
    assert "$0.85" in message.body and "$1.00" in message.body
    assert "3 requests on models without a known price are not counted" in message.body


def test_emails_and_pages_show_keys_masked_only(fake_proxy, live_key, client):
    key, value = live_key
    limit(key, limit_tokens_day=100)
    row(key, at=NOW, tokens=100)
    limits_enforce(now=NOW)
    assert mail.outbox and all(value not in m.body + m.subject for m in mail.outbox)

    client.force_login(key.owner)
    page = client.get("/my-keys").content.decode()
    assert "this key&#x27;s daily token limit" in page  # why
    assert "back on its own at" in page and "2036-03-11T00:00:00+08:00" in page  # and when
    assert value not in page


@pytest.mark.parametrize(
    "zone, at, day, month",
    [
        ("Asia/Shanghai", NOW, (datetime(2036, 3, 10), datetime(2036, 3, 11)),
         (datetime(2036, 3, 1), datetime(2036, 4, 1))),
        ("UTC", datetime(2036, 12, 31, 23, 59, tzinfo=tz.utc),
         (datetime(2036, 12, 31), datetime(2037, 1, 1)),
         (datetime(2036, 12, 1), datetime(2037, 1, 1))),
        # The spring-forward day in Berlin lasts 23 hours.
        ("Europe/Berlin", datetime(2036, 3, 30, 12, tzinfo=tz.utc),
         (datetime(2036, 3, 30), datetime(2036, 3, 31)),
         (datetime(2036, 3, 1), datetime(2036, 4, 1))),
    ],
)
def test_windows_follow_the_portal_time_zone(settings, zone, at, day, month):
    settings.TIME_ZONE = zone
    windows = windows_at(at)
    local = ZoneInfo(zone)
    assert (windows["day"].start, windows["day"].end) == tuple(d.replace(tzinfo=local) for d in day)
    assert (windows["month"].start, windows["month"].end) == tuple(
        d.replace(tzinfo=local) for d in month)
    if zone == "Europe/Berlin":
        assert windows["day"].end.astimezone(tz.utc) - windows["day"].start == timedelta(hours=23)


def test_only_usage_a_limit_can_look_at_is_summed(db):
    from usage.limits import usage_in_windows

    limited_key, limited_person, free = issue(
        3, ["ann@example.com", "bob@example.com", "cy@example.com"])
    limit(limited_key.key, limit_tokens_day=1000)
    limit(limited_person.key.owner, limit_tokens_month=1000)
    for held in (limited_key, limited_person, free):
        row(held.key, at=NOW, tokens=10)

    by_key, by_person = usage_in_windows(windows=windows_at(NOW))

    assert set(by_key) == {limited_key.key.pk, limited_person.key.pk}
    assert free.key.owner_id not in by_person
    assert by_key[limited_person.key.pk].tokens_day == 10


def test_a_limit_email_links_to_my_keys_and_names_whom_to_ask(db, settings):
    settings.PORTAL_BASE_URL = "https://keys.example.com/"
    User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    [held] = issue(1, ["ann@example.com"])
    limit(held.key, limit_tokens_day=100)
    row(held.key, at=NOW, tokens=80)
    limits_enforce(now=NOW, reconcile=False)
    [message] = mail.outbox
    assert "https://keys.example.com/my-keys" in message.body
    # Unset, whom to ask is the staff; set, the contact staff chose.
    assert "ask ops@example.com." in message.body

    settings.PORTAL_SUPPORT_CONTACT = "#ai-keys on Slack"
    row(held.key, at=NOW - timedelta(hours=1), tokens=30)
    limits_enforce(now=NOW + timedelta(minutes=1), reconcile=False)
    assert "ask #ai-keys on Slack." in mail.outbox[-1].body


def test_a_limit_email_in_chinese_and_without_a_known_address(db, settings):
    settings.PORTAL_BASE_URL = ""
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]  # nothing people could open
    [held] = issue(1, ["ann@example.com"])
    User.objects.filter(pk=held.key.owner_id).update(language="zh-hans")
    limit(held.key, limit_tokens_day=100)
    row(held.key, at=NOW, tokens=80)
    limits_enforce(now=NOW, reconcile=False)
    [message] = mail.outbox
    assert "http" not in message.body
    assert "“我的密钥”页面" in message.body and "请联系门户的工作人员。" in message.body
