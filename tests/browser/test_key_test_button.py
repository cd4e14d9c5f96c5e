""""Test this key" in a real browser: after adding a key (an htmx swap), the button asks the
(fake) proxy through the portal and lists the models in place, under the page's CSP; the
tool snippets open and close without any script."""

from __future__ import annotations

from django.conf import settings as django_settings
from django.test import Client
from playwright.sync_api import expect

from accounts.models import User
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.browser.test_csp import _watch


def _signed_in(page, live_server) -> None:
    """A session made by the test client, handed to the browser: the sign-in flow itself is
    tested elsewhere."""
    client = Client()
    client.force_login(User.objects.create_user("dana@example.com"))
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    page.context.add_cookies([{"name": django_settings.SESSION_COOKIE_NAME, "value": cookie,
                               "url": live_server.url}])


def test_the_button_lists_the_models_in_place(live_server, fake_proxy, settings, page):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    with ProxyClient.from_settings() as proxy:
        pool_generate(count=2, client=proxy)
    _signed_in(page, live_server)
    problems = _watch(page)
    page.goto(f"{live_server.url}/my-keys")
    page.locator("#add-form input[name=label]").fill("laptop")
    page.get_by_role("button", name="Add key").click()  # an htmx swap
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
