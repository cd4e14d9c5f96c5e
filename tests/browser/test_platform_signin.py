"""End to end in a real browser: the sign-in page's DingTalk and Feishu buttons lead to the
platform (the form-action policy lets the button's redirect through) and back, signed in as
the person the platform vouched for (tests/fakes/platforms.py)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from accounts.models import User
from tests.accounts.test_platforms import dingtalk_person, feishu_person
from tests.fakes.platforms import (
    DINGTALK_ID,
    DINGTALK_SECRET,
    FEISHU_ID,
    FEISHU_SECRET,
    fake_platforms,
)


@pytest.mark.parametrize("button, person, email", [
    ("Sign in with DingTalk", dingtalk_person(org_email="Jo@Example.com"), "jo@example.com"),
    ("Sign in with Feishu", feishu_person(enterprise_email="Lu@Example.com"), "lu@example.com"),
])
def test_sign_in_with_a_platform_creates_the_person(live_server, settings, page, button, person,
                                                    email):
    with fake_platforms() as fake:
        providers = dict(settings.SOCIALACCOUNT_PROVIDERS)
        providers["dingtalk"] = {**providers["dingtalk"],
                                 "APPS": [{"client_id": DINGTALK_ID, "secret": DINGTALK_SECRET}]}
        providers["feishu"] = {**providers["feishu"],
                               "APPS": [{"client_id": FEISHU_ID, "secret": FEISHU_SECRET}]}
        settings.SOCIALACCOUNT_PROVIDERS = providers
        settings.PORTAL_DINGTALK_LOGIN_URL = settings.PORTAL_DINGTALK_API_URL = fake.url
        settings.PORTAL_DINGTALK_OAPI_URL = settings.PORTAL_FEISHU_URL = fake.url
        settings.PORTAL_EMAIL_LINK_SIGNIN = False  # the buttons are the only way in
        fake.browser_person = person

        page.goto(f"{live_server.url}/login")
        expect(page.get_by_label("Email")).to_have_count(0)
        page.get_by_role("button", name=button).click()
        page.wait_for_url(f"{live_server.url}/my-keys")
        expect(page.locator("body")).to_contain_text(email)
        assert User.objects.filter(email=email).exists()
