""""Test this key" in a real browser: after adding a key (an htmx swap), the button asks the
(fake) proxy through the portal and lists the models in place, under the page's CSP; the
tool snippets open and close without any script."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from accounts.models import User
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link
from tests.browser.test_csp import _watch


def test_the_button_lists_the_models_in_place(live_server, fake_proxy, settings, page):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    with ProxyClient.from_settings() as client:
        pool_generate(count=3, client=client)
    User.objects.create_user("dana@example.com")
    problems = _watch(page)
    page.goto(f"{live_server.url}/login")
    page.get_by_label("Email address").fill("dana@example.com")
    page.get_by_role("button", name=re.compile("Email me")).click()
    page.goto(emailed_link())
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.locator("#add-form input[name=label]").fill("laptop")
    page.get_by_role("button", name="Add key").click()
    expect(page.locator("#key-value")).to_be_visible()

    codex = page.locator("details.snippet", has_text="Codex CLI")
    expect(codex.locator("#snippet-codex-toml")).to_be_hidden()
    codex.locator("summary").click()
    expect(codex.locator("#snippet-codex-toml")).to_contain_text(f"{fake_proxy.url}/v1")

    url_before = page.url
    page.get_by_role("button", name="Test this key").click()
    result = page.locator("#key-test-result")
    expect(result.get_by_text("mock-gpt", exact=True)).to_be_visible()
    expect(result).to_contain_text("offers 3 models")
    assert page.url == url_before  # swapped in place: the key stays on screen
    expect(page.locator("#key-value")).to_be_visible()
    assert problems == []
