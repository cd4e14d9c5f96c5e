"""Sign-in with a company account from an LDAP directory: a real OpenLDAP server (Debian's
slapd, started by the test run on 127.0.0.1) and the portal's test client. The identity is the
directory's email attribute, folded and allow-listed as an emailed link's; the session is a
person's, never the admin's; every sign-in and every refusal is audited with its method."""

from __future__ import annotations

import logging
import socket
import threading
import types
from collections.abc import Iterator

import pytest
from allauth.socialaccount.models import SocialAccount
from django.test import Client

from accounts.models import LimitDefaults, User
from accounts.signin import staff_with_password
from keyportal.models import AuditEvent
from tests.fakes.slapd import (
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PASSWORD,
    Slapd,
    running_slapd,
)

pytestmark = pytest.mark.django_db
LOGIN = "/login/ldap"
Action = AuditEvent.Action


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with running_slapd() as server:
        yield server


@pytest.fixture
def directory(settings, slapd) -> Slapd:
    """The portal pointed at the directory, searching as the service account."""
    settings.PORTAL_LDAP_URL = slapd.url
    settings.PORTAL_LDAP_BIND_DN = SERVICE_DN
    settings.PORTAL_LDAP_BIND_PASSWORD = SERVICE_PASSWORD
    settings.PORTAL_LDAP_USER_SEARCH_BASE = PEOPLE_DN
    settings.PORTAL_LDAP_USER_FILTER = "(uid=%(user)s)"
    settings.PORTAL_LDAP_USER_DN_TEMPLATE = ""
    settings.PORTAL_LDAP_EMAIL_ATTR = "mail"
    settings.PORTAL_LDAP_START_TLS = False
    settings.PORTAL_LDAP_CA_FILE = ""
    settings.PORTAL_LDAP_TIMEOUT = 5
    return slapd


def sign_in(client: Client, username: str, password: str, ip: str = "127.0.0.1"):
    return client.post(LOGIN, {"ldap-username": username, "ldap-password": password},
                       REMOTE_ADDR=ip)


def signed_in_as(client: Client) -> User | None:
    user_id = client.session.get("_auth_user_id")
    return User.objects.filter(pk=user_id).first() if user_id else None


def refusal() -> AuditEvent:
    return AuditEvent.objects.get(action=Action.SIGN_IN_REFUSED)


def test_the_login_page_shows_the_company_account_form_only_when_a_directory_is_set(
    client, settings
):
    settings.PORTAL_LDAP_URL = ""
    page = client.get("/login").content.decode()
    assert "Sign in with your company account" not in page and 'name="ldap-password"' not in page
    assert client.post(LOGIN, {"ldap-username": "ann", "ldap-password": "x"}).status_code == 404
    settings.PORTAL_LDAP_URL = "ldap://127.0.0.1:9"
    page = client.get("/login").content.decode()
    assert "Sign in with your company account" in page
    assert 'name="ldap-username"' in page and 'type="password"' in page
    assert 'name="email"' in page  # the emailed link stays beside it


def test_the_company_account_form_is_in_chinese_too(client, settings):
    settings.PORTAL_LDAP_URL = "ldap://127.0.0.1:9"
    page = client.get("/login", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "使用公司账户登录" in page and "用户名" in page


def test_the_right_password_signs_in_and_creates_the_person_with_the_defaults(client, directory):
    LimitDefaults.objects.create(id=1, limit_tokens_day=4321)
    response = sign_in(client, "ann", "ann-secret")
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    ann = User.objects.get(email="ann.lee@example.com")  # folded from Ann.Lee@Example.com
    assert signed_in_as(client) == ann
    assert ann.name == "Ann Lee" and ann.limit_tokens_day == 4321
    assert not ann.has_usable_password() and not ann.is_staff
    link = SocialAccount.objects.get(user=ann)
    assert (link.provider, link.uid) == ("ldap", f"uid=ann,{PEOPLE_DN}")
    assert set(link.extra_data) == {"dn", "username", "email"}  # never the whole entry
    assert client.get("/my-keys").status_code == 200
    row = AuditEvent.objects.get(action=Action.SIGN_IN)
    assert row.actor == ann and row.after == {"method": "ldap", "provider": "ldap"}
    assert row.detail == "ldap: 127.0.0.1"


def test_a_second_sign_in_finds_the_same_person_also_one_who_registered_by_email(
    client, directory
):
    bo = User.objects.create_user("bo@example.com")
    assert sign_in(client, "bo", "bo-secret").status_code == 303
    assert signed_in_as(client) == bo
    other = Client()
    assert sign_in(other, " bo ", "bo-secret").status_code == 303
    assert signed_in_as(other) == bo
    assert User.objects.count() == 1 and SocialAccount.objects.count() == 1
    assert AuditEvent.objects.filter(action=Action.SIGN_IN, actor=bo).count() == 2


def test_the_directory_can_be_searched_anonymously_or_the_dn_built_from_a_template(
    client, directory, settings
):
    settings.PORTAL_LDAP_BIND_DN = settings.PORTAL_LDAP_BIND_PASSWORD = ""
    assert sign_in(client, "bo", "bo-secret").status_code == 303
    settings.PORTAL_LDAP_USER_SEARCH_BASE = ""
    settings.PORTAL_LDAP_USER_DN_TEMPLATE = f"uid=%(user)s,{PEOPLE_DN}"
    other = Client()
    assert sign_in(other, "bo", "bo-secret").status_code == 303
    assert signed_in_as(other) == User.objects.get(email="bo@example.com")
    assert sign_in(Client(), "bo", "wrong").status_code == 400


def test_a_template_bind_reads_the_entry_as_the_person_where_anonymous_readers_see_nothing(
    client, settings
):
    with running_slapd(anonymous_search=False) as closed:
        settings.PORTAL_LDAP_URL = closed.url
        settings.PORTAL_LDAP_USER_SEARCH_BASE = ""
        settings.PORTAL_LDAP_USER_DN_TEMPLATE = f"uid=%(user)s,{PEOPLE_DN}"
        settings.PORTAL_LDAP_BIND_DN = settings.PORTAL_LDAP_BIND_PASSWORD = ""
        assert sign_in(client, "ann", "ann-secret").status_code == 303
        # and the anonymous search finds nobody there: refused as a wrong username
        settings.PORTAL_LDAP_USER_DN_TEMPLATE = ""
        settings.PORTAL_LDAP_USER_SEARCH_BASE = PEOPLE_DN
        assert sign_in(Client(), "ann", "ann-secret").status_code == 400
    assert signed_in_as(client).email == "ann.lee@example.com"


@pytest.mark.parametrize("username,password,reason", [
    ("ann", "not-her-password", "user DN/password rejected"),
    ("nobody", "whatever", "failed to map the username to a DN"),
    ("ann)(uid=*", "ann-secret", "failed to map the username to a DN"),  # filter escaped
])
def test_a_wrong_password_or_unknown_user_is_refused_alike_and_audited(
    client, directory, username, password, reason
):
    response = sign_in(client, username, password)
    assert response.status_code == 400
    page = response.content.decode()
    assert "The username or password is wrong." in page
    assert 'name="ldap-username"' in page and 'value="' + username.split(")")[0] in page
    assert password not in page  # the password field is never filled back in
    assert signed_in_as(client) is None and not User.objects.exists()
    row = refusal()
    assert row.after == {"method": "provider", "provider": "ldap"}
    assert reason in row.detail and password not in row.detail


def test_an_empty_password_is_never_an_anonymous_bind(client, directory, settings):
    # LDAP takes a DN with no password as an anonymous bind, which succeeds: the portal must
    # refuse it before asking the directory, form or not.
    assert sign_in(client, "ann", "").status_code == 400
    from django.test import RequestFactory

    from accounts.ldap import WrongCredentials, directory_account

    with pytest.raises(WrongCredentials):
        directory_account(request=RequestFactory().post(LOGIN), username="ann", password="")
    assert signed_in_as(client) is None and not User.objects.exists()


def test_an_account_without_the_email_attribute_is_refused_and_nothing_is_created(
    client, directory
):
    response = sign_in(client, "cy", "cy-secret")
    assert response.status_code == 403
    assert "has no email address in the directory" in response.content.decode()
    assert signed_in_as(client) is None and not User.objects.exists()
    assert not SocialAccount.objects.exists()
    assert "no valid mail attribute" in refusal().detail


def test_the_email_attribute_is_configurable(client, directory, settings):
    # cn holds no address: with it as the email attribute, ann is refused; with mail, signed in.
    settings.PORTAL_LDAP_EMAIL_ATTR = "CN"
    response = sign_in(client, "ann", "ann-secret")
    assert response.status_code == 403 and not User.objects.exists()
    assert "has no email address in the directory" in response.content.decode()
    assert "no valid CN attribute" in refusal().detail
    settings.PORTAL_LDAP_EMAIL_ATTR = "MAIL"  # attribute names are case-insensitive
    assert sign_in(client, "ann", "ann-secret").status_code == 303


def test_an_address_at_another_domain_is_refused(client, directory, settings):
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["example.com"]
    response = sign_in(client, "dee", "dee-secret")
    assert response.status_code == 403
    assert "Only addresses at example.com can use this portal." in response.content.decode()
    assert not User.objects.exists() and refusal().detail == "ldap: domain not allowed"
    assert sign_in(client, "bo", "bo-secret").status_code == 303  # control: an allowed one


def test_a_deactivated_person_is_refused(client, directory):
    eve = User.objects.create_user("eve@example.com", is_active=False)
    response = sign_in(client, "eve", "eve-secret")
    assert response.status_code == 403
    assert "This account is deactivated." in response.content.decode()
    assert signed_in_as(client) is None and refusal().target_id == str(eve.pk)


def test_an_ldap_sign_in_is_a_persons_session_and_the_admin_keeps_its_own_password(
    client, directory
):
    boss = User.objects.create_superuser("bo@example.com", "the-admin-password-1")
    assert sign_in(client, "bo", "bo-secret").status_code == 303
    assert signed_in_as(client) == boss
    for page in ("/admin/", "/staff/leaderboard"):
        response = client.get(page)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    request = types.SimpleNamespace(user=boss, session=client.session)
    assert staff_with_password(request) is False
    # The directory's password does not open the admin's password form, by address or by
    # directory username; the admin's own password does.
    admin = Client()
    for username in ("bo@example.com", "bo"):
        admin.post("/admin/login/?next=/admin/", {"username": username, "password": "bo-secret"})
        assert admin.get("/admin/").status_code == 302
    admin.post("/admin/login/?next=/admin/",
               {"username": "bo@example.com", "password": "the-admin-password-1"})
    assert admin.get("/admin/").status_code == 200


def test_the_password_is_never_logged(client, directory, caplog):
    caplog.set_level(logging.DEBUG)
    sign_in(client, "ann", "ann-secret")
    sign_in(Client(), "ann", "a-wrong-guess-42")
    assert "django_auth_ldap" in caplog.text  # its debug lines were captured
    assert "ann-secret" not in caplog.text and "a-wrong-guess-42" not in caplog.text
    assert SERVICE_PASSWORD not in caplog.text


def test_wrong_passwords_are_limited_per_username_and_every_attempt_per_address(
    client, directory, settings
):
    settings.PORTAL_RATE_PER_EMAIL = 2
    settings.PORTAL_RATE_PER_IP = 5
    for n in range(2):
        assert sign_in(client, "ann", f"guess-{n}", ip="10.0.0.1").status_code == 400
    # ann's wrong passwords are used up, from any address, even with the right one
    limited = sign_in(client, "ann", "ann-secret", ip="10.0.0.2")
    assert limited.status_code == 429
    assert "Too many attempts. Please wait 15 minutes" in limited.content.decode()
    assert signed_in_as(client) is None
    # successful sign-ins do not use up a username's budget
    for _ in range(3):
        assert sign_in(Client(), "bo", "bo-secret", ip="10.0.0.3").status_code == 303
    # ...but every attempt counts against the address
    assert sign_in(Client(), "bo", "bo-secret", ip="10.0.0.3").status_code == 303
    assert sign_in(Client(), "bo", "bo-secret", ip="10.0.0.3").status_code == 303
    assert sign_in(Client(), "bo", "bo-secret", ip="10.0.0.3").status_code == 429


def test_a_directory_that_is_down_gets_a_sentence(client, directory, settings):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        settings.PORTAL_LDAP_URL = f"ldap://127.0.0.1:{s.getsockname()[1]}"
    response = sign_in(client, "ann", "ann-secret")
    assert response.status_code == 503
    assert "The company directory cannot be reached right now." in response.content.decode()
    assert 'name="email"' in response.content.decode()  # the emailed link is right there
    assert signed_in_as(client) is None and not User.objects.exists()
    assert "unreachable: SERVER_DOWN" in refusal().detail


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"ldap://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=10)
    for conn in held:
        conn.close()
    listener.close()


def test_a_directory_that_never_answers_gets_a_sentence_within_the_timeout(
    client, directory, settings, silent_server
):
    settings.PORTAL_LDAP_URL = silent_server
    settings.PORTAL_LDAP_TIMEOUT = 1
    response = sign_in(client, "ann", "ann-secret")
    assert response.status_code == 503
    assert "The company directory cannot be reached right now." in response.content.decode()
    assert "unreachable" in refusal().detail


def test_a_service_account_the_directory_refuses_is_told_as_such(client, directory, settings):
    settings.PORTAL_LDAP_BIND_PASSWORD = "not-the-service-password"
    response = sign_in(client, "ann", "ann-secret")
    assert response.status_code == 503
    assert "The company directory refused the portal&#x27;s request." in response.content.decode()
    assert signed_in_as(client) is None and not User.objects.exists()
    detail = refusal().detail
    assert "refused the portal: INVALID_CREDENTIALS" in detail
    assert "not-the-service-password" not in detail


def test_the_sign_in_path_is_not_mistaken_for_a_link_token_in_the_logs():
    from keyportal.logging import redact

    assert redact("POST /login/ldap HTTP/1.1") == "POST /login/ldap HTTP/1.1"
    assert "ldapx1234" not in redact("GET /login/ldapx1234 HTTP/1.1")
    assert "abcdef123456" not in redact("GET /login/abcdef123456 HTTP/1.1")


@pytest.mark.parametrize("env,named", [
    ({"PORTAL_LDAP_URL": "ldap://127.0.0.1:9"}, "PORTAL_LDAP_USER_SEARCH_BASE"),
    ({"PORTAL_LDAP_URL": "ldap://127.0.0.1:9", "PORTAL_LDAP_USER_SEARCH_BASE": "dc=x",
      "PORTAL_LDAP_USER_FILTER": "(uid=ann)"}, "must contain %(user)s"),
])
def test_an_incomplete_directory_setting_stops_the_portal_with_a_sentence(env, named):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=root,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "keyportal.settings", **env},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and named in result.stderr
    complete = {**env, "PORTAL_LDAP_USER_SEARCH_BASE": "dc=x",
                "PORTAL_LDAP_USER_FILTER": "(uid=%(user)s)"}
    control = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"], cwd=root,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "keyportal.settings", **complete},
        capture_output=True, text=True, timeout=120,
    )
    assert control.returncode == 0, control.stderr


def test_starttls_with_the_directorys_ca_file(client, settings):
    with running_slapd(tls=True) as secured:
        settings.PORTAL_LDAP_URL = secured.url
        settings.PORTAL_LDAP_USER_SEARCH_BASE = PEOPLE_DN
        settings.PORTAL_LDAP_BIND_DN = SERVICE_DN
        settings.PORTAL_LDAP_BIND_PASSWORD = SERVICE_PASSWORD
        settings.PORTAL_LDAP_START_TLS = True
        # control: without the CA, the server's certificate is not trusted and nothing is sent
        response = sign_in(Client(), "bo", "bo-secret")
        assert response.status_code == 503
        assert "refused the portal&#x27;s request" in response.content.decode()
        assert "refused the portal: CONNECT_ERROR" in refusal().detail
        settings.PORTAL_LDAP_CA_FILE = secured.ca_file
        assert sign_in(client, "bo", "bo-secret").status_code == 303
    assert signed_in_as(client).email == "bo@example.com"


def test_staff_see_who_signs_in_with_the_company_directory(client, directory, admin_client):
    assert sign_in(client, "bo", "bo-secret").status_code == 303
    bo = User.objects.get(email="bo@example.com")
    User.objects.create_user("link-only@example.com")
    page = admin_client.get(f"/admin/accounts/user/{bo.pk}/change/").content.decode()
    assert f"company directory (LDAP) (subject uid=bo,{PEOPLE_DN}" in page
    listed = admin_client.get("/admin/accounts/user/?provider=ldap").content.decode()
    assert "bo@example.com" in listed and "link-only@example.com" not in listed


def test_a_server_error_during_the_bind_shows_no_password_in_its_report(directory, monkeypatch):
    import sys

    import ldap.ldapobject
    from django.test import RequestFactory
    from django.views.debug import ExceptionReporter

    from accounts.ldap import directory_account

    def broken(self, who, cred, *args, **kwargs):
        if cred == secret:
            raise RuntimeError("the bind broke")
        return original(self, who, cred, *args, **kwargs)

    # Built, so that the report's source lines (shown around each frame) do not hold it.
    secret = "-".join(["ann", "secret", "xyzzy"])
    original = ldap.ldapobject.SimpleLDAPObject.simple_bind_s
    monkeypatch.setattr(ldap.ldapobject.SimpleLDAPObject, "simple_bind_s", broken)
    request = RequestFactory().post(LOGIN)
    try:
        directory_account(request=request, username="ann", password=secret)
    except RuntimeError:
        kind, error, tb = sys.exc_info()
        # The report from the sign-in's own frames down (this test's frame, which holds the
        # password as a literal, is not the portal's).
        while tb is not None and tb.tb_frame.f_code.co_name != "sensitive_variables_wrapper":
            tb = tb.tb_next
        assert tb is not None
        report = ExceptionReporter(request, kind, error, tb).get_traceback_html()
    else:
        pytest.fail("the bind did not break")
    assert "the bind broke" in report and "bind_password" in report  # frames and their locals
    assert "ann-secret-xyzzy" not in report and SERVICE_PASSWORD not in report


def test_staff_can_delete_a_person_who_signed_in_with_the_directory(client, directory,
                                                                    admin_client):
    # The delete page lists the person's related rows by their names: the directory link is
    # not one of allauth's providers, and must not break it.
    assert sign_in(client, "bo", "bo-secret").status_code == 303
    bo = User.objects.get(email="bo@example.com")
    page = admin_client.get(f"/admin/accounts/user/{bo.pk}/delete/")
    assert page.status_code == 200
    admin_client.post(f"/admin/accounts/user/{bo.pk}/delete/", {"post": "yes"})
    assert not User.objects.filter(pk=bo.pk).exists() and not SocialAccount.objects.exists()


@pytest.mark.parametrize("url,start_tls,ids", [
    ("ldap://dc1.corp.example.com", False, ["accounts.W001"]),  # passwords in the clear
    ("ldap://dc1.corp.example.com", True, []),
    ("ldaps://dc1.corp.example.com", False, []),
    ("ldap://127.0.0.1:3890", False, []),  # on this machine
    ("http://dc1.corp.example.com", False, ["accounts.E001"]),
    ("", False, []),  # off
])
def test_the_directory_settings_are_checked(settings, url, start_tls, ids):
    from django.core.checks import run_checks

    settings.PORTAL_LDAP_URL = url
    settings.PORTAL_LDAP_START_TLS = start_tls
    found = [m.id for m in run_checks() if m.id.startswith("accounts.")]
    assert found == ids
