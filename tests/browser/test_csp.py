"""The Content-Security-Policy in a real browser: the people's pages (with htmx swaps), the
admin and the staff pages run without a single violation in the console."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from accounts.models import User
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link

PASSWORD = "a-long-password-1"


def _watch(page) -> list[str]:
    problems: list[str] = []
    # Chromium reports each violation in the console ("Refused to ... because it violates
    # the following Content Security Policy directive"); a missing favicon is no concern.
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text or "Refused to" in message.text
            else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return problems


def test_people_pages_run_without_policy_violations(live_server, fake_proxy, settings, page):
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
    expect(page.get_by_role("heading", name="My keys")).to_be_visible()
    page.locator("#add-form input[name=label]").fill("laptop")
    page.get_by_role("button", name="Add key").click()  # an htmx swap
    expect(page.locator("#key-value")).to_be_visible()
    page.goto(f"{live_server.url}/my-keys")
    page.locator("a[href^='/my-keys/']").first.click()  # the key's usage page with its bars
    page.wait_for_load_state()
    assert problems == []


def test_admin_and_staff_pages_run_without_policy_violations(live_server, page):
    User.objects.create_superuser("boss@example.com", PASSWORD)
    problems = _watch(page)
    page.goto(f"{live_server.url}/admin/login/")
    page.locator("#id_username").fill("boss@example.com")
    page.locator("#id_password").fill(PASSWORD)
    page.locator("input[type=submit]").click()
    expect(page.locator("#site-name")).to_be_visible()
    for path in ["/admin/", "/admin/pool/apikey/", "/admin/usage/syncrun/",
                 "/admin/accounts/user/", "/admin/accounts/user/add/",
                 "/admin/accounts/apitoken/add/", "/staff/leaderboard", "/staff/proxy",
                 "/staff/export"]:
        page.goto(f"{live_server.url}{path}")
        page.wait_for_load_state("load")
    page.locator("#toggle-nav-sidebar").first.click() if page.locator(
        "#toggle-nav-sidebar").count() else None
    assert problems == []
