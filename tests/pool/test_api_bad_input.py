"""Bad input to the JSON API's endpoints that take a body (register-key, my-keys, revoke-key),
by session and by staff token: always a JSON 4xx with one sentence, never a 500 or an HTML
page, and nothing changed. Run on SQLite and on PostgreSQL (column lengths, NUL)."""

from __future__ import annotations

import json

import pytest

from accounts.models import User
from keyportal.api import MAX_BODY_BYTES
from keyportal.models import AuditEvent
from pool.models import ApiKey
from pool.services import key_assign

pytestmark = pytest.mark.django_db

ENDPOINTS = ["/api/register-key", "/api/my-keys", "/api/revoke-key"]
LONG_EMAIL = "a" * 64 + "@" + ("d" * 63 + ".") * 3 + "example.com"  # valid, 268 characters


@pytest.fixture(params=["session", "token"])
def caller(request, client, ann, staff, ready_keys):
    """A client plus headers: Ann by session, or the staff token (which acts for Ann when the
    body names her, and may create people at register-key)."""
    if request.param == "session":
        client.force_login(ann)
        return client, {}
    return client, {"Authorization": f"Bearer {request.getfixturevalue('token')}"}


@pytest.fixture
def ann_key(ann, ready_keys):
    return key_assign(user=ann, label="mine")


def state() -> tuple:
    return (
        User.objects.count(),
        sorted(ApiKey.objects.values_list("id", "owner_id", "status", "label")),
        AuditEvent.objects.count(),
    )


def assert_refused(response, status: int = 400) -> str:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and message.endswith(".") and "\n" not in message
    assert message.count(". ") == 0  # one sentence
    return message


def send(caller, url: str, raw: str | bytes):
    client, headers = caller
    return client.post(url, raw, content_type="application/json", headers=headers)


@pytest.mark.parametrize("url", ENDPOINTS)
def test_deeply_nested_json_is_refused(caller, url, ann_key):
    before = state()
    for depth in (30_000, 50):  # the parser gives up; our own cap
        raw = '{"label": ' + "[" * depth + "]" * depth + "}"
        assert "nested" in assert_refused(send(caller, url, raw))
    assert state() == before


@pytest.mark.parametrize("url", ENDPOINTS)
@pytest.mark.parametrize("field", ["key", "label", "email"])
@pytest.mark.parametrize("text", [r"\ud800", r"ann\udfff@example.com", r"x\u0000y"])
def test_lone_surrogates_and_nul_are_refused(caller, url, field, text, ann_key):
    before = state()
    raw = '{"%s": "%s", "id": %d}' % (field, text, ann_key.key.pk)
    assert_refused(send(caller, url, raw))
    assert state() == before


def test_surrogates_in_object_keys_are_refused(caller, ann_key):
    before = state()
    assert_refused(send(caller, "/api/register-key", r'{"\ud800": 1}'))
    assert state() == before


@pytest.mark.parametrize("url", ENDPOINTS)
def test_an_email_longer_than_the_column_is_refused(caller, url, ann_key):
    assert 254 < len(LONG_EMAIL) <= 320
    before = state()
    body = {"email": LONG_EMAIL, "id": ann_key.key.pk, "label": "x"}
    response = send(caller, url, json.dumps(body))
    assert response.status_code in (400, 403)  # a session may only name itself
    assert_refused(response, response.status_code)
    assert state() == before


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_body_over_the_limit_is_refused_as_json_413(caller, url, ann_key, settings):
    before = state()
    big = json.dumps({"label": "x" * (5 * 1024 * 1024)})
    assert "too large" in assert_refused(send(caller, url, big), 413)
    just_over = json.dumps({"label": "x" * MAX_BODY_BYTES})
    assert_refused(send(caller, url, just_over), 413)
    assert state() == before


def test_a_form_encoded_body_over_djangos_limit_is_json_413_too(client, ann, settings):
    # The session's CSRF check reads request.POST, where Django itself refuses the size.
    client.force_login(ann)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post(
        "/api/my-keys", "a=" + "x" * 5000, content_type="application/x-www-form-urlencoded"
    )
    assert_refused(response, 413)


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/api/register-key", {"label": ["a"]}),
        ("/api/register-key", {"label": {"a": 1}}),
        ("/api/register-key", {"label": 5}),
        ("/api/register-key", {"label": True}),
        ("/api/register-key", {"email": ["ann@example.com"]}),
        ("/api/my-keys", {"email": 1}),
        ("/api/revoke-key", {"id": "KEY"}),
        ("/api/revoke-key", {"id": True}),
        ("/api/revoke-key", {"id": 1.5}),
        ("/api/revoke-key", {"id": [1]}),
        ("/api/revoke-key", {"key": ["sk-kp-x"]}),
        ("/api/revoke-key", {"key": 12}),
    ],
)
def test_values_of_the_wrong_type_are_refused(caller, url, body, ann_key):
    before = state()
    message = assert_refused(send(caller, url, json.dumps(body)))
    assert "must be" in message
    assert state() == before


def test_a_revoke_by_an_id_given_as_text_does_not_revoke(caller, ann_key):
    assert_refused(send(caller, "/api/revoke-key", json.dumps({"id": str(ann_key.key.pk)})))
    assert ApiKey.objects.get(pk=ann_key.key.pk).status == ApiKey.Status.ACTIVE


def test_an_id_beyond_any_integer_column_is_not_found(caller):
    response = send(caller, "/api/revoke-key", json.dumps({"id": 2**70}))
    assert response.status_code in (400, 404)
    assert_refused(response, response.status_code)


def test_a_label_list_is_not_stored_as_its_repr(caller, ann):
    send(caller, "/api/register-key", json.dumps({"label": ["a"]}))
    assert not ApiKey.objects.filter(label="['a']").exists()
    assert not ApiKey.objects.filter(owner=ann).exists()


def test_good_input_still_works_after_the_checks(caller, ann):
    created = send(caller, "/api/register-key", json.dumps({"label": "ok ü ✓", "email": ann.email}))
    assert created.status_code == 201 and created.json()["label"] == "ok ü ✓"
    assert send(caller, "/api/my-keys", "").status_code == 200
