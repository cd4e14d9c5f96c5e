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
