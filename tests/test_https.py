"""Deployment over HTTPS (PORTAL_HTTPS), the Content-Security-Policy on every response, and
the staff password session's shorter life."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from accounts.models import User
from keyportal.csp import POLICY
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a-long-password-1"


def _run(args: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DEBUG": "false",
        "SECRET_KEY": "k3y-" + "q8Zr1vXw7Lp0sN4mTa9Yc2Hd6Jf5Gb3E" * 2,  # 68 varied characters
        "ALLOWED_HOSTS": "keys.example.com",
        "CLIPROXY_URL": "http://127.0.0.1:8317",
        "CLIPROXY_MANAGEMENT_KEY": "management-secret",
        "CLIPROXY_PUBLIC_URL": "https://relay.example.com",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'portal.sqlite3'}",
        "PORTAL_HTTPS": "false",
        "SECURE_COOKIES": "false",
        "BEHIND_TLS_PROXY": "false",
        **extra,
    }
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_with_portal_https(tmp_path):
    result = _run(["manage.py", "check", "--deploy"], tmp_path, PORTAL_HTTPS="true")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout, result.stderr + result.stdout
    assert "WARNING" not in result.stderr + result.stdout


def test_without_portal_https_the_deploy_check_names_what_is_missing(tmp_path):
    result = _run(["manage.py", "check", "--deploy"], tmp_path)
    output = result.stderr + result.stdout
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in output


SHOW = ("from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, "
        "s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD, "
        "s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, "
        "getattr(s, 'SECURE_PROXY_SSL_HEADER', None))")


def _settings_line(tmp_path: Path, **extra: str) -> str:
    code = f"import django; django.setup(); {SHOW}"
    result = _run(["-c", code], tmp_path, DJANGO_SETTINGS_MODULE="keyportal.settings", **extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_portal_https_turns_everything_on_and_the_default_stays_plain_http(tmp_path):
    assert _settings_line(tmp_path, PORTAL_HTTPS="true") == (
        "True 31536000 True False True True ('HTTP_X_FORWARDED_PROTO', 'https')"
    )
    assert _settings_line(tmp_path) == "False 0 False False False False None"
    # The older variables still turn on their part alone.
    assert _settings_line(tmp_path, SECURE_COOKIES="true", BEHIND_TLS_PROXY="true") == (
        "False 0 False False True True ('HTTP_X_FORWARDED_PROTO', 'https')"
    )


def test_over_https_plain_requests_are_redirected_and_proxied_ones_get_hsts(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    response = client.get("/login")
    assert response.status_code == 301 and response["Location"] == "https://testserver/login"
    response = client.get("/login", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 200
    assert response["Strict-Transport-Security"].startswith("max-age=31536000")


# --- Content-Security-Policy ----------------------------------------------------------------


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", PASSWORD)


INLINE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle=|\son[a-z]+=", re.I)


def _assert_policed(response) -> None:
    assert response["Content-Security-Policy"] == POLICY
    content = response.content.decode()
    assert not INLINE.search(content), INLINE.search(content).group(0)


@pytest.mark.parametrize("page", ["/login", "/register", "/admin/login/"])
def test_anonymous_pages_carry_the_policy_and_nothing_it_would_block(client, page):
    response = client.get(page)
    assert response.status_code == 200
    _assert_policed(response)


def test_a_redirect_and_a_404_carry_the_policy_too(client):
    assert client.get("/my-keys")["Content-Security-Policy"] == POLICY
    assert client.get("/no-such-page")["Content-Security-Policy"] == POLICY


def test_signed_in_and_staff_pages_carry_the_policy_and_nothing_it_would_block(client, boss):
    client.force_login(boss)
    client.post("/my-keys/add", {"label": "laptop"})  # the pool may be empty: either page
    for page in ["/my-keys", "/admin/", "/admin/pool/apikey/", "/admin/usage/syncrun/",
                 "/admin/accounts/user/", "/admin/accounts/apitoken/add/",
                 "/staff/leaderboard", "/staff/export", "/staff/proxy"]:
        response = client.get(page)
        assert response.status_code == 200, page
        _assert_policed(response)


def test_policy_forbids_inline_code_and_framing():
    assert "script-src 'self'" in POLICY and "'unsafe-inline'" not in POLICY
    assert "frame-ancestors 'none'" in POLICY


# --- Staff session life ---------------------------------------------------------------------


def test_a_staff_password_sign_in_lasts_twelve_hours_a_link_sign_in_the_usual(client, boss, settings):
    response = client.post("/admin/login/?next=/admin/",
                           {"username": boss.email, "password": PASSWORD})
    assert response.status_code == 302
    assert client.session.get_expiry_age() == settings.PORTAL_STAFF_SESSION_SECONDS == 12 * 3600

    person = User.objects.create_user("ann@example.com")
    other = client.__class__()
    other.post("/login", {"email": person.email})
    other.post(emailed_path())
    assert other.session.get_expiry_age() == settings.SESSION_COOKIE_AGE


def test_no_template_has_inline_script_style_or_event_handler():
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sorted((ROOT / "templates").rglob("*.html"))
        for match in INLINE.finditer(re.sub(r"\{#.*?#\}", "", path.read_text()))
    ]
    assert offenders == []
