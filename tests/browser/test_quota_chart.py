"""In a real browser: a person with a 2,000,000 tokens/month limit who used 500,000 sees 25 %
on the bar; the chart draws, and the totals read from the page equal what was recorded; at
390 px the quota and chart fit the screen; the staff pages with charts break no CSP rule."""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum
from django.test import Client
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from tests.browser.test_csp import PASSWORD, _watch
from tests.usage.conftest import issue, served
from usage.models import ModelPrice, UsageSnapshot


def signed_in(page, live_server, person) -> None:
    client = Client()
    client.force_login(person)
    page.context.add_cookies([{"name": "sessionid", "value": client.cookies["sessionid"].value,
                               "url": live_server.url}])


def test_quota_bar_percent_and_chart_totals(live_server, page):
    first, second = issue(2, ["ann@example.com"])
    person = first.key.owner
    person.limit_tokens_month = 2_000_000
    person.save()
    now = timezone.now()
    served(first.key, at=now, model="model-a", requests=4, input_tokens=100_000,
           output_tokens=25_000)  # 500,000 tokens
    served(second.key, at=now, model="model-b", requests=3, input_tokens=7, output_tokens=0)
    recorded = UsageSnapshot.objects.aggregate(t=Sum("total_tokens"))["t"]

    signed_in(page, live_server, person)
    problems = _watch(page)
    page.goto(f"{live_server.url}/my-keys")
    bar = page.locator('#quota .quota-line').first.locator('[data-limit="limit_tokens_month"]')
    expect(bar.locator(".quota-pct")).to_have_text("25 %")  # 500,021 of 2,000,000
    assert bar.locator("meter").get_attribute("value") == "25"
    expect(bar.get_by_text("500,021 of 2,000,000 tokens")).to_be_visible()

    chart = page.locator("#usage-chart")
    expect(chart.locator("svg.chart-svg")).to_have_count(2)
    # Two models stacked on today's bar of the token chart; no price, so no cost bar.
    assert chart.locator('figure[data-measure="tokens"] svg rect').count() == 2
    expect(chart.locator('figure[data-measure="cost"]')).to_contain_text("No known cost")
    chart.get_by_text("The numbers as a table").click()
    total = chart.locator('[data-total="tokens"]').inner_text()
    assert int(total.replace(",", "")) == recorded == 500_021
    legend = [int(t.split()[0].replace(",", ""))
              for t in chart.locator(".chart-legend .note").all_inner_texts()]
    assert sum(legend) == recorded and legend == [500_000, 21]  # biggest model first

    # Another period through the picker: same totals, a 7-day chart.
    chart.get_by_role("link", name="7 days").click()
    expect(page.locator("#usage-chart .chart-days .current")).to_have_text("7 days")
    page.locator("#usage-chart").get_by_text("The numbers as a table").click()
    assert page.locator('#usage-chart [data-total="tokens"]').inner_text() == "500,021"
    assert problems == []  # no inline style or script the policy would refuse


def test_staff_pages_with_charts_run_without_policy_violations(live_server, page):
    (held,) = issue(1, ["ann@example.com"])
    ModelPrice.objects.create(model="model-a", input=Decimal("1"), output=Decimal("1"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    served(held.key, at=timezone.now(), model="model-a", requests=2)  # priced: no alert
    # A session that did not come from an emailed link: what the password sign-in gives.
    signed_in(page, live_server, User.objects.create_superuser("boss@example.com", PASSWORD))
    problems = _watch(page)
    page.goto(f"{live_server.url}/admin/")
    expect(page.locator("#dashboard")).to_contain_text("Nothing needs attention")
    page.goto(f"{live_server.url}/staff/leaderboard?period=7d")
    page.get_by_role("link", name="ann@example.com", exact=True).click()
    expect(page.locator("#usage-chart svg.chart-svg")).to_have_count(2)
    expect(page.locator("#person-keys")).to_contain_text(held.key.masked)
    # On a phone: wide tables scroll inside their box, the page itself does not.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in (page.url, f"{live_server.url}/admin/"):
        page.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
    assert problems == []


def test_quota_and_chart_fit_a_phone(live_server, page):
    (held,) = issue(1, ["ann@example.com"])
    person = held.key.owner
    person.limit_tokens_day = 1000
    person.limit_cost_month = 5
    person.save()
    served(held.key, at=timezone.now(), model="a-very-long-model-name-2026-11-01-preview",
           requests=2)
    signed_in(page, live_server, person)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{live_server.url}/my-keys?days=90")
    for section in ("#quota", "#usage-chart"):
        box = page.locator(section).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, section
        scroll = page.locator(section).evaluate("e => e.scrollWidth - e.clientWidth")
        assert scroll <= 0, section
    svg = page.locator("#usage-chart svg.chart-svg").first.bounding_box()
    assert svg["width"] <= 390 and svg["height"] > 100  # scaled down, still readable
