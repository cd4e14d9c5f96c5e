"""Staff API tokens in the admin: shown once at creation, stored as a hash, revocable."""

from __future__ import annotations

import re

import pytest

from accounts.models import ApiToken, User, token_digest

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True,
                                     is_superuser=True)
    client.force_login(staff)
    client.staff = staff
    return client


def create(staff_client, name="nightly export"):
    return staff_client.post(
        "/admin/accounts/apitoken/add/", {"user": staff_client.staff.pk, "name": name}
    )


def test_a_new_token_is_shown_once_and_only_its_hash_is_kept(staff_client):
    response = create(staff_client)

    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    raw = re.search(r'id="api-token"[^>]*>([^<]+)<', response.content.decode()).group(1)
    assert raw.startswith("kpt_") and len(raw) > 40
    token = ApiToken.objects.get()
    assert token.token_hash == token_digest(raw) and token.last4 == raw[-4:]
    assert raw not in str(list(ApiToken.objects.values()))
    for page in ("/admin/accounts/apitoken/", f"/admin/accounts/apitoken/{token.pk}/change/"):
        content = staff_client.get(page).content.decode()
        assert raw not in content and f"…{raw[-4:]}" in content
    works = staff_client.post(
        "/api/my-keys", "{}", content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )
    assert works.status_code == 200


def test_tokens_can_only_act_as_staff(staff_client):
    person = User.objects.create_user("ann@example.com")
    response = staff_client.post(
        "/admin/accounts/apitoken/add/", {"user": person.pk, "name": "x"}
    )
    assert response.status_code == 200 and b"errorlist" in response.content
    assert ApiToken.objects.count() == 0


def test_staff_revoke_tokens_from_the_list(staff_client):
    create(staff_client, "a")
    create(staff_client, "b")
    a = ApiToken.objects.get(name="a")
    response = staff_client.post(
        "/admin/accounts/apitoken/",
        {"action": "revoke_tokens", "_selected_action": [a.pk]},
        follow=True,
    )
    assert b"1 tokens revoked" in response.content
    assert ApiToken.objects.get(name="a").revoked_at is not None
    assert ApiToken.objects.get(name="b").revoked_at is None


def test_people_who_are_not_staff_cannot_reach_tokens(client):
    client.force_login(User.objects.create_user("ann@example.com"))
    assert client.get("/admin/accounts/apitoken/add/").status_code == 302
