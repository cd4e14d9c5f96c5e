"""GET /api/user-stats/<email> with an address no one can have: a JSON 404, never a 500
(PostgreSQL refuses text with NUL even in a comparison)."""

from __future__ import annotations

import pytest

from accounts.models import User

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "path", ["a%00b@example.com", "ann%00@example.com", "x" * 300 + "@example.com"]
)
def test_an_impossible_address_is_a_json_404(client, path):
    staff = User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)
    client.force_login(staff)
    answer = client.get(f"/api/user-stats/{path}")
    assert answer.status_code == 404
    assert answer.json() == {"error": "No such person."}
