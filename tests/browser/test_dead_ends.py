"""Issue 17's dead ends, in a real Chromium: the key's page survives a reload, a renamed
label shows everywhere at once, the leaderboard and the authenticator's QR code fit."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from accounts.models import User as Person
from pool.models import ApiKey, key_digest
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link
from tests.browser.test_phone_layout import PHONE, dana_with_keys, sign_in  # noqa: F401 - a fixture


def test_reloading_the_new_keys_page_says_it_was_shown_and_leads_to_my_keys(
        live_server, fake_proxy, settings, page):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    with ProxyClient.from_settings() as client:
        pool_generate(count=3, client=client)
    page.goto(f"{live_server.url}/register")
    page.get_by_label("Email address").fill("dana@example.com")
    page.get_by_label("Key label").fill("laptop")
    page.get_by_role("button", name="Email me the link").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
    page.goto(emailed_link())
    page.get_by_role("button", name="Sign in and show my key").click()
    expect(page.get_by_role("heading", name=re.compile("Your new key"))).to_be_visible()
    value = page.locator("#key-value").inner_text().strip()
    assert key_digest(value) == ApiKey.objects.get(owner__email="dana@example.com").key_hash
    assert value not in page.url

    page.reload()  # the browser's refresh: a GET now, never the POST again

    expect(page.get_by_role("heading", name="This key was shown once")).to_be_visible()
    assert value not in page.content()
    page.get_by_role("link", name="Go to my keys").click()
    expect(page.locator("table.keys")).to_contain_text("laptop")
    assert ApiKey.objects.filter(owner__email="dana@example.com").count() == 1


def test_on_a_phone_the_keys_are_on_the_first_screen(live_server, page, dana_with_keys):
    dana, keys = dana_with_keys
    Person.objects.filter(pk=dana.pk).update(limit_tokens_day=10**12, limit_cost_month=100)
    page.set_viewport_size(PHONE)
    sign_in(page, live_server, dana)
    page.goto(f"{live_server.url}/my-keys")
    first = page.locator("table.keys tbody tr").first
    expect(first).to_be_visible()
    box = first.bounding_box()
    assert box is not None and box["y"] < PHONE["height"], box  # no scrolling to find a key
    add_form, quota = page.locator("#add-form").bounding_box(), page.locator("#quota").bounding_box()
    assert box["y"] < add_form["y"] < quota["y"]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_a_rename_shows_the_new_label_everywhere_without_a_reload(live_server, page):
    from datetime import timedelta

    from django.utils import timezone

    from pool.services import key_assign
    from tests.pool.conftest import _make_ready_keys
    from tests.usage.conftest import served

    _make_ready_keys(1)
    ann = Person.objects.create_user("ann@example.com", name="Ann")
    key = key_assign(user=ann, label="old-box").key
    ApiKey.objects.filter(pk=key.pk).update(limit_tokens_day=10)  # reached: a banner names it
    served(key, at=timezone.now() - timedelta(minutes=1), input_tokens=50)
    sign_in(page, live_server, ann)
    page.goto(f"{live_server.url}/my-keys")
    expect(page.locator("#quota")).to_contain_text("old-box")
    expect(page.locator("#limit-banner")).to_contain_text("old-box")
    page.evaluate("window.kpSamePage = true")  # gone if the page were loaded again

    page.locator(f"#rename-{key.pk}").click()
    page.locator(f"#key-{key.pk} input[name=label]").fill("desk")
    page.locator(f"#key-{key.pk}").get_by_role("button", name="Save").click()

    expect(page.locator(f"#key-{key.pk} th.label")).to_have_text("desk")
    expect(page.locator("#quota")).to_contain_text("desk")
    expect(page.locator("#limit-banner")).to_contain_text("desk")
    assert "old-box" not in page.locator("main").inner_text()
    assert page.evaluate("window.kpSamePage") is True


STAFF_PASSWORD = "correct horse battery staple 9"


def staff_sign_in(page, live_server, path: str) -> None:
    Person.objects.create_user("ops@example.com", STAFF_PASSWORD, is_staff=True)
    page.goto(f"{live_server.url}{path}")  # to the admin's sign-in first
    page.locator("#id_username").fill("ops@example.com")
    page.locator("#id_password").fill(STAFF_PASSWORD)
    page.locator("input[type=submit]").click()


def test_the_leaderboards_chart_follows_its_period_and_the_page_fits_a_phone(
        live_server, page, dana_with_keys):
    page.set_viewport_size(PHONE)
    staff_sign_in(page, live_server, "/staff/leaderboard")
    expect(page.locator("#leaderboard")).to_contain_text("dana.with.a.rather.long.address")
    for period, days in (("today", 7), ("7d", 7), ("30d", 30), ("all", 90)):
        page.goto(f"{live_server.url}/staff/leaderboard?period={period}&by=tokens")
        chart = page.locator("#trend")
        expect(chart.locator(".chart-days [aria-current=page]")).to_have_text(f"{days} days")
        expect(chart.locator("h2")).to_contain_text(f"{days} days")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (period, width)
        # The board itself fits its column (a card per person), not only the page.
        board = page.evaluate("(() => { const t = document.getElementById('leaderboard');"
                              " return [t.scrollWidth, t.parentElement.clientWidth]; })()")
        assert board[0] <= board[1], (period, board)
    # The chart's own picker keeps the period, and the chart's title says its own.
    page.goto(f"{live_server.url}/staff/leaderboard?period=7d&by=tokens")
    page.locator("#trend .chart-days").get_by_role("link", name="90 days").click()
    expect(page.locator("#trend h2")).to_contain_text("90 days")
    assert "period=7d" in page.url


def test_the_authenticator_qr_code_has_a_sane_size(live_server, page):
    for viewport in ({"width": 1280, "height": 900}, PHONE):
        page.context.clear_cookies()
        Person.objects.filter(email="ops@example.com").delete()
        page.set_viewport_size(viewport)
        staff_sign_in(page, live_server, "/admin/totp/setup/")
        qr = page.locator("svg.totp-qr")
        expect(qr).to_be_visible()
        box = qr.bounding_box()
        assert 200 <= box["width"] <= 256 and abs(box["height"] - box["width"]) < 1, box
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
