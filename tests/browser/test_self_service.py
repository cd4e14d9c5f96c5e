"""End to end in a real browser: register, follow the emailed link, get a key that works at
the (fake) proxy, revoke it in place, and see the proxy refuse it."""

from __future__ import annotations

import re

import requests
from playwright.sync_api import expect

from pool.models import ApiKey, key_digest
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link


def status_at_proxy(proxy, value: str) -> int:
    return requests.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {value}"},
        timeout=5,
    ).status_code


def test_register_get_a_working_key_and_revoke_it(live_server, fake_proxy, settings, page):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    fake_proxy.api_keys = ["operator-own-key"]
    with ProxyClient.from_settings() as client:
        pool_generate(count=3, client=client)

    page.goto(f"{live_server.url}/register")
    page.get_by_label("Email address").fill("Dana@Example.com")
    page.get_by_label("Your name").fill("Dana")
    page.get_by_label("Key label").fill("laptop")
    page.get_by_role("button", name="Email me the link").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()

    page.goto(emailed_link())
    expect(page.get_by_role("heading", name="Confirm your registration")).to_be_visible()
    page.get_by_role("button", name="Sign in and show my key").click()
    expect(page.get_by_role("heading", name=re.compile("Your new key"))).to_be_visible()

    value = page.locator("#key-value").inner_text().strip()
    key = ApiKey.objects.get(owner__email="dana@example.com")
    assert key_digest(value) == key.key_hash and key.label == "laptop"
    assert f"ANTHROPIC_AUTH_TOKEN={value}" in page.locator("#snippet-claude-env").inner_text()
    assert status_at_proxy(fake_proxy, value) == 200

    page.get_by_role("link", name="Go to my keys").click()
    row = page.locator(f"#key-{key.pk}")
    expect(row).to_contain_text("laptop")
    assert value not in page.content()  # shown once: the list has only the masked form
    row.get_by_role("link", name=re.compile("Revoke")).click()
    expect(row).to_contain_text("cannot be brought back")  # htmx swapped in the confirm row
    assert page.url.endswith("/my-keys")  # in place, no navigation
    row.get_by_role("button", name="Yes, revoke").click()
    expect(row.locator(".status")).to_have_text("revoked")

    key.refresh_from_db()
    assert key.status == ApiKey.Status.REVOKED
    assert key.proxy_state == ApiKey.ProxyState.REMOVED
    assert value not in fake_proxy.api_keys and "operator-own-key" in fake_proxy.api_keys
    assert status_at_proxy(fake_proxy, value) == 401
