"""A real OpenID Connect provider on 127.0.0.1 for tests: PyPI's oidc-provider-mock (Flask,
authlib) served by werkzeug on a thread. It signs RS256 id_tokens with its own key, publishes
discovery and JWKS, and lets a test say who signs in (`user`) with which claims.

`sign_in_at` plays the browser at the provider: it posts the consent form the provider shows
and returns where the provider sends the browser back (the portal's callback with a code)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlparse

import requests
import werkzeug.serving
from oidc_provider_mock import app as oidc_app

TIMEOUT = 10


@dataclass
class MockProvider:
    url: str

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    def user(self, sub: str, **claims: object) -> None:
        """Who `sub` is at the provider: their claims (email, email_verified, name...)."""
        answer = requests.put(f"{self.url}/users/{sub}", json=claims, timeout=TIMEOUT)
        assert answer.status_code == 204, answer.text

    def sign_in_at(self, authorize_url: str, sub: str) -> str:
        """Consents as `sub` on the provider's authorization page; returns the redirect."""
        assert authorize_url.startswith(f"{self.url}/oauth2/authorize?"), authorize_url
        answer = requests.post(authorize_url, data={"sub": sub}, allow_redirects=False,
                               timeout=TIMEOUT)
        assert answer.status_code == 302, answer.text
        return answer.headers["Location"]

    def id_token_for(self, *, client_id: str, sub: str, nonce: str) -> str:
        """A genuine id_token the provider signs for `client_id` (another application's, in
        a substitution attack), through the whole code flow of that client."""
        redirect_uri = "http://127.0.0.1/elsewhere/callback"
        query = urlencode({
            "client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code",
            "scope": "openid email profile", "state": "s", "nonce": nonce,
        })
        back = self.sign_in_at(f"{self.url}/oauth2/authorize?{query}", sub)
        code = parse_qs(urlparse(back).query)["code"][0]
        answer = requests.post(f"{self.url}/oauth2/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": client_id, "client_secret": "whatever",
        }, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        return answer.json()["id_token"]


@contextmanager
def mock_provider() -> Iterator[MockProvider]:
    server = werkzeug.serving.make_server("127.0.0.1", 0, oidc_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield MockProvider(url=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
