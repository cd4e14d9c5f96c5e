"""/my-keys/<id>: one key's usage by day, by hour of day (portal time zone) and by model,
for its owner only."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from tests.usage.conftest import issue, served
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db


@pytest.fixture
def held(db):
    ann_key, bob_key = issue(2, ["ann@example.com", "bob@example.com"])
    return ann_key, bob_key


def test_anonymous_visitors_are_sent_to_sign_in(client, held):
    response = client.get(f"/my-keys/{held[0].key.pk}")
    assert response.status_code == 302 and response["Location"].startswith("/login?next=")


def test_someone_else_gets_404(client, held):
    client.force_login(held[1].key.owner)
    assert client.get(f"/my-keys/{held[0].key.pk}").status_code == 404
    htmx = client.get(f"/my-keys/{held[0].key.pk}", headers={"HX-Request": "true"})
    assert htmx.status_code == 404
    assert client.get("/my-keys/999999").status_code == 404


def test_owner_sees_usage_by_day_hour_and_model_never_the_key(client, held, settings):
    settings.TIME_ZONE = "Asia/Tokyo"  # UTC+9: 23:30 UTC yesterday is 08:30 today in Tokyo
    ann = held[0]
    now = timezone.now().astimezone(ZoneInfo("Asia/Tokyo")).replace(hour=8, minute=30)
    served(ann.key, at=now, requests=3, input_tokens=100, output_tokens=11)
    served(ann.key, at=now, model="no-price-model", requests=2, input_tokens=7, output_tokens=0)
    served(ann.key, at=now - timedelta(days=40), requests=1, input_tokens=1, output_tokens=0)
    served(held[1].key, at=now, requests=50)  # Bob's: not on Ann's page
    client.force_login(ann.key.owner)

    response = client.get(f"/my-keys/{ann.key.pk}")
    page = response.content.decode()

    assert response.status_code == 200
    assert ann.value not in page and ann.key.masked in page
    assert "not single requests" in page  # says the rows are hourly rollups
    # By hour of day: 3 + 2 requests at 08:00 Tokyo time (23:00 UTC the day before).
    hour_row = page.split("<th scope=\"row\">08:00</th>", 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">5</td>' in hour_row and '<td class="num">347</td>' in hour_row
    # All-time totals include the 40-day-old request; the 30-day window does not.
    assert '<dd>6</dd>' in page and '<dd>348</dd>' in page
    # A model without a price: its cost is unknown, not $0.
    model_row = page.split("<code>no-price-model</code>", 1)[1].split("</tr>", 1)[0]
    assert "unknown" in model_row and "$0" not in model_row
    assert page.count('<tr><th scope="row"><time datetime=') == 30  # every day of the window


def test_cost_partly_unknown_is_said(client, held):
    ann = held[0]
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("2"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    served(ann.key, at=timezone.now(), requests=1, input_tokens=1_000_000, output_tokens=0)
    served(ann.key, at=timezone.now(), model="no-price-model", requests=1)
    client.force_login(ann.key.owner)
    page = client.get(f"/my-keys/{ann.key.pk}").content.decode()
    totals = page.split('<dl class="totals"', 1)[1].split("</dl>", 1)[0]
    assert "≥ $1.00" in totals and "without a known price" in totals
    assert "<dt>All-time cost</dt>" in totals  # the chart below is 30 days: the totals say theirs


@pytest.mark.parametrize("hours", [1, 60])
def test_the_page_costs_the_same_queries_however_much_usage(
    client, held, django_assert_num_queries, hours
):
    ann = held[0]
    start = timezone.now()
    for h in range(hours):
        served(ann.key, at=start - timedelta(hours=h * 7), model=f"m{h % 3}")
    client.force_login(ann.key.owner)
    # session, person, key, totals, by day, by hour, by model, recent, quota, daily chart,
    # and where the key is used (no CLIPROXY_* here: a CLIProxyAPI added in the admin is
    # looked for)
    with django_assert_num_queries(11):
        response = client.get(f"/my-keys/{ann.key.pk}")
    assert response.status_code == 200


def test_my_keys_links_each_row_to_its_page(client, held):
    client.force_login(held[0].key.owner)
    assert f'href="/my-keys/{held[0].key.pk}"'.encode() in client.get("/my-keys").content


def test_post_is_refused(client, held):
    client.force_login(held[0].key.owner)
    assert client.post(f"/my-keys/{held[0].key.pk}").status_code == 405


def test_today_is_a_day_of_the_portal_time_zone(held, settings):
    from usage.selectors import key_usage

    settings.TIME_ZONE = "America/Los_Angeles"
    ann = held[0]
    served(ann.key, at=timezone.now(), requests=4)
    usage = key_usage(key=ann.key)
    assert usage.by_day[-1].label == timezone.localdate()
    assert usage.by_day[-1].totals.requests == 4
    assert sum(b.totals.requests for b in usage.by_hour) == 4
    assert [b.label for b in usage.by_hour] == list(range(24))
