"""The staff dashboard on the admin index in a real Chromium: at 1280 px the three trend
charts side by side and nothing wider than the page; at 390 px everything within the
screen, the top tables included, in English and in Chinese."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from tests.browser.test_phone_layout import PHONE, page_width
from tests.usage.conftest import issue, served

WIDE = {"width": 1280, "height": 900}


@pytest.fixture
def busy_month(db) -> None:
    """Two people with long addresses and big numbers over a few days, four models."""
    held = issue(2, ["a.person.with.a.rather.long.address@example.com",
                     "another.long.address.for.the.table@example.com"])
    now = timezone.now()
    for n, model in enumerate(["claude-sonnet-4-5-20250929", "gpt-5-mini", "gemini-2.5-pro",
                               "internal-llm-7b"]):
        for days_ago in range(0, 20, 3):
            served(held[n % 2].key, at=now - timedelta(days=days_ago), model=model,
                   requests=1234, input_tokens=98_765, output_tokens=4_321)


def sign_in_staff(page, live_server) -> None:
    User.objects.create_superuser("boss@example.com", "a-long-password-1")
    page.goto(f"{live_server.url}/admin/login/")
    page.locator("#id_username").fill("boss@example.com")
    page.locator("#id_password").fill("a-long-password-1")
    page.locator("input[type=submit]").click()
    expect(page.locator("#dashboard")).to_be_visible()


def right_edges(page, selector: str) -> list[float]:
    return page.eval_on_selector_all(
        selector, "els => els.map(e => e.getBoundingClientRect().right)")


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_the_dashboard_fits_1280_and_a_phone(live_server, page, busy_month, language):
    page.context.set_extra_http_headers({"Accept-Language": language})
    sign_in_staff(page, live_server)

    page.set_viewport_size(WIDE)
    page.goto(f"{live_server.url}/admin/")
    expect(page.locator("#dashboard-trend figure.chart-figure")).to_have_count(3)
    tops = [page.locator(f"#dashboard-trend figure[data-measure={m}]").bounding_box()
            for m in ("requests", "tokens", "cost")]
    assert len({round(box["y"]) for box in tops}) == 1, tops  # one row of three
    assert page_width(page) <= WIDE["width"]

    page.set_viewport_size(PHONE)
    page.goto(f"{live_server.url}/admin/")
    expect(page.locator("#dash-top-people tbody tr")).to_have_count(2)
    assert page_width(page) <= PHONE["width"]
    for table in ("#dash-top-people", "#dash-top-models", ".dash-status", ".dash-cards"):
        assert max(right_edges(page, f"{table} *")) <= PHONE["width"], table
