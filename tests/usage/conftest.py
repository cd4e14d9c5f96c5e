"""Usage test helpers: issued keys whose plaintext the test keeps, and a command runner."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from io import StringIO

import pytest
from django.core.management import call_command

from accounts.models import User
from pool.models import ApiKey
from pool.services import pool_keys_create
from usage.models import UsageSnapshot


@dataclass
class Held:
    key: ApiKey
    value: str  # the plaintext, kept by the test only, to send usage with


def issue(count: int, emails: list[str]) -> list[Held]:
    """`count` pool keys handed to `emails` (cycled), the way issuing does it."""
    held = []
    for i, key in enumerate(pool_keys_create(count=count)):
        value = key.value
        owner, _ = User.objects.get_or_create(email=emails[i % len(emails)])
        ApiKey.objects.filter(pk=key.pk).update(status="active", owner=owner, value=None)
        key.refresh_from_db()
        held.append(Held(key, value))
    return held


@pytest.fixture
def people_keys(db) -> list[Held]:
    """Ann holds two keys, Bob one."""
    return issue(3, ["ann@example.com", "ann@example.com", "bob@example.com"])


def sync(*args: str) -> str:
    out = StringIO()
    call_command("sync_usage", *args, stdout=out)
    return out.getvalue()


def table() -> list[tuple]:
    """The whole usage table, as comparable tuples (ids left out)."""
    return list(
        UsageSnapshot.objects.order_by("api_key_id", "model", "hour").values_list(
            "api_key_id", "model", "hour", "requests", "failures", "input_tokens",
            "output_tokens", "reasoning_tokens", "cached_tokens", "cache_creation_tokens",
            "total_tokens", "cost",
        )
    )


# The /my-keys pages moved here from pool; their tests use the pool's key fixtures.
from tests.pool.conftest import make_ready_keys, proxy_keys, ready_keys  # noqa: E402,F401


def served(key: ApiKey, *, at: datetime, model: str = "mock-gpt", requests: int = 1,
           input_tokens: int = 10, output_tokens: int = 5, failed: bool = False) -> None:
    """Counts `requests` identical requests on `key` at `at` through the ingest service (so
    the rollup moves as sync_usage moves it)."""
    from usage.services import usage_ingest

    utc = at.astimezone(timezone.utc)
    row = [key.key_hash, model, utc.strftime("%Y-%m-%dT%H"), int(failed), input_tokens,
           output_tokens, 0, 0, 0, input_tokens + output_tokens,
           utc.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"), 0]  # as usage.records writes it
    usage_ingest(rows=[row] * requests)
