"""GET /api/key-pool-status: pool counts for staff, JSON errors for everyone else."""

from __future__ import annotations

import pytest

from accounts.models import User
from pool.models import ApiKey
from pool.services import pool_keys_create

pytestmark = pytest.mark.django_db
URL = "/api/key-pool-status"


def test_staff_get_the_pool_counts(admin_client):
    keys = pool_keys_create(count=5)
    owner = User.objects.create_user("ann@example.com")
    ApiKey.objects.filter(pk__in=[keys[0].pk, keys[1].pk]).update(
        status=ApiKey.Status.ACTIVE, owner=owner, value=None
    )
    ApiKey.objects.filter(pk=keys[2].pk).update(status=ApiKey.Status.REVOKED, value=None)
    response = admin_client.get(URL)
    assert response.status_code == 200
    assert response.json() == {"total": 4, "unused": 2, "assigned": 2}


def test_anonymous_callers_get_a_json_401(client):
    response = client.get(URL)
    assert response.status_code == 401 and "error" in response.json()


def test_people_who_are_not_staff_get_a_json_403(client):
    client.force_login(User.objects.create_user("ann@example.com"))
    response = client.get(URL)
    assert response.status_code == 403 and response.json()["error"]


def test_other_methods_get_a_json_405(admin_client):
    response = admin_client.post(URL)
    assert response.status_code == 405 and response["Allow"] == "GET"
