"""/api/user-stats/<email> of another person follows the rule of the other staff endpoints:
a staff API token, or a staff session signed in with the admin's password (and its
authenticator code, when one is set up). A staff session from an emailed link reads only its
own usage. And /staff/export refuses dates it cannot turn into times with a 400, not a 500."""

from __future__ import annotations

import pytest
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from accounts.signin import BY_LINK, SIGNIN_METHOD_KEY
from pool.services import pool_keys_create
from pool.models import ApiKey
from tests.accounts.test_staff_signin import PASSWORD, sign_in_by_password
from usage.models import UsageSnapshot

pytestmark = pytest.mark.django_db
URL = "/api/user-stats/ann@example.com"


@pytest.fixture
def ann_usage(ann) -> None:
    [key] = pool_keys_create(count=1)
    ApiKey.objects.filter(pk=key.pk).update(status="active", owner=ann, value=None)
    UsageSnapshot.objects.create(api_key_id=key.pk, model="m", hour="2026-03-01T10:00:00Z",
                                 requests=3, total_tokens=300)


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", PASSWORD)


def by_link(client, person: User) -> None:
    client.force_login(person)
    session = client.session
    session[SIGNIN_METHOD_KEY] = BY_LINK  # as accounts.signin.link_login leaves it
    session.save()


def test_a_staff_session_from_an_emailed_link_cannot_read_someone_else(client, boss, ann_usage):
    by_link(client, boss)
    answer = client.get(URL)
    assert answer.status_code == 403
    assert "password sign-in" in answer.json()["error"]
    assert "total_tokens" not in answer.json()
    # Its own usage it may read, as anyone may.
    own = client.get(f"/api/user-stats/{boss.email}")
    assert own.status_code == 200 and own.json()["email"] == boss.email
    # The same rule as the staff-only endpoint next to it.
    assert client.get("/api/all-users-stats").status_code == 403


def test_a_password_without_its_authenticator_code_cannot_read_someone_else(
    client, boss, ann_usage
):
    TOTPDevice.objects.create(user=boss, name="authenticator", confirmed=True)
    assert sign_in_by_password(client, boss.email)["Location"].startswith("/admin/totp/")
    answer = client.get(URL)
    assert answer.status_code == 403 and "authenticator" in answer.json()["error"]
    assert client.get("/api/all-users-stats").status_code == 403


def test_a_password_sign_in_reads_anyone(client, boss, ann_usage):
    assert sign_in_by_password(client, boss.email).status_code == 302
    answer = client.get(URL)
    assert answer.status_code == 200 and answer.json()["total_tokens"] == 300


def test_a_staff_token_reads_anyone(client, boss, ann_usage):
    raw = api_token_new()
    token = ApiToken(user=boss, name="reports")
    token.set_token(raw)
    token.save()
    answer = client.get(URL, headers={"Authorization": f"Bearer {raw}"})
    assert answer.status_code == 200 and answer.json()["total_tokens"] == 300


def test_a_link_session_of_someone_else_is_refused_as_before(client, bob, ann_usage):
    by_link(client, bob)
    assert client.get(URL).status_code == 403


def test_the_owner_by_link_reads_their_own(client, ann, ann_usage):
    by_link(client, ann)
    assert client.get(URL).json()["total_tokens"] == 300


def test_anonymous_is_401(client, ann_usage):
    assert client.get(URL).status_code == 401


# --- /staff/export: dates out of range --------------------------------------------------------

EXPORT = "/staff/export"


@pytest.fixture
def token(boss) -> str:
    raw = api_token_new()
    item = ApiToken(user=boss, name="exports")
    item.set_token(raw)
    item.save()
    return raw


@pytest.mark.parametrize("start, end, field", [
    ("9999-12-31", "9999-12-31", "from"),
    ("9998-12-31", "9999-12-31", "to"),
    ("0001-01-01", "0001-01-02", "from"),
    ("1999-12-31", "2000-01-02", "from"),
])
def test_dates_out_of_range_are_a_json_400_for_scripts(client, token, start, end, field):
    answer = client.get(EXPORT, {"from": start, "to": end},
                        headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 400
    body = answer.json()
    assert "Dates out of range" in " ".join(body["fields"][field])


def test_dates_out_of_range_are_json_for_a_session_asking_for_json(admin_client):
    answer = admin_client.get(EXPORT, {"from": "9999-12-31", "to": "9999-12-31"},
                              headers={"Accept": "application/json"})
    assert answer.status_code == 400 and "Dates out of range" in str(answer.json()["fields"])


def test_dates_out_of_range_show_on_the_form_in_a_browser(admin_client):
    answer = admin_client.get(EXPORT, {"from": "9999-12-31", "to": "9999-12-31"},
                              headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert answer.status_code == 400 and not answer.streaming
    assert "Dates out of range" in answer.content.decode()


def test_the_last_day_in_range_still_exports(client, token):
    answer = client.get(EXPORT, {"from": "9998-12-31", "to": "9998-12-31"},
                        headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.streaming
    body = b"".join(answer.streaming_content).decode("utf-8-sig")
    assert body.splitlines()[0].startswith("date,")
