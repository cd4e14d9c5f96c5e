from __future__ import annotations

import pytest

from accounts.models import User


@pytest.fixture
def ann(db) -> User:
    return User.objects.create_user("ann@example.com", name="Ann")
