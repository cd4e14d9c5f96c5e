from __future__ import annotations

from collections.abc import Callable

import pytest

from accounts.models import ApiToken, User
from accounts.services import api_token_new
from pool.models import ApiKey
from pool.services import pool_keys_create


def _make_ready_keys(count: int) -> list[ApiKey]:
    keys = pool_keys_create(count=count)
    ApiKey.objects.filter(pk__in=[k.pk for k in keys]).update(
        proxy_state=ApiKey.ProxyState.PUSHED
    )
    return keys


@pytest.fixture
def make_ready_keys(db) -> Callable[[int], list[ApiKey]]:
    """Makes pool keys as generate_keys leaves them: unissued and already at the proxy."""
    return _make_ready_keys


@pytest.fixture
def ready_keys(make_ready_keys) -> list[ApiKey]:
    return make_ready_keys(5)


@pytest.fixture
def proxy_keys(fake_proxy) -> list[str]:
    """Three pool keys generated and pushed to the fake proxy; returns their values."""
    from pool.services import pool_generate
    from pool.upstream import ProxyClient

    fake_proxy.api_keys = ["operator-own-key"]
    with ProxyClient.from_settings() as client:
        pool_generate(count=3, client=client)
    return fake_proxy.api_keys[1:]


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("ops@example.com", password="x" * 12, is_staff=True)


@pytest.fixture
def token(staff) -> str:
    """A staff API token's raw value (automation acting for people)."""
    raw = api_token_new()
    item = ApiToken(user=staff, name="automation")
    item.set_token(raw)
    item.save()
    return raw
