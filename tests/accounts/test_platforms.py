"""Sign-in through DingTalk and Feishu against local fakes of their token and user-info
endpoints (tests/fakes/platforms.py), the test client playing the browser; the emailed-link
switch (PORTAL_EMAIL_LINK_SIGNIN) and the staff setting (PORTAL_PROVIDER_OPENS_ADMIN)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
from allauth.socialaccount.models import SocialAccount
from django.conf import settings as django_settings
from django.core import mail
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import Client

from accounts.models import SignInLink, User
from accounts.services import signin_link_send
from keyportal.models import AuditEvent
from tests.fakes.platforms import (
    DINGTALK_ID,
    DINGTALK_SECRET,
    FEISHU_ID,
    FEISHU_SECRET,
    FakePlatforms,
    fake_platforms,
)

pytestmark = pytest.mark.django_db
Action = AuditEvent.Action


@pytest.fixture(scope="module")
def fake() -> Iterator[FakePlatforms]:
    with fake_platforms() as running:
        yield running


@pytest.fixture
def platforms(settings, fake) -> FakePlatforms:
    """DingTalk and Feishu on, both pointed at the fake."""
    providers = dict(django_settings.SOCIALACCOUNT_PROVIDERS)
    providers["dingtalk"] = {**providers["dingtalk"],
                             "APPS": [{"client_id": DINGTALK_ID, "secret": DINGTALK_SECRET}]}
    providers["feishu"] = {**providers["feishu"],
                           "APPS": [{"client_id": FEISHU_ID, "secret": FEISHU_SECRET}]}
    settings.SOCIALACCOUNT_PROVIDERS = providers
    settings.PORTAL_DINGTALK_LOGIN_URL = fake.url
    settings.PORTAL_DINGTALK_API_URL = fake.url
    settings.PORTAL_DINGTALK_OAPI_URL = fake.url
    settings.PORTAL_FEISHU_URL = fake.url
    return fake


def sign_in(client: Client, fake: FakePlatforms, platform: str, **person):
    """The button, consent at the platform as `person`, back to the portal."""
    started = client.post(f"/auth/{platform}/login/")
    assert started.status_code == 302, started.content
    back = urlparse(fake.consent(started["Location"], **person))
    assert back.path == f"/auth/{platform}/login/callback/"
    return client.get(f"{back.path}?{back.query}")


def signed_in_as(client: Client) -> User | None:
    user_id = client.session.get("_auth_user_id")
    return User.objects.filter(pk=user_id).first() if user_id else None


def feishu_person(**fields):
    return {"open_id": "ou_ann", "union_id": "on_ann", "user_id": "ann01", "name": "安",
            "en_name": "Ann", "tenant_key": "736588c9260f175d", **fields}


def dingtalk_person(org_email: str | None = None, member: bool = True, **fields):
    """contact/users/me's fields, and under "org" the organisation's directory entry."""
    org = {"userid": "manager4220", "name": "Bo Li", "active": True, "email": "bo@gmail.com",
           "org_email": org_email} if member else None
    return {"openId": "oid-bo", "unionId": "uid-bo", "nick": "Bo", "stateCode": "86",
            "org": org, **fields}


# --- Feishu -----------------------------------------------------------------------------------


def test_feishu_first_sign_in_creates_the_person_from_the_enterprise_email(client, platforms):
    response = sign_in(client, platforms, "feishu",
                       **feishu_person(enterprise_email="Ann@Example.com",
                                       email="ann.private@gmail.com"))
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    ann = User.objects.get()
    assert ann.email == "ann@example.com" and ann.name == "安"
    assert signed_in_as(client) == ann
    link = SocialAccount.objects.get(user=ann)
    assert (link.provider, link.uid) == ("feishu", "ou_ann")
    row = AuditEvent.objects.get(action=Action.SIGN_IN)
    assert row.after == {"method": "feishu", "provider": "feishu"} and row.actor == ann
    # The documented calls, in order: app token, user token (with it), user info.
    assert [p for _, p in platforms.requests[-3:]] == [
        "/open-apis/auth/v3/app_access_token/internal", "/open-apis/authen/v1/access_token",
        "/open-apis/authen/v1/user_info"]


def test_feishu_second_sign_in_finds_the_same_person(client, platforms):
    sign_in(client, platforms, "feishu", **feishu_person(enterprise_email="ann@example.com"))
    other = Client()
    assert sign_in(other, platforms, "feishu",
                   **feishu_person(enterprise_email="ann@example.com")).status_code == 303
    assert signed_in_as(other) == signed_in_as(client) is not None
    assert User.objects.count() == 1 and SocialAccount.objects.count() == 1


def test_feishu_directory_email_alone_is_refused_unless_trusted(client, platforms, settings):
    person = feishu_person(email="ann@example.com")  # no company mailbox
    response = sign_in(client, platforms, "feishu", **person)
    assert response.status_code == 403
    assert "gave no company email address" in response.content.decode()
    assert not User.objects.exists() and signed_in_as(client) is None
    assert AuditEvent.objects.get(action=Action.SIGN_IN_REFUSED).after["provider"] == "feishu"
    settings.PORTAL_FEISHU_TRUST_EMAIL = True
    assert sign_in(client, platforms, "feishu", **person).status_code == 303
    assert signed_in_as(client).email == "ann@example.com"


def test_feishu_address_at_another_domain_is_refused(client, platforms, settings):
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["example.com"]
    response = sign_in(client, platforms, "feishu",
                       **feishu_person(enterprise_email="ann@elsewhere.com"))
    assert response.status_code == 403
    assert "Only addresses at example.com" in response.content.decode()
    assert not User.objects.exists()


@pytest.mark.parametrize("path, fault", [
    ("/open-apis/authen/v1/user_info", "500"),
    ("/open-apis/authen/v1/access_token", "malformed"),
    ("/open-apis/auth/v3/app_access_token/internal", "500"),
])
def test_feishu_error_answers_are_a_sentence_not_a_server_error(client, platforms, path, fault):
    platforms.inject(path, fault)
    response = sign_in(client, platforms, "feishu",
                       **feishu_person(enterprise_email="ann@example.com"))
    assert response.status_code == 403
    assert "The sign-in with Feishu did not complete" in response.content.decode()
    assert not User.objects.exists() and signed_in_as(client) is None
    assert AuditEvent.objects.filter(action=Action.SIGN_IN_REFUSED).count() == 1


def test_feishu_refusing_the_app_secret_is_a_sentence(client, platforms, settings):
    providers = dict(settings.SOCIALACCOUNT_PROVIDERS)
    providers["feishu"] = {**providers["feishu"],
                           "APPS": [{"client_id": FEISHU_ID, "secret": "wrong"}]}
    settings.SOCIALACCOUNT_PROVIDERS = providers
    response = sign_in(client, platforms, "feishu",
                       **feishu_person(enterprise_email="ann@example.com"))
    assert response.status_code == 403 and not User.objects.exists()
    row = AuditEvent.objects.get(action=Action.SIGN_IN_REFUSED)
    assert "10014" in row.detail and "wrong" not in row.detail


def test_lark_is_named_lark(client, platforms, settings):
    settings.PORTAL_FEISHU_URL = platforms.url + "/larksuite"  # only the name is looked at
    response = client.get("/login")
    page = response.content.decode()
    assert "Sign in with Lark" in page and "Sign in with Feishu" not in page
    policy = response["Content-Security-Policy"]  # the origin only, never a path
    assert f"{platforms.url} " in policy + " " and "/larksuite" not in policy


# --- DingTalk ---------------------------------------------------------------------------------


def test_dingtalk_first_sign_in_creates_the_person_from_the_company_mailbox(client, platforms):
    response = sign_in(client, platforms, "dingtalk",
                       **dingtalk_person(org_email="Bo@Example.com", email="bo@gmail.com"))
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    bo = User.objects.get()
    assert (bo.email, bo.name) == ("bo@example.com", "Bo Li") and signed_in_as(client) == bo
    link = SocialAccount.objects.get(user=bo)
    assert link.provider == "dingtalk" and link.uid == "oid-bo"
    assert link.extra_data["org"]["userid"] == "manager4220"
    assert AuditEvent.objects.get(action=Action.SIGN_IN).after == {
        "method": "dingtalk", "provider": "dingtalk"}
    assert [p for _, p in platforms.requests[-5:]] == [
        "/v1.0/oauth2/userAccessToken", "/v1.0/contact/users/me", "/v1.0/oauth2/accessToken",
        "/topapi/user/getbyunionid", "/topapi/v2/user/get"]


def test_dingtalk_someone_outside_the_organisation_is_refused(client, platforms, settings):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True  # and has no address of their own either
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person(member=False))
    assert response.status_code == 403
    assert "gave no company email address" in response.content.decode()
    assert not User.objects.exists()


def test_dingtalk_without_the_directory_permission_is_a_sentence(client, platforms):
    platforms.directory_errcode = 60011
    try:
        response = sign_in(client, platforms, "dingtalk",
                           **dingtalk_person(org_email="bo@example.com"))
    finally:
        platforms.directory_errcode = 0
    assert response.status_code == 403
    assert "The sign-in with DingTalk did not complete" in response.content.decode()
    row = AuditEvent.objects.get(action=Action.SIGN_IN_REFUSED)
    assert "errcode 60011" in row.detail and "access_token" not in row.detail
    assert not User.objects.exists()



def test_dingtalk_sign_in_creates_then_finds_the_person_when_its_email_is_trusted(
        client, platforms, settings):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person(email="Bo@example.com"))
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    bo = User.objects.get()
    assert bo.email == "bo@example.com" and bo.name == "Bo Li" and signed_in_as(client) == bo
    assert SocialAccount.objects.get(user=bo).uid == "oid-bo"
    other = Client()
    assert sign_in(other, platforms, "dingtalk",
                   **dingtalk_person(email="bo@example.com")).status_code == 303
    assert signed_in_as(other) == bo and User.objects.count() == 1
    rows = AuditEvent.objects.filter(action=Action.SIGN_IN)
    assert [r.after for r in rows] == [{"method": "dingtalk", "provider": "dingtalk"}] * 2


def test_dingtalk_email_is_not_trusted_by_default(client, platforms):
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person(email="bo@example.com"))
    assert response.status_code == 403
    assert "gave no company email address" in response.content.decode()
    assert not User.objects.exists() and not SocialAccount.objects.exists()


def test_dingtalk_without_an_email_is_refused(client, platforms, settings):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person())
    assert response.status_code == 403
    assert "gave no company email address" in response.content.decode()
    assert not User.objects.exists()
    assert AuditEvent.objects.get(action=Action.SIGN_IN_REFUSED).detail == (
        "dingtalk: no trusted email address")


def test_dingtalk_other_domain_is_refused(client, platforms, settings):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["example.com"]
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person(email="bo@gmail.com"))
    assert response.status_code == 403 and not User.objects.exists()


@pytest.mark.parametrize("path, fault", [
    ("/v1.0/oauth2/userAccessToken", "500"),
    ("/v1.0/oauth2/userAccessToken", "malformed"),
    ("/v1.0/contact/users/me", "malformed"),
    ("/topapi/v2/user/get", "500"),
])
def test_dingtalk_error_answers_are_a_sentence(client, platforms, settings, path, fault):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True
    platforms.inject(path, fault)
    response = sign_in(client, platforms, "dingtalk", **dingtalk_person(email="bo@example.com"))
    assert response.status_code == 403
    assert "The sign-in with DingTalk did not complete" in response.content.decode()
    assert not User.objects.exists()


def test_a_replayed_dingtalk_callback_is_refused(client, platforms, settings):
    settings.PORTAL_DINGTALK_TRUST_EMAIL = True
    started = client.post("/auth/dingtalk/login/")
    back = urlparse(platforms.consent(started["Location"], **dingtalk_person(email="bo@x.com")))
    assert client.get(f"{back.path}?{back.query}").status_code == 303
    client.logout()
    assert client.get(f"{back.path}?{back.query}").status_code == 403  # state used up
    assert User.objects.count() == 1


# --- the pages --------------------------------------------------------------------------------


def test_the_sign_in_page_shows_the_platforms_in_both_languages(client, platforms):
    page = client.get("/login")
    html = page.content.decode()
    assert 'action="/auth/dingtalk/login/"' in html and "Sign in with DingTalk" in html
    assert 'action="/auth/feishu/login/"' in html and "Sign in with Feishu" in html
    assert platforms.url in page["Content-Security-Policy"]  # form-action to the platforms
    zh = client.get("/login", HTTP_ACCEPT_LANGUAGE="zh-Hans").content.decode()
    assert "使用 钉钉 登录" in zh and "使用 飞书 登录" in zh


def test_the_buttons_are_gone_and_the_addresses_404_when_off(client):
    html = client.get("/login").content.decode()
    assert "dingtalk" not in html and "feishu" not in html
    assert client.post("/auth/dingtalk/login/").status_code == 404
    assert client.post("/auth/feishu/login/").status_code == 404
    assert client.get("/auth/feishu/login/").status_code == 405  # a button's POST only


# --- the emailed link switch (PORTAL_EMAIL_LINK_SIGNIN) -----------------------------------


def _link(purpose: str, email: str) -> str:
    urls: dict[str, str] = {}
    signin_link_send(email=email, purpose=purpose,
                     link_url=lambda p, token: urls.setdefault("url", f"/x/{token}"),
                     register_url="/register", login_url="/login")
    return urls["url"].rsplit("/", 1)[1]


def test_links_off_shows_only_the_providers_and_refuses_links(client, platforms, settings):
    User.objects.create_user("cy@example.com")
    login_token = _link(SignInLink.Purpose.LOGIN, "cy@example.com")
    register_token = _link(SignInLink.Purpose.REGISTER, "dee@example.com")
    mail.outbox.clear()
    settings.PORTAL_EMAIL_LINK_SIGNIN = False
    for page in ("/login", "/register"):
        html = client.get(page).content.decode()
        assert 'name="email"' not in html and "Email me" not in html
        assert "Sign in with DingTalk" in html and "Sign in with Feishu" in html
        refused = client.post(page, {"email": "dee@example.com", "label": "x"})
        assert refused.status_code == 403
    assert mail.outbox == []
    assert client.get(f"/login/{login_token}").status_code == 404
    assert client.post(f"/login/{login_token}").status_code == 404
    assert client.post(f"/register/{register_token}").status_code == 404
    assert signed_in_as(client) is None
    # The providers still work.
    assert sign_in(client, platforms, "feishu",
                   **feishu_person(enterprise_email="ann@example.com")).status_code == 303
    settings.PORTAL_EMAIL_LINK_SIGNIN = True  # the same link works again once links are on
    assert client.get(f"/login/{login_token}").status_code == 200


def test_links_off_without_a_provider_is_a_system_check_error(settings, platforms):
    settings.PORTAL_EMAIL_LINK_SIGNIN = False
    call_command("check")  # a provider is on: fine
    settings.SOCIALACCOUNT_PROVIDERS = django_settings.SOCIALACCOUNT_PROVIDERS | {
        "dingtalk": {"APPS": []}, "feishu": {"APPS": []},
        "openid_connect": {"APPS": []}}
    with pytest.raises(SystemCheckError, match="keyportal.E018"):
        call_command("check")
    settings.PORTAL_EMAIL_LINK_SIGNIN = True
    call_command("check")


# --- staff (PORTAL_PROVIDER_OPENS_ADMIN) ----------------------------------------------------


@pytest.mark.parametrize("opens", [False, True])
def test_a_provider_sign_in_opens_the_admin_for_staff_only_with_the_setting(
        client, platforms, settings, opens):
    settings.PORTAL_PROVIDER_OPENS_ADMIN = opens
    User.objects.create_user("ann@example.com", is_staff=True, is_superuser=True)
    sign_in(client, platforms, "feishu", **feishu_person(enterprise_email="ann@example.com"))
    admin = client.get("/admin/")
    if opens:
        assert admin.status_code == 200
        assert client.session.get_expiry_age() == settings.PORTAL_STAFF_SESSION_SECONDS
    else:
        assert admin.status_code == 302 and "/admin/login/" in admin["Location"]
        assert "need your password" in client.get(admin["Location"]).content.decode()


def test_the_setting_opens_nothing_for_people_who_are_not_staff(client, platforms, settings):
    settings.PORTAL_PROVIDER_OPENS_ADMIN = True
    sign_in(client, platforms, "feishu", **feishu_person(enterprise_email="ann@example.com"))
    assert signed_in_as(client) is not None
    admin = client.get("/admin/")
    assert admin.status_code == 302 and "/admin/login/" in admin["Location"]


def test_staff_see_the_platform_a_person_signs_in_with(client, platforms, admin_client, settings):
    sign_in(client, platforms, "feishu", **feishu_person(enterprise_email="ivy@example.com"))
    ivy = User.objects.get(email="ivy@example.com")
    page = admin_client.get(f"/admin/accounts/user/{ivy.pk}/change/").content.decode()
    assert "Feishu (subject ou_ann, last " in page and "emailed link" in page
    assert "ivy@example.com" in admin_client.get(
        "/admin/accounts/user/?provider=feishu").content.decode()
    assert "ivy@example.com" not in admin_client.get(
        "/admin/accounts/user/?provider=dingtalk").content.decode()
    settings.PORTAL_EMAIL_LINK_SIGNIN = False  # then not a method anyone has
    page = admin_client.get(f"/admin/accounts/user/{ivy.pk}/change/").content.decode()
    assert "Feishu (subject ou_ann, last " in page and "emailed link" not in page


def test_the_platforms_codes_and_app_secrets_never_reach_the_log(settings):
    from keyportal.logging import redact

    settings.PORTAL_DINGTALK_CLIENT_SECRET = "ding-secret-value-123"
    settings.PORTAL_FEISHU_APP_SECRET = "feishu-secret-value-456"
    line = ("GET /auth/dingtalk/login/callback/?authCode=abcdef123456&state=XyZ987 "
            "GET /auth/feishu/login/callback/?code=fei789code&state=Q1 "
            "app_secret=feishu-secret-value-456 clientSecret=ding-secret-value-123")
    cleaned = redact(line)
    for secret in ("abcdef123456", "XyZ987", "fei789code", "feishu-secret-value-456",
                   "ding-secret-value-123"):
        assert secret not in cleaned
    assert "/auth/dingtalk/login/callback/?authCode=[redacted]&state=[redacted]" in cleaned


@pytest.mark.parametrize("links, advice", [(True, "Sign in with an emailed link"),
                                           (False, "Ask your administrator")])
def test_a_full_mailbox_is_refused_with_advice_that_fits(client, platforms, settings, links,
                                                         advice):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = False
    User.objects.create_user("ann+old@example.com")  # stored before folding was on
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    settings.PORTAL_EMAIL_LINK_SIGNIN = links
    # Feishu's company mailbox with a +tag the portal has never seen: a second person.
    response = sign_in(client, platforms, "feishu",
                       **feishu_person(enterprise_email="ann+new@example.com"))
    assert response.status_code == 403
    html = response.content.decode()
    assert "This mailbox already has an account" in html and advice in html
    assert User.objects.count() == 1
