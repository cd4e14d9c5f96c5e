"""/staff/proxy/settings: each setting read live, changed through a confirmation, audited
before → after; a plain sentence for an older proxy (404), a refused write, and a wrong
management key (one request, then the latch: none). Both proxy generations.

Also home to the helpers the other proxy-admin page tests share."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.test import Client

from accounts.models import User
from accounts.signin import BY_LINK, SIGNIN_METHOD_KEY
from keyportal.models import AuditEvent
from tests.conftest import MANAGEMENT_KEY
from tests.fakes.proxy import FakeProxy

# What the other proxy-page test files take from here (`import *`): fixtures and helpers,
# never this file's tests.
__all__ = ["assert_no_secret", "confirm", "old_proxy", "proxy", "staff", "staff_client",
           "writes"]

pytestmark = pytest.mark.django_db
URL = "/staff/proxy/settings"
PROXY_SECRET = "socks-password-0123456789"


# --- shared helpers ---------------------------------------------------------------------------


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("ops@example.com", is_staff=True)


@pytest.fixture
def staff_client(client: Client, staff: User) -> Client:
    client.force_login(staff)
    return client


@pytest.fixture(params=["queue", "snapshot"])
def proxy(request, settings) -> Iterator[FakeProxy]:
    """The fake proxy, new generation (7.x, usage queue) and old (6.9.x, snapshot)."""
    fake = FakeProxy(generation=request.param, management_key=MANAGEMENT_KEY).start()
    settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = fake.url, MANAGEMENT_KEY
    yield fake
    fake.stop()


@pytest.fixture
def old_proxy(settings) -> Iterator[FakeProxy]:
    """A 6.2 proxy: no /usage-statistics-enabled, no /gemini-api-key (404)."""
    fake = FakeProxy(generation="snapshot", management_key=MANAGEMENT_KEY, version="6.2.0").start()
    settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = fake.url, MANAGEMENT_KEY
    yield fake
    fake.stop()


def pending_of(response) -> str:
    """The sealed change a confirmation page carries."""
    assert response.status_code == 200, response.content[:500]
    return re.search(rb'name="pending" value="([^"]+)"', response.content).group(1).decode()


def confirm(client: Client, url: str, response):
    return client.post(url, {"pending": pending_of(response)}, follow=True)


def writes(fake: FakeProxy) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.management_requests if m != "GET"]


def assert_no_secret(secret: str, *responses) -> None:
    for response in responses:
        assert secret.encode() not in response.content
    for event in AuditEvent.objects.all():
        row = " ".join(str(v) for v in (event.target_label, event.before, event.after, event.detail))
        assert secret not in row


# --- who may look -----------------------------------------------------------------------------


# Each page, and a change posted to it.
PAGES = [(URL, URL, {"setting": "debug", "value": "true"}),
         ("/staff/proxy/upstreams", "/staff/proxy/upstreams/claude/0/delete", {"ref": "x"}),
         ("/staff/proxy/auth-files", "/staff/proxy/auth-files/delete", {"name": "a.json"})]


@pytest.mark.parametrize("page,change,data", PAGES)
def test_only_staff_signed_in_with_a_password_may_look(client, ann, staff, proxy, page, change,
                                                       data):
    assert client.get(page)["Location"].startswith("/admin/login/")
    assert client.post(change, data)["Location"].startswith("/admin/login/")
    client.force_login(ann)
    assert client.get(page)["Location"].startswith("/admin/login/")
    client.force_login(staff)
    session = client.session
    session[SIGNIN_METHOD_KEY] = BY_LINK  # staff who came in by an emailed link
    session.save()
    assert client.get(page)["Location"].startswith("/admin/login/")
    assert client.post(change, data)["Location"].startswith("/admin/login/")
    assert proxy.management_requests == []


@pytest.mark.parametrize("page,change,data", PAGES)
def test_a_wrong_management_key_costs_one_request_then_none(staff_client, proxy, settings,
                                                            page, change, data):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"
    assert "refused the management key" in staff_client.get(page).content.decode()
    assert len(proxy.management_requests) == 1 and proxy.refused_logins == 1
    assert "Nothing was sent" in staff_client.get(page).content.decode()
    staff_client.post(change, data, follow=True)
    assert len(proxy.management_requests) == 1 and proxy.peak_failures == 1


# --- reading ----------------------------------------------------------------------------------


def test_every_setting_is_read_live_in_both_generations(staff_client, proxy):
    proxy.settings.update({"debug": True, "request-retry": 7})
    proxy.statistics_enabled = False
    page = staff_client.get(URL).content.decode()
    debug = page.split('id="setting-debug"', 1)[1].split("</tr>", 1)[0]
    retries = page.split('id="setting-request-retry"', 1)[1].split("</tr>", 1)[0]
    stats = page.split('id="setting-usage-statistics-enabled"', 1)[1].split("</tr>", 1)[0]
    assert 'class="ok">on' in debug and 'value="7"' in retries and 'class="bad">off' in stats
    for name in ("request-log", "proxy-url", "quota-exceeded-switch-project",
                 "quota-exceeded-switch-preview-model"):
        assert f'id="setting-{name}"' in page
    retention = page.split('id="setting-retention"', 1)[1].split("</tr>", 1)[0]
    if proxy.generation == "queue":
        assert "60 seconds" in retention
    else:
        assert "no usage queue" in retention and "<form" not in retention


def test_the_page_pins_its_queries(staff_client, proxy, django_assert_num_queries):
    staff_client.get(URL)  # the session's first use
    # The session and the staff member, the admin sidebar's permissions (2), and one read of
    # the refusal latch (shared cache) per proxy call: 7 settings and /config.
    with django_assert_num_queries(2 + 2 + 8):
        assert staff_client.get(URL).status_code == 200


def test_an_older_proxy_says_which_setting_it_lacks(staff_client, old_proxy):
    page = staff_client.get(URL).content.decode()
    assert "This proxy version has no usage-statistics-enabled setting." in page
    assert 'id="setting-debug"' in page and "unreadable" not in page
    answer = staff_client.post(URL, {"setting": "usage-statistics-enabled", "value": "true"},
                               follow=True)
    assert "does not have the Usage statistics setting" in answer.content.decode()
    assert writes(old_proxy) == [] and not AuditEvent.objects.exists()


def test_without_a_proxy_the_page_says_so(staff_client, settings):
    settings.CLIPROXY_URL = ""
    response = staff_client.get(URL)
    assert response.status_code == 200 and "No proxy is configured" in response.content.decode()


# --- changing ---------------------------------------------------------------------------------


def test_a_change_is_confirmed_then_written_and_audited(staff_client, staff, proxy):
    asked = staff_client.post(URL, {"setting": "debug", "value": "true"})
    assert "Change a proxy setting" in asked.content.decode()
    assert proxy.settings["debug"] is False and writes(proxy) == []  # nothing yet
    assert not AuditEvent.objects.exists()
    done = confirm(staff_client, URL, asked)
    assert "Debug logging is now on." in done.content.decode()
    assert proxy.settings["debug"] is True
    assert writes(proxy) == [("PUT", "/debug")]
    event = AuditEvent.objects.get()
    assert event.action == AuditEvent.Action.PROXY_SETTING_CHANGED and event.actor == staff
    assert (event.before, event.after) == ({"debug": "off"}, {"debug": "on"})


def test_turning_statistics_off_warns_that_usage_stops(staff_client, proxy):
    asked = staff_client.post(URL, {"setting": "usage-statistics-enabled", "value": "false"})
    assert "records no usage" in asked.content.decode()
    confirm(staff_client, URL, asked)
    assert proxy.statistics_enabled is False
    on = staff_client.post(URL, {"setting": "usage-statistics-enabled", "value": "true"})
    assert "records no usage" not in on.content.decode()


def test_an_unchanged_value_sends_nothing(staff_client, proxy):
    answer = staff_client.post(URL, {"setting": "request-retry", "value": "3"}, follow=True)
    assert "already 3" in answer.content.decode() and writes(proxy) == []


@pytest.mark.parametrize("setting,value,message", [
    ("request-retry", "many", "Enter a whole number."),
    ("request-retry", "-1", "Enter a number from 0 to 100."),
    ("debug", "yes", "Choose on or off."),
    ("proxy-url", "ftp://host", "must start with"),
    ("proxy-url", "http://", "must start with"),
    ("redis-usage-queue-retention-seconds", "0", "from 1 to 3600"),
    ("no-such-setting", "1", "Select a valid choice"),
])
def test_bad_input_is_refused_and_changes_nothing(staff_client, proxy, setting, value, message):
    answer = staff_client.post(URL, {"setting": setting, "value": value})
    assert answer.status_code == 400 and message in answer.content.decode()
    assert writes(proxy) == [] and not AuditEvent.objects.exists()


def test_a_proxy_url_password_never_reaches_a_page_or_the_audit_log(staff_client, proxy):
    url = f"socks5://user:{PROXY_SECRET}@10.0.0.1:1080"
    asked = staff_client.post(URL, {"setting": "proxy-url", "value": url})
    assert "socks5://***@10.0.0.1:1080" in asked.content.decode()
    done = confirm(staff_client, URL, asked)
    assert proxy.settings["proxy-url"] == url
    shown = staff_client.get(URL)
    assert "socks5://***@10.0.0.1:1080" in shown.content.decode()
    assert AuditEvent.objects.get().after == {"proxy-url": "socks5://***@10.0.0.1:1080"}
    assert_no_secret(PROXY_SECRET, asked, done, shown)


def test_the_queue_retention_is_one_line_of_config_yaml(staff_client, proxy):
    asked = staff_client.post(URL, {"setting": "redis-usage-queue-retention-seconds",
                                    "value": "3600"}, follow=True)
    if proxy.generation == "snapshot":
        assert "no usage queue, so no retention to set" in asked.content.decode()
        assert writes(proxy) == []
        return
    assert "60 seconds" in asked.content.decode()
    confirm(staff_client, URL, asked)
    assert proxy.retention_seconds == 3600
    assert writes(proxy) == [("PUT", "/config.yaml")]
    assert proxy.config_comment == "# CLIProxyAPI configuration (fake)\n"  # comments kept
    assert AuditEvent.objects.get().after == {
        "redis-usage-queue-retention-seconds": "3600 seconds"}


@pytest.mark.parametrize("status,body", [
    (400, {"error": "invalid body"}),
    (422, {"error": "invalid_config"}),
    (500, {"error": "failed to save config: open config.yaml: read-only file system"}),
])
def test_a_refused_write_says_why_and_is_not_audited(staff_client, proxy, status, body):
    asked = staff_client.post(URL, {"setting": "request-log", "value": "true"})
    proxy.inject("/request-log", method="PUT", status=status, body=body)
    done = confirm(staff_client, URL, asked)
    page = done.content.decode()
    assert "Nothing was changed." in page and f"HTTP {status}" in page
    assert proxy.settings["request-log"] is False and not AuditEvent.objects.exists()


def test_a_confirmation_is_only_good_for_whoever_asked(staff_client, proxy, client):
    asked = staff_client.post(URL, {"setting": "debug", "value": "true"})
    other = User.objects.create_user("other@example.com", is_staff=True)
    intruder = Client()
    intruder.force_login(other)
    answer = intruder.post(URL, {"pending": pending_of(asked)}, follow=True)
    assert "no longer valid" in answer.content.decode()
    answer = staff_client.post(URL, {"pending": "garbage"}, follow=True)
    assert "no longer valid" in answer.content.decode()
    assert proxy.settings["debug"] is False and writes(proxy) == []


def test_a_proxy_that_does_not_answer_in_time_is_named(staff_client, proxy, settings):
    settings.PORTAL_REQUEST_PROXY_BUDGET = 0.3
    proxy.inject("/usage-statistics-enabled", delay=1.0)
    page = staff_client.get(URL).content.decode()
    assert "did not answer within" in page
    assert len(proxy.management_requests) == 1  # the rest were not asked


# --- the config.yaml line edit (pool.proxy_admin.config_with_retention) ----------------------


def test_the_retention_line_is_replaced_or_added_and_nothing_else_moves():
    from pool.proxy_admin import ConfigEditRefused, config_with_retention

    text = "# mine\nport: 8317\nredis-usage-queue-retention-seconds: 60  # s\napi-keys:\n  - k\n"
    assert config_with_retention(text, 3600) == text.replace("60  # s", "3600")
    assert config_with_retention("port: 8317", 120) == (
        "port: 8317\nredis-usage-queue-retention-seconds: 120\n")
    quoted = 'redis-usage-queue-retention-seconds: "90"\n'
    assert config_with_retention(quoted, 5) == "redis-usage-queue-retention-seconds: 5\n"
    with pytest.raises(ConfigEditRefused):
        config_with_retention("redis-usage-queue-retention-seconds: 1\n"
                              "redis-usage-queue-retention-seconds: 2\n", 5)
    with pytest.raises(ConfigEditRefused):  # nested, or a value the portal does not parse
        config_with_retention("redis-usage-queue-retention-seconds: &anchor 60\n", 5)


def test_a_proxy_with_management_off_is_not_called_an_old_version(staff_client, proxy):
    proxy.management_enabled = False  # every /v0/management route answers 404
    page = staff_client.get(URL).content.decode()
    assert "management API is probably disabled" in page and "<form" not in page.split(
        'id="proxy-settings"', 1)[1]
