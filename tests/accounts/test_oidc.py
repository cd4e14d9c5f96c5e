"""Sign-in through an OpenID Connect provider: a real one (oidc-provider-mock) on 127.0.0.1,
the portal's test client playing the browser. The identity is the provider's verified email,
folded and checked against the allow-list as an emailed link's; the session it opens is a
person's, never the admin's; every sign-in and every refusal is audited with its method."""

from __future__ import annotations

import types
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
from allauth.socialaccount.models import SocialAccount
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings as django_settings
from django.test import Client

from accounts import oidc as portal_oidc
from accounts.models import LimitDefaults, User
from accounts.signin import staff_with_password
from keyportal.models import AuditEvent
from tests.fakes.oidc import MockProvider, mock_provider

pytestmark = pytest.mark.django_db
CLIENT_ID = "key-portal"
LOGIN = "/auth/oidc/corp/login/"
CALLBACK = "/auth/oidc/corp/login/callback/"


@pytest.fixture(scope="module")
def provider() -> Iterator[MockProvider]:
    with mock_provider() as running:
        yield running


@pytest.fixture
def corp(settings, provider) -> MockProvider:
    """The portal with one OpenID Connect provider on, as the environment would set it."""
    settings.SOCIALACCOUNT_PROVIDERS = {
        "openid_connect": {
            **django_settings.SOCIALACCOUNT_PROVIDERS["openid_connect"],
            "APPS": [{
                "provider_id": "corp", "name": "Corp ID", "client_id": CLIENT_ID,
                "secret": "client-secret", "settings": {"server_url": provider.discovery_url},
            }],
        }
    }
    return provider


def start(client: Client) -> str:
    """Presses the sign-in page's button; returns the provider's authorization address."""
    response = client.post(LOGIN)
    assert response.status_code == 302, response.content
    return response["Location"]


def sign_in(client: Client, corp: MockProvider, sub: str):
    """The whole round trip: button, consent at the provider as `sub`, back to the portal."""
    back = urlparse(corp.sign_in_at(start(client), sub))
    assert back.path == CALLBACK
    return client.get(f"{back.path}?{back.query}")


def signed_in_as(client: Client) -> User | None:
    user_id = client.session.get("_auth_user_id")
    return User.objects.filter(pk=user_id).first() if user_id else None


def test_the_first_sign_in_creates_the_person_with_the_defaults_for_new_people(client, corp):
    LimitDefaults.objects.create(id=1, limit_tokens_day=12345)
    corp.user("sub-ann", email="Ann@Example.com", email_verified=True, name="Ann Lee")
    response = sign_in(client, corp, "sub-ann")
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    ann = User.objects.get(email="ann@example.com")
    assert signed_in_as(client) == ann
    assert ann.name == "Ann Lee" and ann.limit_tokens_day == 12345
    assert not ann.has_usable_password() and not ann.is_staff
    link = SocialAccount.objects.get(user=ann)
    assert (link.provider, link.uid) == ("corp", "sub-ann")
    assert client.get("/my-keys").status_code == 200
    row = AuditEvent.objects.get(action=AuditEvent.Action.SIGN_IN)
    assert row.actor == ann and row.after == {"method": "oidc", "provider": "corp"}
    assert row.detail == "oidc: Corp ID" and row.ip == "127.0.0.1"


def test_a_second_sign_in_finds_the_same_person(client, corp):
    corp.user("sub-bo", email="bo@example.com", email_verified=True)
    sign_in(client, corp, "sub-bo")
    first = signed_in_as(client)
    other = Client()
    assert sign_in(other, corp, "sub-bo").status_code == 303
    assert signed_in_as(other) == first
    assert User.objects.count() == 1 and SocialAccount.objects.count() == 1
    assert AuditEvent.objects.filter(action=AuditEvent.Action.SIGN_IN, actor=first).count() == 2


def test_a_person_who_registered_by_email_is_found_and_linked_folded(client, corp, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    cy = User.objects.create_user("cy@example.com")
    corp.user("sub-cy", email="CY+laptop@example.com", email_verified=True)
    assert sign_in(client, corp, "sub-cy").status_code == 303
    assert signed_in_as(client) == cy
    assert User.objects.count() == 1
    assert SocialAccount.objects.get(provider="corp", uid="sub-cy").user == cy


@pytest.mark.parametrize("claims", [
    {"email": "dee@example.com", "email_verified": False},
    {"email": "dee@example.com"},  # the provider says nothing about verification
    {"email_verified": True},  # no address at all
])
def test_an_unverified_or_missing_email_is_refused_and_nothing_is_created(client, corp, claims):
    corp.user("sub-dee", **claims)
    response = sign_in(client, corp, "sub-dee")
    assert response.status_code == 403
    assert "did not confirm that this email address is yours" in response.content.decode()
    assert signed_in_as(client) is None
    assert not User.objects.exists() and not SocialAccount.objects.exists()
    refused = AuditEvent.objects.get()
    assert refused.action == AuditEvent.Action.SIGN_IN_REFUSED
    assert refused.detail == "corp: email missing or not verified"


def test_an_address_outside_the_allowed_domains_is_refused(client, corp, settings):
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["example.com"]
    corp.user("sub-eve", email="eve@elsewhere.org", email_verified=True)
    response = sign_in(client, corp, "sub-eve")
    assert response.status_code == 403
    assert "Only addresses at example.com can use this portal." in response.content.decode()
    assert not User.objects.exists() and not SocialAccount.objects.exists()
    refused = AuditEvent.objects.get(action=AuditEvent.Action.SIGN_IN_REFUSED)
    assert refused.target_label == "eve@elsewhere.org" and "domain not allowed" in refused.detail


def test_a_deactivated_person_cannot_sign_in(client, corp):
    fay = User.objects.create_user("fay@example.com", is_active=False)
    corp.user("sub-fay", email="fay@example.com", email_verified=True)
    response = sign_in(client, corp, "sub-fay")
    assert response.status_code == 403
    assert "This account is deactivated." in response.content.decode()
    assert signed_in_as(client) is None and not SocialAccount.objects.exists()
    assert AuditEvent.objects.get().target_id == str(fay.pk)


def test_a_provider_sign_in_is_a_persons_session_and_does_not_open_the_admin(client, corp):
    boss = User.objects.create_superuser("boss@example.com", "a-long-password-1")
    corp.user("sub-boss", email="boss@example.com", email_verified=True)
    assert sign_in(client, corp, "sub-boss").status_code == 303
    assert signed_in_as(client) == boss
    for page in ("/admin/", "/staff/leaderboard"):
        response = client.get(page)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    page = client.get("/admin/login/?next=/admin/")
    assert "You signed in with your company account" in page.content.decode()
    request = types.SimpleNamespace(user=boss, session=client.session)
    assert staff_with_password(request) is False


# --- the id_token's checks: each tampered token passes every check but one -----------------


@pytest.fixture
def tamper(monkeypatch):
    """Replaces the id_token in the provider's token answer, as an attacker between the portal
    and the provider (or a provider-side bug) would: `tamper(change)` with change(id_token,
    nonce) -> the id_token the portal receives."""
    def install(change):
        original = portal_oidc.PortalOIDCAdapter.get_access_token_data

        def substituted(self, request, app, client, pkce_code_verifier=None):
            data = original(self, request, app, client, pkce_code_verifier=pkce_code_verifier)
            return {**data, "id_token": change(data["id_token"], self.expected_nonce)}

        monkeypatch.setattr(portal_oidc.PortalOIDCAdapter, "get_access_token_data", substituted)
    return install


def resigned_with_another_key(id_token: str, nonce: str) -> str:
    """The same claims and key id, signed with a key that is not the provider's."""
    claims = jwt.decode(id_token, options={"verify_signature": False})
    header = jwt.get_unverified_header(id_token)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = {"kid": header["kid"]} if "kid" in header else {}
    return jwt.encode(claims, forger, algorithm="RS256", headers=kid)


def tokens(corp: MockProvider):
    """The three substitutions, by the check that must stop each."""
    return {
        "signature": resigned_with_another_key,
        # Genuinely signed by the provider, with this sign-in's nonce, for another client.
        "audience": lambda _token, nonce: corp.id_token_for(
            client_id="another-app", sub="sub-gil", nonce=nonce),
        # Genuinely signed by the provider for the portal, from another sign-in (a replay).
        "nonce": lambda _token, _nonce: corp.id_token_for(
            client_id=CLIENT_ID, sub="sub-gil", nonce="the-nonce-of-another-sign-in"),
    }


def skip_check(monkeypatch, check: str) -> None:
    """Turns off exactly one of the portal's checks (for the control runs)."""
    if check == "nonce":
        monkeypatch.setattr(portal_oidc, "hmac",
                            types.SimpleNamespace(compare_digest=lambda a, b: True))
        return
    real = jwt.decode

    def lenient(token, *args, options=None, **kwargs):
        options = {**(options or {}), {"signature": "verify_signature",
                                       "audience": "verify_aud"}[check]: False}
        return real(token, *args, options=options, **kwargs)

    monkeypatch.setattr(portal_oidc.jwt, "decode", lenient)


@pytest.mark.parametrize("check", ["signature", "audience", "nonce"])
def test_a_tampered_id_token_is_refused(client, corp, tamper, check):
    corp.user("sub-gil", email="gil@example.com", email_verified=True)
    tamper(tokens(corp)[check])
    response = sign_in(client, corp, "sub-gil")
    assert response.status_code == 403
    assert "did not complete" in response.content.decode()
    assert signed_in_as(client) is None
    assert not User.objects.exists() and not SocialAccount.objects.exists()
    refused = AuditEvent.objects.get()
    assert refused.action == AuditEvent.Action.SIGN_IN_REFUSED
    assert refused.detail.startswith("corp: ")


@pytest.mark.parametrize("check", ["signature", "audience", "nonce"])
def test_without_that_one_check_the_tampered_id_token_would_sign_in(
    client, corp, tamper, monkeypatch, check
):
    """The control for the test above: each substituted token fails only its own check."""
    corp.user("sub-gil", email="gil@example.com", email_verified=True)
    tamper(tokens(corp)[check])
    skip_check(monkeypatch, check)
    assert sign_in(client, corp, "sub-gil").status_code == 303
    assert signed_in_as(client) == User.objects.get(email="gil@example.com")


def test_a_callback_without_the_sessions_state_is_refused(client, corp):
    corp.user("sub-hal", email="hal@example.com", email_verified=True)
    back = urlparse(corp.sign_in_at(start(client), "sub-hal"))
    # Another browser (an attacker's link) brings the code back: no state in its session.
    response = Client().get(f"{back.path}?{back.query}")
    assert response.status_code == 403 and not User.objects.exists()
    assert AuditEvent.objects.get().action == AuditEvent.Action.SIGN_IN_REFUSED


def test_the_authorization_request_carries_a_nonce_and_pkce(client, corp):
    query = parse_qs(urlparse(start(client)).query)
    assert len(query["nonce"][0]) >= 32 and query["code_challenge_method"] == ["S256"]
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == [f"http://testserver{CALLBACK}"]


def test_starting_a_sign_in_needs_a_post(client, corp):
    assert client.get(LOGIN).status_code == 405


def test_an_unknown_provider_is_not_found(client, corp):
    assert client.post("/auth/oidc/nobody/login/").status_code == 404


# --- the sign-in page ------------------------------------------------------------------------


def test_the_sign_in_page_offers_the_provider_in_both_languages(client, corp):
    page = client.get("/login").content.decode()
    assert "Sign in with Corp ID" in page and f'action="{LOGIN}"' in page
    client.cookies["django_language"] = "zh-hans"
    assert "使用 Corp ID 登录" in client.get("/login").content.decode()


def test_without_a_provider_the_sign_in_page_has_no_button_and_the_paths_are_gone(client):
    assert django_settings.SOCIALACCOUNT_PROVIDERS["openid_connect"]["APPS"] == []
    assert "Sign in with" not in client.get("/login").content.decode()
    assert client.post("/auth/oidc/oidc/login/").status_code == 404


def test_allauths_own_account_pages_are_not_mounted(client):
    for path in ("/accounts/login/", "/accounts/signup/", "/auth/signup/", "/auth/login/"):
        assert client.get(path).status_code == 404


def test_staff_see_which_provider_a_person_signs_in_with(client, corp, admin_client):
    corp.user("sub-ivy", email="ivy@example.com", email_verified=True)
    sign_in(client, corp, "sub-ivy")
    ivy = User.objects.get(email="ivy@example.com")
    page = admin_client.get(f"/admin/accounts/user/{ivy.pk}/change/").content.decode()
    assert "Corp ID (subject sub-ivy, last " in page
    listed = admin_client.get("/admin/accounts/user/?provider=corp").content.decode()
    assert "ivy@example.com" in listed
    unlinked = admin_client.get("/admin/accounts/user/?provider=none").content.decode()
    assert "ivy@example.com" not in unlinked


def test_a_provider_that_cannot_be_reached_gets_a_sentence_not_a_server_error(client, corp,
                                                                               settings):
    import socket

    with socket.socket() as closed:  # a port nobody listens on once this socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    app = settings.SOCIALACCOUNT_PROVIDERS["openid_connect"]["APPS"][0]
    app["settings"] = {"server_url": f"http://127.0.0.1:{port}"}
    response = client.post(LOGIN)
    assert response.status_code == 503
    assert "Corp ID cannot be reached right now." in response.content.decode()
    assert client.get("/login").status_code == 200


def test_the_sign_in_page_lets_its_provider_form_lead_to_the_provider(client, corp):
    """form-action covers the redirect a form's POST leads to: without the provider's origin
    the browser stops at the button (tests/browser/test_oidc_signin.py shows it)."""
    policy = client.get("/login")["Content-Security-Policy"]
    assert f"form-action 'self' {corp.url};" in policy + ";"
    assert "script-src 'self';" in policy


def test_without_a_provider_the_sign_in_page_keeps_the_plain_policy(client):
    from keyportal.csp import POLICY

    assert client.get("/login")["Content-Security-Policy"] == POLICY


def test_an_address_and_its_verification_are_read_from_the_same_claims(
    client, corp, tamper, monkeypatch
):
    """An id_token naming another, unverified address is not rescued by the verified one in
    the userinfo answer (a merge of the two would sign in as boss@)."""
    corp.user("sub-kim", email="kim@example.com", email_verified=True)

    def another_unverified_address(id_token, nonce):
        claims = jwt.decode(id_token, options={"verify_signature": False})
        claims.pop("email_verified", None)
        claims["email"] = "boss@example.com"
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return jwt.encode(claims, forger, algorithm="RS256")

    tamper(another_unverified_address)
    skip_check(monkeypatch, "signature")  # only the address rule is left to refuse it
    response = sign_in(client, corp, "sub-kim")
    assert response.status_code == 403
    assert "did not confirm that this email address is yours" in response.content.decode()
    assert not User.objects.exists()


def test_the_callbacks_code_and_the_client_secret_never_reach_the_log(settings):
    from keyportal.logging import redact

    settings.PORTAL_OIDC_CLIENT_SECRET = "the-client-secret-value"
    line = ("Bad Request: /auth/oidc/corp/login/callback/?code=abcdef123456&state=XyZ987 "
            "posting client_secret=the-client-secret-value")
    cleaned = redact(line)
    assert "abcdef123456" not in cleaned and "XyZ987" not in cleaned
    assert "the-client-secret-value" not in cleaned
    assert "/auth/oidc/corp/login/callback/?code=[redacted]&state=[redacted]" in cleaned


def test_a_sign_in_denied_at_the_provider_is_told_and_audited(client, corp):
    import requests

    answer = requests.post(start(client), data={"action": "deny"}, allow_redirects=False,
                           timeout=10)
    back = urlparse(answer.headers["Location"])
    assert parse_qs(back.query)["error"] == ["access_denied"]
    response = client.get(f"{back.path}?{back.query}")
    assert response.status_code == 403 and "did not complete" in response.content.decode()
    assert signed_in_as(client) is None and not User.objects.exists()
    # (The mock's denial carries no state back, so allauth cannot tell it from a stray call.)
    refused = AuditEvent.objects.get()
    assert refused.action == AuditEvent.Action.SIGN_IN_REFUSED and refused.detail == "corp: unknown"


def test_only_plain_origins_reach_the_policy_header():
    assert portal_oidc._origin("https://sso.example.com:8443/realms/x") == "https://sso.example.com:8443"
    assert portal_oidc._origin("http://[::1]:9000/x") == "http://[::1]:9000"
    for bad in ("https://a.example.com;script-src *@x/", "javascript:alert(1)", "", "/relative",
                "https://user:pw@a.example.com/"):
        assert portal_oidc._origin(bad) == ""


def test_with_emailed_links_off_a_refusal_offers_no_link(client, corp, settings):
    corp.user("sub-dee", email="dee@example.com", email_verified=False)
    assert "or sign in with an emailed link" in sign_in(client, corp, "sub-dee").content.decode()
    settings.PORTAL_EMAIL_LINK_SIGNIN = False
    response = sign_in(client, corp, "sub-dee")
    assert response.status_code == 403
    html = response.content.decode()
    assert "did not confirm that this email address is yours" in html
    assert "emailed link" not in html
