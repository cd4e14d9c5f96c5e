"""The user side of the JSON API: POST /api/register-key, /api/my-keys, /api/revoke-key,
by session (with CSRF) and by staff API token (acting for a person named by `email`)."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from accounts.models import ApiToken, User
from pool.models import ApiKey, key_digest
from pool.services import key_assign

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState


def post(client, url: str, body=None, **headers):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body or {})
    return client.post(url, data, content_type="application/json", headers=headers)


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


# --- session callers ------------------------------------------------------------------------


def test_a_person_registers_lists_and_revokes_their_own_key(client, ann, ready_keys, settings):
    settings.CLIPROXY_PUBLIC_URL = "http://proxy.example:8317"
    client.force_login(ann)

    created = post(client, "/api/register-key", {"label": "script"})

    assert created.status_code == 201 and "no-store" in created["Cache-Control"]
    body = created.json()
    key = ApiKey.objects.get(owner=ann)
    assert key_digest(body["key"]) == key.key_hash
    assert body["label"] == "script" and body["status"] == "active"
    assert body["openai_base_url"] == "http://proxy.example:8317/v1"

    listed = post(client, "/api/my-keys").json()
    assert listed["email"] == "ann@example.com"
    assert [k["id"] for k in listed["keys"]] == [key.pk]
    assert body["key"] not in json.dumps(listed)

    revoked = post(client, "/api/revoke-key", {"id": key.pk})
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert ApiKey.objects.get(pk=key.pk).proxy_state == State.REMOVAL_PENDING  # no proxy set


def test_revoke_by_full_value_works_too(client, ann, ready_keys):
    issued = key_assign(user=ann, label="")
    client.force_login(ann)
    response = post(client, "/api/revoke-key", {"key": issued.value})
    assert response.status_code == 200
    assert ApiKey.objects.get(pk=issued.key.pk).status == Status.REVOKED


def test_another_persons_key_is_not_found(client, ann, bob, ready_keys):
    issued = key_assign(user=ann, label="")
    client.force_login(bob)
    for body in ({"id": issued.key.pk}, {"key": issued.value}):
        response = post(client, "/api/revoke-key", body)
        assert response.status_code == 404 and response.json() == {"error": "No such key."}
    assert ApiKey.objects.get(pk=issued.key.pk).status == Status.ACTIVE
    assert post(client, "/api/my-keys").json()["keys"] == []


def test_a_session_cannot_act_for_someone_else(client, ann, bob, ready_keys):
    key_assign(user=bob, label="")
    client.force_login(ann)
    for url in ("/api/my-keys", "/api/register-key", "/api/revoke-key"):
        response = post(client, url, {"email": "bob@example.com", "id": 1})
        assert response.status_code == 403 and "own keys" in response.json()["error"]
    assert ApiKey.objects.filter(owner=ann).count() == 0


def test_anonymous_callers_get_a_json_401(client, ready_keys):
    for url in ("/api/my-keys", "/api/register-key", "/api/revoke-key"):
        response = post(client, url, {"label": "x", "id": 1})
        assert response.status_code == 401 and response.json()["error"]
    assert ApiKey.objects.filter(status=Status.POOL).count() == 5


def test_session_posts_need_the_csrf_token(ann, ready_keys):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ann)
    refused = post(client, "/api/register-key", {"label": "x"})
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    assert ApiKey.objects.filter(owner=ann).count() == 0
    client.get("/my-keys")  # the page sets the CSRF cookie
    csrf = client.cookies["csrftoken"].value
    accepted = post(client, "/api/register-key", {"label": "x"}, **{"X-CSRFToken": csrf})
    assert accepted.status_code == 201


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"label": "x" * 101}, "at most 100 characters"),
        ({"label": "x", "email": 7}, "`email` must be a string"),
        ({"label": 5}, "`label` must be a string"),
    ],
)
def test_bad_input_is_a_json_400_and_changes_nothing(client, ann, ready_keys, body, message):
    client.force_login(ann)
    response = post(client, "/api/register-key", body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert ApiKey.objects.filter(owner=ann).count() == 0


def test_revoke_needs_an_id_or_a_key(client, ann):
    client.force_login(ann)
    for body in ({}, {"id": "abc"}, {"id": -1}):
        response = post(client, "/api/revoke-key", body)
        assert response.status_code == 400 and response.json()["error"]


def test_empty_pool_is_a_json_503(client, ann):
    client.force_login(ann)
    response = post(client, "/api/register-key", {"label": "x"})
    assert response.status_code == 503 and "No key is available" in response.json()["error"]


def test_other_methods_get_a_json_405(client, ann):
    client.force_login(ann)
    for url in ("/api/my-keys", "/api/register-key", "/api/revoke-key"):
        response = client.get(url)
        assert response.status_code == 405 and response["Allow"] == "POST"


# --- staff API tokens -----------------------------------------------------------------------


def test_a_token_acts_for_the_person_named_and_creates_them(client, token, ready_keys):
    created = post(client, "/api/register-key", {"email": "New@Example.com", "label": "ci"}, **bearer(token))
    assert created.status_code == 201 and created.json()["email"] == "new@example.com"
    person = User.objects.get(email="new@example.com")
    key = ApiKey.objects.get(owner=person)

    listed = post(client, "/api/my-keys", {"email": "new@example.com"}, **bearer(token))
    assert [k["id"] for k in listed.json()["keys"]] == [key.pk]

    revoked = post(client, "/api/revoke-key", {"email": "new@example.com", "id": key.pk}, **bearer(token))
    assert revoked.json()["status"] == "revoked"


def test_a_token_without_email_acts_as_its_staff_person(client, token, staff, ready_keys):
    assert post(client, "/api/register-key", {}, **bearer(token)).status_code == 201
    assert ApiKey.objects.get(status=Status.ACTIVE).owner == staff


def test_a_token_needs_no_csrf(token, ready_keys):
    client = Client(enforce_csrf_checks=True)
    assert post(client, "/api/register-key", {"email": "x@example.com"}, **bearer(token)).status_code == 201


def test_a_token_still_reaches_a_key_only_through_its_owner(client, token, ann, bob, ready_keys):
    issued = key_assign(user=ann, label="")
    response = post(client, "/api/revoke-key", {"email": "bob@example.com", "id": issued.key.pk}, **bearer(token))
    assert response.status_code == 404
    unknown = post(client, "/api/my-keys", {"email": "nobody@example.com"}, **bearer(token))
    assert unknown.status_code == 404 and unknown.json()["error"]


def test_a_token_creating_a_person_respects_the_domain_list(client, token, ready_keys, settings):
    settings.PORTAL_ALLOWED_EMAIL_DOMAINS = ["corp.example"]
    response = post(client, "/api/register-key", {"email": "x@example.com"}, **bearer(token))
    assert response.status_code == 400 and "corp.example" in response.json()["error"]
    assert not User.objects.filter(email="x@example.com").exists()


@pytest.mark.parametrize("header", ["Bearer nonsense", "Bearer ", "bearer kpt_wrong"])
def test_unknown_tokens_get_a_json_401(client, ready_keys, header):
    response = client.post("/api/my-keys", "{}", content_type="application/json", headers={"Authorization": header})
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"


def test_revoked_tokens_and_tokens_of_former_staff_stop_working(client, token, staff):
    assert post(client, "/api/my-keys", {}, **bearer(token)).status_code == 200
    User.objects.filter(pk=staff.pk).update(is_staff=False)
    assert post(client, "/api/my-keys", {}, **bearer(token)).status_code == 401
    User.objects.filter(pk=staff.pk).update(is_staff=True)
    ApiToken.objects.update(revoked_at="2026-01-01T00:00:00Z")
    assert post(client, "/api/my-keys", {}, **bearer(token)).status_code == 401


def test_a_token_records_when_it_was_last_used(client, token):
    assert ApiToken.objects.get().last_used_at is None
    post(client, "/api/my-keys", {}, **bearer(token))
    assert ApiToken.objects.get().last_used_at is not None


def test_a_token_reaches_the_staff_endpoints_too(client, token):
    response = client.get("/api/key-pool-status", headers=bearer(token))
    assert response.status_code == 200 and set(response.json()) == {"total", "unused", "assigned"}


def test_a_token_never_starts_a_session(client, token):
    # The token works on the JSON API only: it never starts a session.
    response = client.get("/my-keys", headers=bearer(token))
    assert response.status_code == 302
    assert "_auth_user_id" not in client.session
