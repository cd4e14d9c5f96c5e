"""Cross-cutting pieces: leases, system checks, log redaction."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.core.checks import run_checks
from django.utils import timezone

from keyportal.locks import LeaseHeld, lease, lease_acquire, lease_release
from keyportal.logging import RedactSecretsFilter
from keyportal.models import Lease

pytestmark = pytest.mark.django_db


def test_a_lease_has_one_holder_at_a_time():
    first = lease_acquire(name="job", ttl=timedelta(minutes=1))
    assert first is not None
    assert lease_acquire(name="job", ttl=timedelta(minutes=1)) is None
    lease_release(name="job", holder=first)
    assert lease_acquire(name="job", ttl=timedelta(minutes=1)) is not None


def test_an_expired_lease_is_taken_over():
    holder = lease_acquire(name="job", ttl=timedelta(minutes=1))
    Lease.objects.filter(name="job").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lease_acquire(name="job", ttl=timedelta(minutes=1)) not in (None, holder)


def test_only_the_holder_releases():
    holder = lease_acquire(name="job", ttl=timedelta(minutes=1))
    lease_release(name="job", holder="somebody-else")
    assert lease_acquire(name="job", ttl=timedelta(minutes=1)) is None
    lease_release(name="job", holder=holder)


def test_lease_block_raises_when_held_and_releases_on_error():
    with lease("job"):
        with pytest.raises(LeaseHeld):
            with lease("job"):
                pass
    with pytest.raises(RuntimeError):
        with lease("job"):
            raise RuntimeError("boom")
    with lease("job"):  # released despite the error
        pass


def _check_ids(settings_overrides, settings) -> set[str]:
    for name, value in settings_overrides.items():
        setattr(settings, name, value)
    return {m.id for m in run_checks() if m.id and m.id.startswith("keyportal.")}


def test_checks_name_missing_proxy_settings(settings):
    assert _check_ids({"CLIPROXY_URL": "", "CLIPROXY_MANAGEMENT_KEY": ""}, settings) == {"keyportal.W001"}
    assert "keyportal.W002" in _check_ids(
        {"CLIPROXY_URL": "http://127.0.0.1:8317", "CLIPROXY_MANAGEMENT_KEY": ""}, settings
    )


def test_checks_refuse_bad_values(settings):
    ids = _check_ids(
        {"CLIPROXY_URL": "127.0.0.1:8317", "CLIPROXY_MANAGEMENT_KEY": "k",
         "CLIPROXY_TIMEOUT": 0, "PORTAL_KEY_PREFIX": "your-api-key-", "PORTAL_POOL_MIN": -1},
        settings,
    )
    assert {"keyportal.E001", "keyportal.E002", "keyportal.E003", "keyportal.E004"} <= ids


@pytest.mark.parametrize("name, value, check", [
    ("PORTAL_REQUEST_PROXY_BUDGET", 0, "keyportal.E006"),
    ("PORTAL_RECONCILE_MAX_LOSS", 0, "keyportal.E007"),
    ("PORTAL_RECONCILE_MAX_LOSS", 1.5, "keyportal.E007"),
])
def test_checks_refuse_a_budget_or_share_out_of_range(settings, name, value, check):
    ids = _check_ids({**PROXY, name: value}, settings)
    assert ids == {check}


PROXY = {"CLIPROXY_URL": "http://127.0.0.1:8317", "CLIPROXY_MANAGEMENT_KEY": "k",
         "CLIPROXY_PUBLIC_URL": "https://relay.example.com"}


def test_checks_are_quiet_when_all_is_set(settings):
    assert _check_ids(PROXY, settings) == set()


@pytest.mark.parametrize("overrides", [
    {"CLIPROXY_URL": "http://127.0.0.1:8317", "CLIPROXY_MANAGEMENT_KEY": "k",
     "CLIPROXY_PUBLIC_URL": ""},  # unset: people get the management URL
    {"CLIPROXY_URL": "http://proxy:8317", "CLIPROXY_MANAGEMENT_KEY": "k",
     "CLIPROXY_PUBLIC_URL": "http://localhost:8317"},
    {"CLIPROXY_URL": "", "CRS_URL": "http://[::1]:3000", "CRS_ADMIN_USERNAME": "a",
     "CRS_ADMIN_PASSWORD": "p", "CRS_PUBLIC_URL": ""},
    {"CLIPROXY_URL": "", "CCH_URL": "http://10.0.0.5:23000", "CCH_ADMIN_TOKEN": "t",
     "CCH_PUBLIC_URL": "http://127.0.0.2:23000"},
])
def test_a_loopback_address_given_to_people_is_warned_about(settings, overrides):
    assert "keyportal.W008" in _check_ids(overrides, settings)


def test_a_public_address_given_to_people_is_not_warned_about(settings):
    assert "keyportal.W008" not in _check_ids(
        {"CLIPROXY_URL": "http://127.0.0.1:8317", "CLIPROXY_MANAGEMENT_KEY": "k",
         "CLIPROXY_PUBLIC_URL": "https://relay.example.com"}, settings)
    assert "keyportal.W008" not in _check_ids(
        {"CLIPROXY_URL": "http://10.0.0.5:8317", "CLIPROXY_PUBLIC_URL": ""}, settings)


def test_log_lines_lose_keys_and_the_management_key(settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "top-secret-mgmt"
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1,
        "upstream said %s with %s", ("sk-kp-AbCdEfGh1234567890_-xyz", "top-secret-mgmt"), None,
    )
    RedactSecretsFilter().filter(record)
    message = record.getMessage()
    assert "AbCdEfGh" not in message and "top-secret-mgmt" not in message
    assert "sk-kp-[redacted]" in message and "[management key]" in message


@pytest.mark.parametrize("email_url, warned", [
    ("filemail:///var/mail/keyportal", True),  # three slashes: var/mail/keyportal
    ("filemail://mail", True),
    ("filemail:////var/mail/keyportal", False),
    ("consolemail://", False),
    ("smtp+tls://user:pw@smtp.example.com:587", False),
])
def test_a_relative_email_file_folder_is_warned_about(settings, email_url, warned):
    import environ

    for name, value in environ.Env.email_url_config(email_url).items():
        setattr(settings, name, value)
    ids = _check_ids(PROXY, settings)
    assert ids == ({"keyportal.W004"} if warned else set())


def test_no_proxy_warning_when_a_relay_is_declared(settings):
    relay_only = {"CLIPROXY_URL": "", "CLIPROXY_MANAGEMENT_KEY": "", "CRS_URL": "http://127.0.0.1:3000",
                  "CRS_ADMIN_USERNAME": "admin", "CRS_ADMIN_PASSWORD": "pw",
                  "CRS_PUBLIC_URL": "https://crs.example.com"}
    assert _check_ids(relay_only, settings) == set()
    settings.CRS_URL = ""
    assert _check_ids({"CCH_URL": "http://127.0.0.1:23000", "CCH_ADMIN_TOKEN": "t",
                       "CCH_PUBLIC_URL": "https://cch.example.com",
                       "CRS_ADMIN_USERNAME": "", "CRS_ADMIN_PASSWORD": ""}, settings) == set()


@pytest.mark.parametrize("overrides, check", [
    ({"CRS_URL": "http://127.0.0.1:3000", "CRS_ADMIN_PASSWORD": "pw"}, "keyportal.W006"),
    ({"CRS_URL": "", "CRS_ADMIN_USERNAME": "admin", "CRS_ADMIN_PASSWORD": "pw"}, "keyportal.W006"),
    ({"CRS_URL": "127.0.0.1:3000", "CRS_ADMIN_USERNAME": "a", "CRS_ADMIN_PASSWORD": "pw"},
     "keyportal.E008"),
    ({"CCH_URL": "http://127.0.0.1:23000"}, "keyportal.W007"),
    ({"CCH_URL": "ftp://127.0.0.1", "CCH_ADMIN_TOKEN": "t"}, "keyportal.E009"),
    ({"UPSTREAM_TIMEOUT": 0}, "keyportal.E010"),
])
def test_checks_name_incomplete_relay_settings(settings, overrides, check):
    assert check in _check_ids(overrides, settings)


def test_incomplete_relay_message_names_no_secret(settings):
    settings.CRS_URL = "http://127.0.0.1:3000"
    settings.CRS_ADMIN_USERNAME = ""
    settings.CRS_ADMIN_PASSWORD = "s3cret-value"
    text = " ".join(f"{m.msg} {m.hint}" for m in run_checks())
    assert "CRS_ADMIN_USERNAME" in text and "s3cret-value" not in text


def test_a_missing_portal_address_is_warned_with_what_emails_fall_back_to(settings):
    from django.core.checks import run_checks

    settings.PORTAL_BASE_URL = ""
    settings.ALLOWED_HOSTS = ["127.0.0.1", "keys.example.com"]
    [warning] = [m for m in run_checks() if m.id == "keyportal.W030"]
    assert "http://keys.example.com, guessed from ALLOWED_HOSTS" in warning.msg
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost", "*"]
    [warning] = [m for m in run_checks() if m.id == "keyportal.W030"]
    assert "carry no link" in warning.msg
    assert "keyportal.W030" not in _check_ids({"PORTAL_BASE_URL": "https://keys.example.com"},
                                              settings)
    assert "keyportal.E030" in _check_ids({"PORTAL_BASE_URL": "keys.example.com"}, settings)
