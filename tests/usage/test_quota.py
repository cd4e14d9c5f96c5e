"""Quota bars (usage/quota.py, templates/usage/_quota.html): today and this month per person
and per key against each limit, the percent right at the boundaries, the reset time in the
portal's time zone, the key's expiry; on /my-keys and the key page."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey
from tests.usage.conftest import issue, served
from usage.models import ModelPrice
from usage.quota import QuotaBar, quota_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def ann(db):
    (held,) = issue(1, ["ann@example.com"])
    return held


def _bar(used, limit) -> QuotaBar:
    return QuotaBar("limit_tokens_month", "monthly token limit", "tokens", "month", used, limit,
                    0, timezone.now())


@pytest.mark.parametrize(("used", "limit", "percent", "level"), [
    (0, 2_000_000, 0, "ok"),
    (500_000, 2_000_000, 25, "ok"),
    (1_599_999, 2_000_000, 79, "ok"),
    (1_600_000, 2_000_000, 80, "high"),
    (1_999_999, 2_000_000, 99, "high"),  # rounded down: 100 % only once reached
    (2_000_000, 2_000_000, 100, "over"),
    (3_000_000, 2_000_000, 150, "over"),
    (0, 0, 100, "over"),  # a zero limit is reached from the start, as enforcement sees it
    (Decimal("4.99"), Decimal("5.00"), 99, "high"),
])
def test_percent_at_the_boundaries(used, limit, percent, level):
    bar = _bar(used, limit)
    assert bar.percent == percent and bar.level == level
    assert bar.meter == min(percent, 100)


def test_person_and_key_quota_count_today_and_this_month(ann, settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    tz = ZoneInfo("Asia/Shanghai")
    person = ann.key.owner
    person.limit_tokens_month = 2_000_000
    person.limit_cost_day = Decimal("1.00")
    person.save()
    ApiKey.objects.filter(pk=ann.key.pk).update(limit_tokens_day=1000)
    ann.key.refresh_from_db()
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    now = datetime(2026, 11, 15, 12, 0, tzinfo=tz)
    served(ann.key, at=now, requests=1, input_tokens=300_000, output_tokens=0)  # today
    served(ann.key, at=now - timedelta(days=3), requests=1, input_tokens=200_000,
           output_tokens=0)  # this month
    served(ann.key, at=now - timedelta(days=20), requests=1, input_tokens=999,
           output_tokens=0)  # last month
    served(ann.key, at=now, model="no-price", requests=2, input_tokens=1, output_tokens=0)

    quota = quota_for(person=person, keys=[ann.key], now=now)
    bars = {b.field: b for b in quota.person.bars}
    assert set(bars) == {"limit_tokens_month", "limit_cost_day"}
    month = bars["limit_tokens_month"]
    assert month.used == 500_002 and month.percent == 25
    # Reset: the next local midnight of the month, in the portal's zone.
    assert month.resets_at == datetime(2026, 12, 1, tzinfo=tz)
    cost = bars["limit_cost_day"]
    assert cost.used == Decimal("0.3") and cost.percent == 30 and cost.unpriced == 2
    assert cost.resets_at == datetime(2026, 11, 16, tzinfo=tz)
    (key_line,) = quota.keys
    assert [b.field for b in key_line.bars] == ["limit_tokens_day"]
    assert key_line.bars[0].used == 300_002 and key_line.bars[0].percent == 30000
    assert quota.time_zone == "Asia/Shanghai"


def test_revoked_keys_count_for_the_person_but_get_no_line(ann):
    (other,) = issue(1, ["ann@example.com"])
    served(other.key, at=timezone.now(), requests=1, input_tokens=70, output_tokens=0)
    ApiKey.objects.filter(pk=other.key.pk).update(status=ApiKey.Status.REVOKED)
    person = ann.key.owner
    keys = list(ApiKey.objects.filter(owner=person))
    quota = quota_for(person=person, keys=keys)
    assert quota.person.used.tokens_month == 70
    assert [line.key.pk for line in quota.keys] == [ann.key.pk]


def test_my_keys_shows_the_bar_the_reset_and_the_expiry(client, ann, settings):
    settings.TIME_ZONE = "Europe/Berlin"
    person = ann.key.owner
    person.limit_tokens_month = 2_000_000
    person.save()
    expires = timezone.now() + timedelta(days=10)
    ApiKey.objects.filter(pk=ann.key.pk).update(expires_at=expires)
    served(ann.key, at=timezone.now(), requests=1, input_tokens=500_000, output_tokens=0)
    client.force_login(person)
    page = client.get("/my-keys").content.decode()
    section = page.split('id="quota"', 1)[1].split("</section>", 1)[0]
    bar = section.split('data-limit="limit_tokens_month"', 1)[1].split("</li>", 1)[0]
    assert 'value="25"' in bar and '<span class="quota-pct">25 %</span>' in bar
    assert "500,000 of 2,000,000 tokens" in bar
    reset = timezone.localtime(timezone.now(), ZoneInfo("Europe/Berlin")).date().replace(day=1)
    reset = (reset + timedelta(days=32)).replace(day=1)
    assert f"resets <time datetime=\"{reset:%Y-%m-%d}T00:00:00+01:00\">{reset:%Y-%m-%d} 00:00" \
        in bar
    assert "(Europe/Berlin)" in section
    local_expiry = timezone.localtime(expires, ZoneInfo("Europe/Berlin"))
    assert f"Expires <time datetime=" in section and f"{local_expiry:%Y-%m-%d %H:%M}" in section


def test_without_limits_the_usage_is_shown_and_no_bar(client, ann):
    served(ann.key, at=timezone.now(), requests=1, input_tokens=42, output_tokens=0)
    client.force_login(ann.key.owner)
    page = client.get("/my-keys").content.decode()
    section = page.split('id="quota"', 1)[1].split("</section>", 1)[0]
    assert "No limit is set on your account." in section
    assert "<meter" not in section and ">42<" in section  # tokens today


def test_the_key_page_shows_the_key_quota_only_to_its_owner(client, ann):
    ApiKey.objects.filter(pk=ann.key.pk).update(limit_tokens_day=100)
    served(ann.key, at=timezone.now(), requests=1, input_tokens=80, output_tokens=0)
    client.force_login(ann.key.owner)
    page = client.get(f"/my-keys/{ann.key.pk}").content.decode()
    bar = page.split('data-limit="limit_tokens_day"', 1)[1].split("</li>", 1)[0]
    assert '<span class="quota-pct">80 %</span>' in bar and "nearly reached" in bar
    assert 'id="key-chart"' in page
    client.force_login(User.objects.create_user("eve@example.com"))
    assert client.get(f"/my-keys/{ann.key.pk}").status_code == 404
