"""Sign-in link tokens stay out of the logs, and only a person's newest link works."""

from __future__ import annotations

import io
import logging

import pytest
from django.test import Client

from accounts.models import SignInLink
from keyportal.logging import RedactSecretsFilter
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
TOKEN = "Zq3xP0c_9-AbCdEfGhIjKlMnOpQrStUvWxYz0123456"


@pytest.mark.parametrize("msg, args", [
    ("Forbidden (%s): %s", ("CSRF token missing.", f"/login/{TOKEN}")),
    ("Forbidden (CSRF token missing.): /register/%s", (TOKEN,)),
    ('"%s" %s %s', (f"POST /login/{TOKEN}?next=/x HTTP/1.1", "403", "2506")),
    (f"link https://keys.example.com/register/{TOKEN} sent", None),
    ("%(path)s refused", ({"path": f"/login/{TOKEN}/"},)),
])
def test_link_tokens_are_redacted_whatever_the_args(msg, args):
    record = logging.LogRecord("django.security.csrf", logging.WARNING, __file__, 1, msg, args,
                               None)
    RedactSecretsFilter().filter(record)
    message = record.getMessage()
    assert TOKEN not in message and TOKEN[:12] not in message
    assert "/[redacted]" in message


@pytest.mark.parametrize("debug", [False, True])
def test_a_refused_link_post_leaves_no_token_in_the_portal_log(ann, settings, debug):
    """The real chain: a CSRF failure on a link logged through the configured handlers
    (Django's own console handler writes too under DEBUG)."""
    settings.DEBUG = debug
    Client().post("/login", {"email": ann.email})
    path = emailed_path()
    token = path.rsplit("/", 1)[-1]
    out = io.StringIO()
    handlers = [h for name in ("", "django", "django.security", "django.security.csrf")
                for h in logging.getLogger(name).handlers]
    old = [h.setStream(out) for h in handlers if isinstance(h, logging.StreamHandler)]
    try:
        response = Client(enforce_csrf_checks=True).post(path)
    finally:
        for h, stream in zip([h for h in handlers if isinstance(h, logging.StreamHandler)], old):
            h.setStream(stream)
    assert response.status_code == 403
    logged = out.getvalue()
    assert "Forbidden (CSRF" in logged and "/login/[redacted]" in logged
    assert token not in logged


def ask(client, email: str) -> str:
    client.post("/login", {"email": email})
    return emailed_path()


def test_asking_again_retires_the_earlier_unused_link(client, ann):
    first = ask(client, ann.email)
    second = ask(client, ann.email)
    assert client.post(first).status_code == 410
    assert client.post(second).status_code == 303


def test_signing_in_retires_the_other_unused_links(client, ann, bob):
    first = ask(client, ann.email)
    SignInLink.objects.create(  # a second live link, e.g. from a concurrent request
        token_hash="0" * 64, email=ann.email, purpose=SignInLink.Purpose.LOGIN,
        expires_at=SignInLink.objects.get().expires_at,
    )
    bobs = ask(Client(), bob.email)
    assert client.post(first).status_code == 303
    assert not SignInLink.objects.filter(email=ann.email, used_at__isnull=True).exists()
    assert Client().post(bobs).status_code == 303  # someone else's link is untouched


def test_a_new_registration_link_retires_the_earlier_one_but_not_sign_in_links(client, ann):
    login_path = ask(client, ann.email)
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    first = emailed_path()
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    assert SignInLink.objects.filter(email="new@example.com").count() == 1
    assert first != emailed_path()
    assert client.get(first).status_code == 410
    assert client.get(login_path).status_code == 200
