"""The usage JSON API: who may read what, and totals equal to what the proxy served."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from accounts.models import User
from keyportal.locks import lease_acquire
from tests.usage.conftest import sync
from usage import services
from usage.models import ModelPrice, UsageSnapshot

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 22, 3, 10, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("boss@example.com", password="x-long-pass-1", is_staff=True)


@pytest.fixture
def served(fake_proxy, people_keys) -> list[dict]:
    """A mix of requests over both people, two models (one priced), one failure, one foreign."""
    ann1, ann2, bob = people_keys
    records = []
    for i in range(5):
        records.append(fake_proxy.add_usage(ann1.value, timestamp=T0 + i, input_tokens=100 + i))
    for i in range(3):
        records.append(fake_proxy.add_usage(
            ann2.value, timestamp=T0 + 3600 + i, model="claude-mock-upstream",
            input_tokens=1000, output_tokens=50, cached_tokens=400))
    records.append(fake_proxy.add_usage(bob.value, timestamp=T0, failed=True, input_tokens=0,
                                        output_tokens=0))
    fake_proxy.add_usage("operator-own-key", timestamp=T0)
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("2"),
                              cache_read=Decimal("0.1"), cache_write=Decimal("1.25"))
    sync()
    return records


def test_all_users_totals_equal_what_the_proxy_served(client, staff, served):
    client.force_login(staff)
    answer = client.get("/api/all-users-stats")

    assert answer.status_code == 200
    body = answer.json()
    summary = body["summary"]
    assert summary["total_requests"] == len(served)
    assert summary["total_tokens"] == sum(r["tokens"]["total_tokens"] for r in served)
    assert summary["total_keys"] == 3 and summary["total_users"] == 2
    by_email = {u["email"]: u for u in body["users"]}
    assert set(by_email) == {"ann@example.com", "bob@example.com"}
    ann = by_email["ann@example.com"]
    assert ann["key_count"] == 2 and ann["total_requests"] == 8
    assert set(ann) >= {"email", "name", "total_requests", "total_tokens", "key_count"}
    # claude-mock-upstream has no price: Ann's cost is only the known part, and says so.
    assert ann["cost_complete"] is False and summary["cost_complete"] is False
    assert by_email["bob@example.com"]["cost_complete"] is True


def test_user_stats_for_oneself(client, served, people_keys):
    client.force_login(people_keys[0].key.owner)
    answer = client.get("/api/user-stats/ANN@example.com")

    assert answer.status_code == 200
    body = answer.json()
    assert body["email"] == "ann@example.com" and body["key_count"] == 2
    assert body["total_requests"] == 8
    assert body["total_tokens"] == sum(
        r["tokens"]["total_tokens"] for r in served if r["api_key"] in
        (people_keys[0].value, people_keys[1].value)
    )
    assert all(people_keys[0].value not in str(k) for k in body["keys"])
    masked = {people_keys[0].key.masked, people_keys[1].key.masked}
    assert {k["key"] for k in body["keys"]} == masked


def test_user_stats_of_someone_else_is_refused(client, served, people_keys):
    client.force_login(people_keys[2].key.owner)  # Bob
    assert client.get("/api/user-stats/ann@example.com").status_code == 403


def test_staff_read_anyone_and_unknown_is_404(client, staff, served):
    client.force_login(staff)
    assert client.get("/api/user-stats/bob@example.com").json()["total_requests"] == 1
    assert client.get("/api/user-stats/nobody@example.com").status_code == 404


def test_anonymous_gets_401(client, served):
    assert client.get("/api/user-stats/ann@example.com").status_code == 401
    assert client.get("/api/all-users-stats").status_code == 401
    assert client.post("/api/sync-usage").status_code == 401


def test_all_users_stats_is_staff_only(client, served, people_keys):
    client.force_login(people_keys[0].key.owner)
    assert client.get("/api/all-users-stats").status_code == 403
    assert client.post("/api/sync-usage").status_code == 403


def test_sync_usage_endpoint_runs_the_sync(client, staff, fake_proxy, people_keys):
    for i in range(4):
        fake_proxy.add_usage(people_keys[0].value, timestamp=T0 + i)
    client.force_login(staff)

    answer = client.post("/api/sync-usage")

    assert answer.status_code == 200
    body = answer.json()
    assert body["ok"] is True and body["mode"] == "queue"
    assert body["records_read"] == 4 and body["records_stored"] == 4 and body["people_touched"] == 1
    assert UsageSnapshot.objects.get().requests == 4
    assert client.get("/api/sync-usage").status_code == 405


def test_sync_usage_endpoint_reports_busy_and_upstream_errors(client, staff, fake_proxy, settings):
    client.force_login(staff)
    assert lease_acquire(name=services.SYNC_LEASE, ttl=timedelta(minutes=5))
    busy = client.post("/api/sync-usage")
    assert busy.status_code == 409 and "Another usage sync" in busy.json()["error"]


def test_sync_usage_endpoint_names_a_refusal(client, staff, fake_proxy, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong"
    client.force_login(staff)
    answer = client.post("/api/sync-usage")
    assert answer.status_code == 502 and "CLIPROXY_MANAGEMENT_KEY" in answer.json()["error"]
