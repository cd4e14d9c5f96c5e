"""/staff/proxy/auth-files: the proxy's OAuth files listed (provider, account, status where
the version reports it) without their tokens; uploaded (validated first, confirmed, sealed in
between) and deleted with a confirmation; audited without a token."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from keyportal.models import AuditEvent
from tests.pool.test_proxy_settings import *  # noqa: F403 - its fixtures and helpers

pytestmark = pytest.mark.django_db
URL = "/staff/proxy/auth-files"
TOKEN = "ya29.refresh-token-that-must-never-show-ZZZZ9999"
AUTH = {"type": "claude", "email": "ops@corp.example", "access_token": TOKEN,
        "refresh_token": TOKEN + "-r"}


def upload(name: str = "claude-ops.json", content: bytes | None = None) -> SimpleUploadedFile:
    data = json.dumps(AUTH).encode() if content is None else content
    return SimpleUploadedFile(name, data, content_type="application/json")


def test_files_are_listed_with_provider_account_and_status_never_tokens(staff_client, proxy):
    proxy.add_auth_file("gemini-a.json", {"type": "gemini", "email": "a@corp.example",
                                          "token": {"access_token": TOKEN}}, disabled=True)
    response = staff_client.get(URL)
    page = response.content.decode()
    assert "gemini-a.json" in page and "a@corp.example" in page and "gemini" in page
    assert 'class="bad">disabled' in page  # 6.9 and 7.x report it
    assert_no_secret(TOKEN, response)


def test_an_older_proxy_does_not_report_a_status(staff_client, old_proxy):
    old_proxy.add_auth_file("g.json", {"type": "gemini", "email": "g@corp.example"})
    page = staff_client.get(URL).content.decode()
    assert "g@corp.example" in page and "not reported by this proxy version" in page


def test_the_page_pins_its_queries(staff_client, proxy, django_assert_num_queries):
    proxy.add_auth_file("a.json", AUTH)
    staff_client.get(URL)
    with django_assert_num_queries(2 + 2 + 1):  # session, user, sidebar (2), one latch read
        assert staff_client.get(URL).status_code == 200


def test_an_upload_is_checked_confirmed_sent_and_audited(staff_client, staff, proxy):
    asked = staff_client.post(URL, {"file": upload()})
    text = asked.content.decode()
    assert "Upload an auth file" in text and "ops@corp.example" in text and "claude" in text
    assert proxy.auth_files == {} and writes(proxy) == []
    done = confirm(staff_client, URL, asked)
    assert "Uploaded claude-ops.json." in done.content.decode()
    assert proxy.auth_files["claude-ops.json"]["content"] == AUTH  # sent byte for byte
    assert writes(proxy) == [("POST", "/auth-files")]
    event = AuditEvent.objects.get()
    assert event.action == AuditEvent.Action.PROXY_AUTH_FILE_CHANGED and event.actor == staff
    assert event.after == {"name": "claude-ops.json", "provider": "claude",
                           "email": "ops@corp.example"}
    assert_no_secret(TOKEN, asked, done)


@pytest.mark.parametrize("name,content,message", [
    ("notes.txt", None, "must be a .json file"),
    ("a.json", b"{not json", "not valid JSON"),
    ("a.json", b"[1, 2]", "must hold a JSON object"),
    ("a.json", b'{"a": "' + b"x" * 70_000 + b'"}', "larger than 64 KB"),
])
def test_bad_files_are_refused_before_anything_is_sent(staff_client, proxy, name, content,
                                                       message):
    answer = staff_client.post(URL, {"file": upload(name, content)})
    assert answer.status_code == 400 and message in answer.content.decode()
    assert writes(proxy) == [] and not AuditEvent.objects.exists()


def test_a_refused_upload_says_why(staff_client, proxy):
    asked = staff_client.post(URL, {"file": upload()})
    proxy.inject("/auth-files", method="POST", status=500, body={"error": "disk full"})
    done = confirm(staff_client, URL, asked)
    assert "Nothing was changed." in done.content.decode() and "disk full" in done.content.decode()
    assert proxy.auth_files == {} and not AuditEvent.objects.exists()


def test_deleting_asks_first_then_deletes_and_audits(staff_client, proxy):
    proxy.add_auth_file("claude-ops.json", AUTH)
    asked = staff_client.post(f"{URL}/delete", {"name": "claude-ops.json"})
    assert "Delete an auth file" in asked.content.decode() and proxy.auth_files
    done = confirm(staff_client, f"{URL}/delete", asked)
    assert "Deleted claude-ops.json." in done.content.decode() and proxy.auth_files == {}
    event = AuditEvent.objects.get()
    assert event.before == {"name": "claude-ops.json", "provider": "claude",
                            "email": "ops@corp.example"} and event.after is None
    assert_no_secret(TOKEN, asked, done)


def test_deleting_a_file_the_proxy_does_not_have_sends_nothing(staff_client, proxy):
    answer = staff_client.post(f"{URL}/delete", {"name": "../../etc/passwd"}, follow=True)
    assert "no auth file named" in answer.content.decode() and writes(proxy) == []
