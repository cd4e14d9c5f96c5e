"""End to end in a real browser: the sign-in page's company-account form, a wrong password
told on the same page, then the right one against Debian's slapd on 127.0.0.1, signed in as
the person it created."""

from __future__ import annotations

from playwright.sync_api import expect

from accounts.models import User
from keyportal.models import AuditEvent
from tests.fakes.slapd import PEOPLE_DN, SERVICE_DN, SERVICE_PASSWORD, running_slapd


def test_sign_in_with_the_company_account_creates_the_person(live_server, settings, page):
    with running_slapd() as directory:
        settings.PORTAL_LDAP_URL = directory.url
        settings.PORTAL_LDAP_BIND_DN = SERVICE_DN
        settings.PORTAL_LDAP_BIND_PASSWORD = SERVICE_PASSWORD
        settings.PORTAL_LDAP_USER_SEARCH_BASE = PEOPLE_DN

        page.goto(f"{live_server.url}/login")
        form = page.locator("form.signin-ldap")
        expect(form.get_by_role("heading", name="Sign in with your company account")).to_be_visible()
        form.get_by_label("Username").fill("ann")
        form.get_by_label("Password").fill("not-her-password")
        form.get_by_role("button", name="Sign in").click()
        expect(page.locator("form.signin-ldap")).to_contain_text(
            "The username or password is wrong.")
        form = page.locator("form.signin-ldap")
        expect(form.get_by_label("Username")).to_have_value("ann")
        expect(form.get_by_label("Password")).to_have_value("")
        expect(form.get_by_label("Password")).to_be_focused()  # not the emailed-link form
        form.get_by_label("Password").fill("ann-secret")
        form.get_by_role("button", name="Sign in").click()

        page.wait_for_url(f"{live_server.url}/my-keys")
        expect(page.locator("body")).to_contain_text("ann.lee@example.com")
        ann = User.objects.get(email="ann.lee@example.com")
        assert AuditEvent.objects.get(actor=ann).after == {"method": "ldap", "provider": "ldap"}

        page.goto(f"{live_server.url}/admin/")  # a person's session: the admin asks again
        expect(page.get_by_label("Password")).to_be_visible()
        assert page.url.startswith(f"{live_server.url}/admin/login/")
