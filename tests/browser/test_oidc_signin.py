"""End to end in a real browser: the sign-in page's button, the provider's own consent page
(oidc-provider-mock on 127.0.0.1), back to the portal signed in as the person it created."""

from __future__ import annotations

from playwright.sync_api import expect

from accounts.models import User
from keyportal.models import AuditEvent
from tests.accounts.test_oidc import CLIENT_ID
from tests.fakes.oidc import mock_provider


def test_sign_in_with_the_company_provider_creates_the_person(live_server, settings, page):
    with mock_provider() as corp:
        settings.SOCIALACCOUNT_PROVIDERS = {
            "openid_connect": {
                **settings.SOCIALACCOUNT_PROVIDERS["openid_connect"],
                "APPS": [{
                    "provider_id": "corp", "name": "Corp ID", "client_id": CLIENT_ID,
                    "secret": "client-secret",
                    "settings": {"server_url": corp.discovery_url},
                }],
            }
        }
        corp.user("sub-jo", email="Jo@Example.com", email_verified=True, name="Jo")

        page.goto(f"{live_server.url}/login")
        page.get_by_role("button", name="Sign in with Corp ID").click()
        expect(page.get_by_role("heading", name="Authorize Client")).to_be_visible()
        assert page.url.startswith(f"{corp.url}/oauth2/authorize?")
        page.get_by_placeholder("sub").fill("sub-jo")
        page.get_by_role("button", name="Authorize").click()

        page.wait_for_url(f"{live_server.url}/my-keys")
        expect(page.locator("body")).to_contain_text("jo@example.com")
        jo = User.objects.get(email="jo@example.com")
        assert AuditEvent.objects.get(actor=jo).after == {"method": "oidc", "provider": "corp"}

        page.goto(f"{live_server.url}/admin/")  # a person's session: the admin asks again
        expect(page.get_by_label("Password")).to_be_visible()
        assert page.url.startswith(f"{live_server.url}/admin/login/")
