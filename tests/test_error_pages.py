"""The portal's own 404 and 500 pages (templates/404.html, templates/500.html), with DEBUG off as
in production: styled like the rest, a way home, and nothing of the failure's insides."""

from __future__ import annotations

import pytest
from django.http import HttpRequest, HttpResponse
from django.template.loader import get_template
from django.test import Client
from django.urls import include, path

from pool.services import key_assign
from tests.pool.conftest import _make_ready_keys

pytestmark = pytest.mark.django_db

MANAGEMENT_KEY = "mgmt-secret-4b1d8e0c"


def _boom(request: HttpRequest) -> HttpResponse:
    # An exception whose message carries secrets, as an upstream error or a bug might.
    from django.conf import settings

    raise RuntimeError(f"exploded with {settings.CLIPROXY_MANAGEMENT_KEY} {settings.SECRET_KEY}")


def _denied(request: HttpRequest) -> HttpResponse:
    from django.conf import settings
    from django.core.exceptions import PermissionDenied

    raise PermissionDenied(f"refused with {settings.CLIPROXY_MANAGEMENT_KEY}")


urlpatterns = [path("boom", _boom), path("denied", _denied), path("", include("keyportal.urls"))]


@pytest.fixture
def production(settings):
    settings.DEBUG = False
    settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
    settings.SECRET_KEY = "secret-key-for-this-test-0123456789abcdef"
    return settings


def test_a_missing_page_gets_the_portals_404(client, production):
    response = client.get("/no/such/page")
    body = response.content.decode()
    assert response.status_code == 404
    assert "<title>Page not found · Key Portal</title>" in body
    assert "css/portal.css" in body  # styled like every other page
    assert 'href="/"' in body and "Back to the portal" in body


def test_someone_elses_key_gets_the_same_404(client, ann, bob, production):
    _make_ready_keys(1)
    key = key_assign(user=ann, label="laptop").key
    client.force_login(bob)
    response = client.get(f"/my-keys/{key.pk}")
    assert response.status_code == 404 and b"Page not found" in response.content
    assert b"laptop" not in response.content and key.masked.encode() not in response.content
    assert b"bob@example.com" in response.content  # the header knows who is signed in


@pytest.mark.urls(__name__)
def test_a_crash_gets_the_portals_500_without_the_traceback_or_secrets(production):
    client = Client(raise_request_exception=False)
    response = client.get("/boom")
    body = response.content.decode()
    assert response.status_code == 500
    assert "<title>Something went wrong · Key Portal</title>" in body
    assert 'href="/"' in body and "Back to the portal" in body
    for leak in ("Traceback", "RuntimeError", "exploded", MANAGEMENT_KEY, production.SECRET_KEY):
        assert leak not in body


def test_the_500_page_renders_with_no_context_and_no_database(production,
                                                             django_assert_num_queries):
    # Django's server_error renders 500.html with no context at all; it must not need the
    # database either (the failure may be the database). Counting queries works on both
    # databases; closing the connection would break PostgreSQL's test transaction.
    with django_assert_num_queries(0):
        body = get_template("500.html").render()
    assert "<title>Something went wrong · Key Portal</title>" in body
    assert "Sign in" in body  # no user in the context: the anonymous header


LANGUAGES = [("en", "en", "Not allowed", "Back to the portal"),
             ("zh-CN", "zh-hans", "无权访问", "返回门户")]


@pytest.mark.urls(__name__)
@pytest.mark.parametrize(("accept", "lang", "title", "back"), LANGUAGES)
def test_a_refusal_gets_the_portals_403_in_the_readers_language(production, accept, lang, title,
                                                                back):
    response = Client().get("/denied", HTTP_ACCEPT_LANGUAGE=accept)
    body = response.content.decode()
    assert response.status_code == 403
    assert f'<html lang="{lang}"' in body and f"<title>{title} · " in body
    assert "css/portal.css" in body and 'href="/"' in body and back in body
    assert MANAGEMENT_KEY not in body and "refused with" not in body


EXPIRED = {"en": ("This form has expired", "Sign in", "CSRF verification failed"),
           "zh-CN": ("此表单已过期", "登录", "CSRF verification failed")}


@pytest.mark.parametrize("accept", ["en", "zh-CN"])
def test_a_form_without_a_valid_token_gets_the_portals_csrf_page(production, ann, accept):
    client = Client(enforce_csrf_checks=True, HTTP_ACCEPT_LANGUAGE=accept)
    client.get("/login")  # the CSRF cookie, as a browser has it
    stale = "x" * 64  # a token from an older page: the cookie's secret has moved on
    response = client.post("/login", {"email": "ann@example.com", "csrfmiddlewaretoken": stale})
    body = response.content.decode()
    heading, sign_in, django_own = EXPIRED[accept]
    assert response.status_code == 403
    assert f"<h1>{heading}</h1>" in body and "css/portal.css" in body
    assert 'href="/login"' in body and sign_in in body and 'href="/"' in body
    # Neither Django's page nor its reason ("CSRF token incorrect"), nor the posted token.
    assert django_own not in body and "incorrect" not in body and stale not in body


def test_the_csrf_page_offers_my_keys_to_someone_signed_in(production, ann):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ann)
    response = client.post("/logout")  # no token at all
    assert response.status_code == 403
    assert b'href="/my-keys"' in response.content and b"ann@example.com" in response.content
