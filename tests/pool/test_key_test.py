""""Test this key" on the key-shown page, against the fake proxy: the portal asks the proxy's
GET /v1/models with the key, for the key's signed-in owner only, and never logs the key. And
the setup snippets on that page."""

from __future__ import annotations

import logging
import re

import pytest

from pool.models import ApiKey
from tests.fakes.proxy import MODELS

pytestmark = pytest.mark.django_db
URL = "/my-keys/test-key"
HTMX = {"HX-Request": "true"}


@pytest.fixture
def signed_in(client, live_key):
    key, value = live_key
    client.force_login(key.owner)
    return client, key, value


def test_a_known_key_lists_the_models_the_proxy_offers(signed_in, caplog):
    client, key, value = signed_in
    caplog.set_level(logging.DEBUG)
    response = client.post(URL, {"key": value}, headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200 and "<html" not in body  # the fragment
    assert "no-store" in response["Cache-Control"]
    listed = re.findall(r"<li><code>([^<]+)</code></li>", body)
    assert listed == sorted(MODELS)
    assert "offers 3 models" in body
    assert value not in body
    assert value not in caplog.text  # nor in any log line, urllib3's included


def test_without_javascript_the_answer_is_a_whole_page(signed_in):
    client, key, value = signed_in
    response = client.post(URL, {"key": value})
    body = response.content.decode()
    assert response.status_code == 200 and "<html" in body
    assert "<code>mock-gpt</code>" in body and key.masked in body and value not in body


def test_a_key_the_proxy_does_not_know_gets_a_sentence(signed_in, fake_proxy, caplog):
    client, key, value = signed_in
    fake_proxy._set_keys(["operator-own-key"])  # the proxy lost (or never got) the key
    caplog.set_level(logging.DEBUG)
    response = client.post(URL, {"key": value}, headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert "the proxy doesn&#x27;t know this key yet" in body.lower()
    assert "<li>" not in body and value not in body and value not in caplog.text


def test_a_proxy_that_is_down_gets_a_sentence(signed_in, fake_proxy, caplog):
    client, key, value = signed_in
    fake_proxy.stop()
    caplog.set_level(logging.DEBUG)
    response = client.post(URL, {"key": value}, headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200 and "cannot be reached right now" in body
    assert value not in body and value not in caplog.text


def test_a_slow_proxy_gets_a_sentence_within_the_page_budget(signed_in, fake_proxy, settings):
    client, key, value = signed_in
    settings.PORTAL_REQUEST_PROXY_BUDGET = 0.3
    fake_proxy.models_delay = 2
    response = client.post(URL, {"key": value}, headers=HTMX)
    body = response.content.decode()
    assert "did not answer within 0.3 seconds" in body and value not in body


def test_someone_elses_key_is_refused_like_a_key_that_does_not_exist(client, live_key, bob):
    key, value = live_key
    client.force_login(bob)
    assert client.post(URL, {"key": value}, headers=HTMX).status_code == 404
    assert client.post(URL, {"key": "sk-not-a-key"}, headers=HTMX).status_code == 404
    assert client.post(URL, {}, headers=HTMX).status_code == 404


def test_a_revoked_key_is_not_tested(signed_in):
    client, key, value = signed_in
    ApiKey.objects.filter(pk=key.pk).update(status=ApiKey.Status.REVOKED)
    assert client.post(URL, {"key": value}, headers=HTMX).status_code == 404


def test_anonymous_and_get_are_refused(client, live_key):
    _key, value = live_key
    response = client.post(URL, {"key": value})
    assert response.status_code == 302 and "/login" in response["Location"]
    client.force_login(_key.owner)
    assert client.get(URL).status_code == 405


def test_the_test_needs_the_csrf_token(live_key):
    from django.test import Client

    key, value = live_key
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(key.owner)
    assert strict.post(URL, {"key": value}).status_code == 403


def test_many_tests_in_a_minute_are_slowed_down(signed_in, fake_proxy):
    client, key, value = signed_in
    for _ in range(10):
        client.post(URL, {"key": value}, headers=HTMX)
    fake_proxy.stop()  # the eleventh is answered without asking the proxy
    body = client.post(URL, {"key": value}, headers=HTMX).content.decode()
    assert "many times in a minute" in body and "cannot be reached" not in body


def test_the_key_shown_page_has_every_snippet_with_the_key_and_addresses(client, ann, ready_keys,
                                                                        settings):
    settings.CLIPROXY_PUBLIC_URL = "https://proxy.example.com"
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci"}, follow=True)
    body = response.content.decode()
    value = re.search(r'<code id="key-value">([^<]+)</code>', body).group(1)
    snippets = dict(re.findall(r'<(?:pre|code) id="(snippet-[a-z-]+)">(.*?)</(?:pre|code)>', body,
                               re.S))
    assert set(snippets) >= {
        "snippet-claude-env", "snippet-claude-json", "snippet-codex-toml", "snippet-codex-env",
        "snippet-gemini-env", "snippet-chat-host", "snippet-chat-key", "snippet-openai",
        "snippet-curl",
    }
    assert 'base_url = "https://proxy.example.com/v1"' in snippets["snippet-codex-toml"]
    assert 'env_key = "KEYPORTAL_API_KEY"' in snippets["snippet-codex-toml"]
    assert value not in snippets["snippet-codex-toml"]  # the key goes in the environment
    assert snippets["snippet-codex-env"] == f"export KEYPORTAL_API_KEY={value}"
    assert snippets["snippet-gemini-env"] == (
        f"export GOOGLE_GEMINI_BASE_URL=https://proxy.example.com\nexport GEMINI_API_KEY={value}"
    )
    assert snippets["snippet-chat-host"] == "https://proxy.example.com"
    assert snippets["snippet-chat-key"] == value
    for name in snippets:  # every snippet has its Copy button
        assert f'data-copy="{name}"' in body
    assert f'<input type="hidden" name="key" value="{value}">' in body
    assert 'hx-post="/my-keys/test-key"' in body and "<script" not in body.split("</head>")[1]


def test_an_error_report_would_not_carry_the_key(signed_in, rf):
    from django.views.debug import SafeExceptionReporterFilter

    from pool.views import key_test

    _client, key, value = signed_in
    request = rf.post(URL, {"key": value})
    request.user, request.htmx = key.owner, False
    key_test(request)  # the decorator marks the request as the view runs
    cleaned = SafeExceptionReporterFilter().get_post_parameters(request)
    assert cleaned["key"] != value and value not in str(cleaned)
