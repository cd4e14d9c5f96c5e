"""/staff/export inside the admin frame: default dates, ready-made periods (the last month
across a year boundary included), the display currency's extra column."""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal

import pytest
from django.utils import timezone

from tests.usage.test_export import URL, usage  # noqa: F401 - fixture
from usage.currency import Currency, remember
from usage.export import preset_range

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "preset, today, expected",
    [
        ("today", date(2026, 3, 1), (date(2026, 3, 1), date(2026, 3, 1))),
        ("last-7-days", date(2026, 3, 2), (date(2026, 2, 24), date(2026, 3, 2))),
        ("this-month", date(2026, 3, 17), (date(2026, 3, 1), date(2026, 3, 17))),
        ("last-month", date(2026, 3, 31), (date(2026, 2, 1), date(2026, 2, 28))),
        ("last-month", date(2027, 1, 5), (date(2026, 12, 1), date(2026, 12, 31))),
        ("last-month", date(2028, 3, 1), (date(2028, 2, 1), date(2028, 2, 29))),  # leap year
    ],
)
def test_presets_give_the_right_days(preset, today, expected):
    assert preset_range(preset, today=today) == expected


def test_a_preset_downloads_that_period(admin_client, usage, monkeypatch):  # noqa: F811
    # Days are local (Asia/Shanghai in the fixture): 01:00 UTC on 5 March is that day there.
    monkeypatch.setattr(timezone, "localdate", lambda *a, **k: date(2026, 4, 15))
    response = admin_client.get(URL, {"preset": "last-month"})
    assert response.status_code == 200 and response.streaming
    assert 'filename="usage-2026-03-01-to-2026-03-31.csv"' in response["Content-Disposition"]
    body = b"".join(response.streaming_content).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert {r["date"] for r in rows} == {"2026-03-01", "2026-03-02", "2026-03-05"}


def test_an_unknown_preset_is_refused_on_the_form(admin_client):
    response = admin_client.get(URL, {"preset": "fortnight"})
    assert response.status_code == 400 and not response.streaming
    assert "preset" in response.context["form"].errors


def test_the_page_is_in_the_admin_frame_with_default_dates(admin_client, monkeypatch):
    monkeypatch.setattr(timezone, "localdate", lambda *a, **k: date(2027, 1, 5))
    response = admin_client.get(URL)
    assert response.status_code == 200
    context = response.context
    assert context["has_permission"] and context["site_header"]  # admin.site.each_context
    html = response.content.decode()
    assert 'class="breadcrumbs"' in html and 'id="user-tools"' in html
    assert "theme-toggle" in html
    assert 'value="2026-12-30"' in html and 'value="2027-01-05"' in html  # last 7 days
    assert 'name="preset" value="last-month"' in html and "2026-12-01 – 2026-12-31" in html


def test_a_display_currency_adds_its_column_and_keeps_usd(admin_client, usage):  # noqa: F811
    remember(Currency("CNY", Decimal("7.1")))
    response = admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-02"})
    body = b"".join(response.streaming_content).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(body)))
    gpt = next(r for r in rows if r["model"] == "gpt" and r["date"] == "2026-03-02"
               and r["email"] == "ann@example.com")
    assert gpt["cost (USD)"] == "0.400000" and gpt["cost (CNY)"] == "2.840000"
    mystery = next(r for r in rows if r["model"] == "mystery")
    assert mystery["cost (USD)"] == "" and mystery["cost (CNY)"] == ""  # unknown stays unknown


def test_chinese_names_survive_the_round_trip(admin_client, usage):  # noqa: F811
    ann1, _ann2, _bob = usage
    ann1.key.owner.name = "王小明"
    ann1.key.owner.save()
    response = admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-01"})
    raw = b"".join(response.streaming_content)
    assert raw.startswith(b"\xef\xbb\xbf") and "王小明".encode() in raw


def test_a_staff_token_can_ask_for_a_preset(client, usage, monkeypatch):  # noqa: F811
    from accounts.models import ApiToken, User
    from accounts.services import api_token_new

    raw = api_token_new()
    token = ApiToken(user=User.objects.create_user("ops@example.com", password="x" * 12,
                                                   is_staff=True), name="reports")
    token.set_token(raw)
    token.save()
    monkeypatch.setattr(timezone, "localdate", lambda *a, **k: date(2026, 3, 2))
    response = client.get(URL, {"preset": "today"}, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(
        b"".join(response.streaming_content).decode("utf-8-sig"))))
    assert {r["date"] for r in rows} == {"2026-03-02"} and len(rows) == 2
    bad = client.get(URL, {"preset": "fortnight"}, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert bad.status_code == 400 and "preset" in bad.json()["fields"]
