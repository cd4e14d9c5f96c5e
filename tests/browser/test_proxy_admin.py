"""In a real browser, as staff signed in with a password: change one proxy setting and one
upstream account through the pages, each through its confirmation, and see the (fake) proxy
changed and no policy violation in the console."""

from __future__ import annotations

from playwright.sync_api import expect

from accounts.models import User
from keyportal.models import AuditEvent

PASSWORD = "a-long-password-1"
CLAUDE_KEY = "sk-ant-browser-secret-key-DDDD4444"


def test_staff_change_a_setting_and_an_upstream_account(live_server, fake_proxy, page):
    User.objects.create_user("ops@example.com", PASSWORD, is_staff=True)
    fake_proxy.providers["claude-api-key"] = [
        {"api-key": CLAUDE_KEY, "base-url": "https://api.anthropic.com", "proxy-url": "",
         "models": [{"name": "claude-sonnet-4", "alias": "sonnet"}]}]
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text or "Refused to" in message.text
            else None)

    page.goto(f"{live_server.url}/staff/proxy/settings")  # to the admin's sign-in first
    page.locator("#id_username").fill("ops@example.com")
    page.locator("#id_password").fill(PASSWORD)
    page.locator("input[type=submit]").click()

    row = page.locator("#setting-request-retry")
    expect(row.locator(".current-value")).to_have_text("3")
    row.locator("input[name=value]").fill("5")
    row.get_by_role("button", name="Change…").click()
    expect(page.locator("#proxy-confirm")).to_contain_text("Request retries")
    assert fake_proxy.settings["request-retry"] == 3  # not before the confirmation
    page.get_by_role("button", name="Yes, change it").click()
    expect(page.locator(".messagelist")).to_contain_text("Request retries is now 5.")
    expect(page.locator("#setting-request-retry .current-value")).to_have_text("5")
    assert fake_proxy.settings["request-retry"] == 5

    page.get_by_role("link", name="Upstream accounts").click()
    entry = page.locator("#upstream-claude-0")
    expect(entry).to_contain_text("…4444")
    entry.get_by_role("link", name="Edit").click()
    page.get_by_label("Proxy URL").fill("http://10.0.0.9:3128")
    page.get_by_label("Models").fill("claude-sonnet-4 = sonnet\nclaude-opus-4 = opus")
    page.get_by_role("button", name="Continue…").click()
    expect(page.locator("#proxy-confirm")).to_contain_text("claude-opus-4=opus")
    page.get_by_role("button", name="Yes, change it").click()
    expect(page.locator(".messagelist")).to_contain_text("changed")
    expect(page.locator("#upstream-claude-0")).to_contain_text("claude-opus-4 → opus")

    changed = fake_proxy.providers["claude-api-key"][0]
    assert changed["proxy-url"] == "http://10.0.0.9:3128" and changed["api-key"] == CLAUDE_KEY
    assert CLAUDE_KEY not in page.content()
    assert list(AuditEvent.objects.exclude(action=AuditEvent.Action.SIGN_IN).order_by("id")
                .values_list("action", flat=True)) == [
        AuditEvent.Action.PROXY_SETTING_CHANGED, AuditEvent.Action.PROXY_UPSTREAM_CHANGED]
    assert problems == []


def test_the_proxy_pages_fit_a_small_phone(live_server, fake_proxy, page):
    User.objects.create_user("ops@example.com", PASSWORD, is_staff=True)
    fake_proxy.providers["openai-compatibility"] = [
        {"name": "a-provider-with-a-rather-long-name-for-a-phone-screen",
         "base-url": "https://llm-gateway.internal.example.com/v1/openai/compatible/endpoint",
         "api-key-entries": [{"api-key": "sk-openai-compatible-secret-EEEE5555"}],
         "models": [{"name": "qwen3-coder-plus-2025-09-23", "alias": "coder"}]}]
    address = "someone.with.a.long.address@example-company.com"
    fake_proxy.add_auth_file(f"claude-{address}.json", {"type": "claude", "email": address})
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{live_server.url}/staff/proxy/settings")
    page.locator("#id_username").fill("ops@example.com")
    page.locator("#id_password").fill(PASSWORD)
    page.locator("input[type=submit]").click()
    expect(page.locator("#setting-request-retry")).to_be_visible()

    for path, shown in (("/staff/proxy/settings", "Request retries"),
                        ("/staff/proxy/upstreams", "a-provider-with-a-rather-long-name"),
                        ("/staff/proxy/auth-files", "someone.with.a.long.address")):
        page.goto(f"{live_server.url}{path}")
        expect(page.locator("#content")).to_contain_text(shown)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, (path, width)
