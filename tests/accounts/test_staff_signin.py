"""Staff reach the admin and the staff pages only after a password sign-in: an emailed link
opens a person's own keys, whoever the person is."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages

from accounts.models import User
from keyportal.models import AuditEvent
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-password-1"
STAFF_PAGES = ["/admin/", "/admin/accounts/user/", "/staff/export", "/staff/leaderboard",
               "/staff/proxy"]


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", PASSWORD)


def sign_in_by_link(client, email: str) -> None:
    client.post("/login", {"email": email})
    response = client.post(emailed_path())
    assert response.status_code == 303 and response["Location"] == "/my-keys"


def sign_in_by_password(client, email: str, password: str = PASSWORD):
    return client.post("/admin/login/?next=/admin/", {"username": email, "password": password})


@pytest.mark.parametrize("page", STAFF_PAGES)
def test_a_staff_link_session_is_sent_to_the_admin_password_login(client, boss, page):
    sign_in_by_link(client, boss.email)
    response = client.get(page)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")


def test_a_staff_link_session_still_reaches_its_own_keys(client, boss):
    sign_in_by_link(client, boss.email)
    assert client.get("/my-keys").status_code == 200


def test_the_admin_login_tells_a_link_session_why_it_asks_for_the_password(client, boss):
    sign_in_by_link(client, boss.email)
    response = client.get("/admin/login/?next=/admin/")
    assert response.status_code == 200  # the form, not a redirect loop to /admin/
    assert b"signed in with an emailed link" in response.content
    assert b'name="password"' in response.content


def test_a_password_sign_in_over_a_link_session_opens_the_admin_and_is_audited(client, boss):
    sign_in_by_link(client, boss.email)
    response = sign_in_by_password(client, boss.email)
    assert response.status_code == 302 and response["Location"] == "/admin/"
    for page in STAFF_PAGES[:3]:
        assert client.get(page).status_code == 200, page
    details = list(AuditEvent.objects.order_by("id").values_list("detail", flat=True))
    assert details == ["login link", "admin password"]


def test_a_later_link_sign_in_takes_the_admin_away_again(client, boss):
    assert sign_in_by_password(client, boss.email).status_code == 302
    assert client.get("/admin/").status_code == 200
    sign_in_by_link(client, boss.email)
    assert client.get("/admin/").status_code == 302


def test_a_wrong_password_over_a_link_session_opens_nothing(client, boss):
    sign_in_by_link(client, boss.email)
    assert sign_in_by_password(client, boss.email, "wrong-password").status_code == 200
    assert client.get("/admin/").status_code == 302
    assert not AuditEvent.objects.filter(detail="admin password").exists()


def test_a_staff_link_session_cannot_call_the_staff_api(client, boss):
    sign_in_by_link(client, boss.email)
    response = client.get("/api/all-users-stats")
    assert response.status_code == 403
    assert sign_in_by_password(client, boss.email).status_code == 302
    assert client.get("/api/all-users-stats").status_code == 200
