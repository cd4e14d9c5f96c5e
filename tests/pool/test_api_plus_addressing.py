"""The JSON API folds +tags like the sign-in forms (PORTAL_FOLD_PLUS_ADDRESSING)."""

from __future__ import annotations

import json

import pytest

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from pool.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def token(db) -> str:
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    raw = api_token_new()
    item = ApiToken(user=staff, name="automation")
    item.set_token(raw)
    item.save()
    return raw


def post(client, url: str, body: dict, token: str):
    return client.post(url, json.dumps(body), content_type="application/json",
                       headers={"Authorization": f"Bearer {token}"})


def test_a_staff_token_onboarding_tags_makes_one_person(client, token, ready_keys, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    for tag in ("a", "b"):
        created = post(client, "/api/register-key", {"email": f"zoe+{tag}@example.com"}, token)
        assert created.status_code == 201 and created.json()["email"] == "zoe@example.com"
    zoe = User.objects.get(email="zoe@example.com")
    assert ApiKey.objects.filter(owner=zoe).count() == 2
    assert not User.objects.filter(email__contains="+").exists()
    listed = post(client, "/api/my-keys", {"email": "zoe+other@example.com"}, token)
    assert listed.json()["email"] == "zoe@example.com" and len(listed.json()["keys"]) == 2


def test_a_session_may_name_itself_with_a_tag(client, ann, ready_keys, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    client.force_login(ann)
    mine = client.post("/api/my-keys", json.dumps({"email": "ann+x@example.com"}),
                       content_type="application/json")
    assert mine.status_code == 200 and mine.json()["email"] == "ann@example.com"
    stats = client.get("/api/user-stats/ann+x@example.com")
    assert stats.status_code == 200 and stats.json()["email"] == "ann@example.com"
