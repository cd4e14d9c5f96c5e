"""client_ip(): X-Forwarded-For is believed only from PORTAL_TRUSTED_PROXIES, and only as far
back as the chain of trusted proxies goes."""

from __future__ import annotations

import importlib

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory

from keyportal.audit import client_ip


def ip_of(remote: str, forwarded: str | None = None) -> str | None:
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return client_ip(RequestFactory().get("/", **extra))


def test_without_trusted_proxies_forwarded_for_is_ignored(settings):
    settings.PORTAL_TRUSTED_PROXIES = []
    assert ip_of("10.0.0.1", "203.0.113.7") == "10.0.0.1"


@pytest.mark.parametrize(
    ("remote", "forwarded", "expected"),
    [
        ("10.0.0.1", "203.0.113.7", "203.0.113.7"),
        # what the client wrote on the left is not believed
        ("10.0.0.1", "1.2.3.4, 203.0.113.7", "203.0.113.7"),
        # a chain of trusted proxies is walked back through
        ("10.0.0.1", "1.2.3.4, 203.0.113.7, 10.9.9.9", "203.0.113.7"),
        ("127.0.0.1", " 2001:db8::5 ", "2001:db8::5"),
        # no header: the proxy itself
        ("10.0.0.1", None, "10.0.0.1"),
        # garbage from a trusted hop: stop at the last address we trust
        ("10.0.0.1", "203.0.113.7, not-an-ip", "10.0.0.1"),
        # an untrusted sender's header is ignored
        ("198.51.100.2", "203.0.113.7", "198.51.100.2"),
        ("::ffff:10.0.0.1", "203.0.113.7", "203.0.113.7"),
    ],
)
def test_a_trusted_proxy_names_the_client(settings, remote, forwarded, expected):
    settings.PORTAL_TRUSTED_PROXIES = ["10.0.0.0/8", "127.0.0.1"]
    assert ip_of(remote, forwarded) == expected


def test_the_setting_comes_from_the_environment_and_bad_entries_are_refused(monkeypatch):
    from keyportal import settings as module

    try:
        monkeypatch.setenv("PORTAL_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1")
        assert importlib.reload(module).PORTAL_TRUSTED_PROXIES == [
            "127.0.0.1", "10.0.0.0/8", "::1"
        ]
        monkeypatch.setenv("PORTAL_TRUSTED_PROXIES", "nginx.local")
        with pytest.raises(ImproperlyConfigured, match="PORTAL_TRUSTED_PROXIES"):
            importlib.reload(module)
    finally:
        monkeypatch.delenv("PORTAL_TRUSTED_PROXIES")
        importlib.reload(module)
