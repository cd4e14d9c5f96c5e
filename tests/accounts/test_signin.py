"""Sign-in by one-time emailed link, registration forms, sign-out, rate limits."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from accounts.models import SignInLink, User, token_digest
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
CSRF = re.compile(rb'(csrfmiddlewaretoken" value="|X-CSRFToken": ")[^"]+')


def without_csrf(content: bytes) -> bytes:
    return CSRF.sub(rb"\1", content)


def ask_login(client, email: str):
    return client.post("/login", {"email": email})


# --- the login form -------------------------------------------------------------------------


def test_login_page_shows_the_form_to_anonymous_visitors(client):
    response = client.get("/login")
    assert response.status_code == 200
    assert b'name="email"' in response.content


def test_login_page_sends_a_signed_in_person_to_their_keys(client, ann):
    client.force_login(ann)
    response = client.get("/login")
    assert response.status_code == 302 and response["Location"] == "/my-keys"


def test_known_address_gets_a_link_that_signs_in_once(client, ann):
    response = ask_login(client, " Ann@Example.com ")
    assert response.status_code == 200 and b"Check your inbox" in response.content
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["ann@example.com"]
    path = emailed_path()

    confirm = client.get(path)
    assert confirm.status_code == 200 and b"Press the button" in confirm.content
    assert "_auth_user_id" not in client.session  # a GET (a mail scanner) signs nobody in

    used = client.post(path)
    assert used.status_code == 303 and used["Location"] == "/my-keys"
    assert client.session["_auth_user_id"] == str(ann.pk)

    client.logout()
    again = client.post(path)
    assert again.status_code == 410 and b"no longer works" in again.content
    assert "_auth_user_id" not in client.session
    assert client.get(path).status_code == 410


def test_the_database_keeps_only_a_hash_of_the_token(client, ann):
    ask_login(client, "ann@example.com")
    token = emailed_path().rsplit("/", 1)[-1]
    link = SignInLink.objects.get()
    assert link.token_hash == token_digest(token)
    assert token not in repr(list(SignInLink.objects.values()))


def test_expired_link_is_refused(client, ann):
    ask_login(client, "ann@example.com")
    path = emailed_path()
    SignInLink.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get(path).status_code == 410
    assert client.post(path).status_code == 410
    assert "_auth_user_id" not in client.session


def test_link_expires_fifteen_minutes_after_it_was_asked_for(client, ann):
    before = timezone.now()
    ask_login(client, "ann@example.com")
    link = SignInLink.objects.get()
    assert before + timedelta(minutes=15) <= link.expires_at <= timezone.now() + timedelta(minutes=15)


def test_made_up_and_wrong_purpose_links_are_refused(client, ann):
    assert client.post("/login/not-a-real-token").status_code == 410
    client.post("/register", {"email": "ann@example.com", "name": "", "label": ""})
    token = emailed_path().rsplit("/", 1)[-1]
    assert client.post(f"/login/{token}").status_code == 410  # a registration token


def test_deactivated_person_cannot_use_a_link(client, ann):
    ask_login(client, "ann@example.com")
    path = emailed_path()
    User.objects.filter(pk=ann.pk).update(is_active=False)
    assert client.post(path).status_code == 410
    assert "_auth_user_id" not in client.session


def test_probing_addresses_gets_identical_answers(client, ann):
    known = ask_login(client, "ann@example.com")
    unknown = ask_login(client, "nobody@example.com")
    assert known.status_code == unknown.status_code == 200
    assert without_csrf(known.content).replace(b"ann@", b"X@") == without_csrf(
        unknown.content
    ).replace(b"nobody@", b"X@")
    # The unknown address's owner learns, by email only, that there is no account.
    assert mail.outbox[1].to == ["nobody@example.com"]
    assert "no account" in mail.outbox[1].body and "/register" in mail.outbox[1].body
    assert SignInLink.objects.filter(email="nobody@example.com").count() == 0


def test_registration_answers_identically_for_known_and_new_addresses(client, ann):
    known = client.post("/register", {"email": "ann@example.com", "name": "", "label": "x"})
    new = client.post("/register", {"email": "new@example.com", "name": "", "label": "x"})
    assert known.status_code == new.status_code == 200
    assert without_csrf(known.content).replace(b"ann@", b"X@") == without_csrf(
        new.content
    ).replace(b"new@", b"X@")
    assert not User.objects.filter(email="new@example.com").exists()  # only the link creates


@pytest.mark.parametrize("email", ["", "not-an-address", "a@b@c"])
def test_bad_address_gets_a_message_on_the_field_and_sends_nothing(client, email):
    response = ask_login(client, email)
    assert response.status_code == 400
    assert b'class="errorlist' in response.content
    assert mail.outbox == [] and SignInLink.objects.count() == 0


def test_registration_validates_its_fields(client):
    response = client.post(
        "/register", {"email": "new@example.com", "name": "n" * 151, "label": "l" * 101}
    )
    assert response.status_code == 400
    assert response.content.count(b'class="errorlist') == 2
    assert mail.outbox == []


def test_allowed_domains_limit_both_forms(client, settings, ann):
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["corp.example"]
    for url in ("/login", "/register"):
        response = client.post(url, {"email": "ann@example.com"})
        assert response.status_code == 400
        assert b"corp.example" in response.content
    assert mail.outbox == []
    ok = client.post("/register", {"email": "Zed@Corp.Example"})
    assert ok.status_code == 200 and mail.outbox[0].to == ["zed@corp.example"]


def test_allowed_domains_come_from_the_environment(monkeypatch):
    import importlib

    import keyportal.settings as module

    monkeypatch.setenv("PORTAL_ALLOWED_EMAIL_DOMAINS", "Corp.Example, @lab.example ,")
    try:
        assert importlib.reload(module).PORTAL_ALLOWED_EMAIL_DOMAINS == [
            "corp.example", "lab.example"
        ]
    finally:
        monkeypatch.delenv("PORTAL_ALLOWED_EMAIL_DOMAINS")
        importlib.reload(module)


# --- rate limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/login", "/register"])
def test_one_address_is_limited_whoever_asks(client, settings, ann, url):
    settings.PORTAL_RATE_PER_EMAIL = 2
    for n in range(2):
        assert client.post(url, {"email": "ann@example.com"}, REMOTE_ADDR=f"10.0.0.{n}").status_code == 200
    refused = client.post(url, {"email": "ann@example.com"}, REMOTE_ADDR="10.0.0.9")
    assert refused.status_code == 429 and b"Too many attempts" in refused.content
    assert len(mail.outbox) == 2
    # Unknown addresses are limited exactly alike: the limit reveals nothing either.
    for n in range(2):
        client.post(url, {"email": "nobody@example.com"})
    assert client.post(url, {"email": "nobody@example.com"}).status_code == 429


@pytest.mark.parametrize("url", ["/login", "/register"])
def test_one_client_address_is_limited_across_emails(client, settings, url):
    settings.PORTAL_RATE_PER_IP = 3
    for n in range(3):
        assert client.post(url, {"email": f"p{n}@example.com"}).status_code == 200
    assert client.post(url, {"email": "p9@example.com"}).status_code == 429
    assert client.post(url, {"email": "p9@example.com"}, REMOTE_ADDR="10.1.1.1").status_code == 200
    assert len(mail.outbox) == 4


def test_limits_live_in_the_shared_cache(client, settings):
    from django.core.cache import cache

    settings.PORTAL_RATE_PER_IP = 1
    client.post("/login", {"email": "p@example.com"})
    assert client.post("/login", {"email": "q@example.com"}).status_code == 429
    cache.clear()  # what another process sees is the same table: clearing it lifts the limit
    assert client.post("/login", {"email": "q@example.com"}).status_code == 200


# --- sign out and home ----------------------------------------------------------------------


def test_sign_out_is_a_post(client, ann):
    client.force_login(ann)
    assert client.get("/logout").status_code == 405
    response = client.post("/logout")
    assert response.status_code == 303 and response["Location"] == "/login"
    assert "_auth_user_id" not in client.session


def test_home_sends_people_where_they_belong(client, ann):
    assert client.get("/")["Location"] == "/login"
    client.force_login(ann)
    assert client.get("/")["Location"] == "/my-keys"


def test_pages_load_htmx_and_css_from_the_portal_and_carry_csrf_for_htmx(client):
    content = client.get("/login").content.decode()
    assert '/static/django_htmx/htmx-2.min.js' in content
    assert '/static/css/portal.css' in content
    assert 'hx-headers=\'{"X-CSRFToken": "' in content
    assert "https://" not in content and "http://" not in content  # nothing from elsewhere
