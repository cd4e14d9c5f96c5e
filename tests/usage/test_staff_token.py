"""A staff API token works on the two /staff/ pages with a machine-readable use: the CSV
export and the leaderboard (JSON for a token caller). The other staff pages and the admin
still need the admin's password sign-in; a wrong token is a JSON 401, never the login page."""

from __future__ import annotations

import csv
import io

import pytest

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from tests.usage.test_export import usage  # noqa: F401 - fixture
from tests.usage.test_leaderboard import board  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db


def _token(user: User) -> str:
    raw = api_token_new()
    item = ApiToken(user=user, name="reports")
    item.set_token(raw)
    item.save()
    return raw


@pytest.fixture
def bearer(db) -> dict[str, str]:
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    return {"HTTP_AUTHORIZATION": f"Bearer {_token(staff)}"}


def test_a_staff_token_gets_the_csv_export(client, bearer, usage):  # noqa: F811
    response = client.get("/staff/export", {"from": "2026-03-01", "to": "2026-03-02"}, **bearer)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert {r["email"] for r in rows} == {"ann@example.com", "bob@example.com"}


def test_a_token_caller_with_bad_dates_gets_json_400(client, bearer):
    response = client.get("/staff/export", {"from": "yesterday"}, **bearer)
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    body = response.json()
    assert body["error"] and set(body["fields"]) == {"from", "to"}


def test_a_staff_token_gets_the_leaderboard_as_json(client, bearer, board):  # noqa: F811
    response = client.get("/staff/leaderboard", {"period": "7d", "by": "tokens"}, **bearer)
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    body = response.json()
    assert (body["period"], body["by"]) == ("7d", "tokens")
    assert [row["email"] for row in body["rows"]] == ["ann@example.com", "bob@example.com"]
    first = body["rows"][0]
    assert first["rank"] == 1 and first["tokens"] > body["rows"][1]["tokens"]
    assert first["cost_complete"] and not body["rows"][1]["cost_complete"]
    assert body["totals"]["requests"] == 12 and body["totals"]["cost_complete"] is False
    bad = client.get("/staff/leaderboard", {"period": "fortnight"}, **bearer)
    assert bad.status_code == 400 and "period" in bad.json()["error"]


@pytest.mark.parametrize("page", ["/staff/export", "/staff/leaderboard"])
def test_a_wrong_revoked_or_non_staff_token_is_a_json_401(client, page):
    answers = [client.get(page, HTTP_AUTHORIZATION="Bearer kpt_not-a-token"),
               client.get(page, HTTP_AUTHORIZATION="Bearer ")]
    demoted = User.objects.create_user("was-staff@example.com", is_staff=True)
    raw = _token(demoted)
    User.objects.filter(pk=demoted.pk).update(is_staff=False)
    answers.append(client.get(page, HTTP_AUTHORIZATION=f"Bearer {raw}"))
    for response in answers:
        assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"
        assert "error" in response.json()


def test_the_other_staff_pages_still_need_a_password_sign_in(client, bearer):
    for page in ["/staff/proxy", "/admin/"]:
        response = client.get(page, **bearer)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_browsers_still_get_the_pages(admin_client, board):  # noqa: F811
    response = admin_client.get("/staff/leaderboard")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    assert admin_client.get("/staff/export").status_code == 200
