"""The admin index dashboard: today's requests, tokens and cost, the pool against its
low-water mark, the last sync and its result, unpriced models seen, alerts; in a constant
number of queries."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey
from pool.services import IMPLAUSIBLE_NOTIFIED, pool_keys_create
from pool.upstream import ProxyClient
from tests.usage.conftest import issue, served
from usage.models import ModelPrice, QuarantinedRecord, SyncRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", "a-long-password-1")


def dashboard_of(page: str) -> str:
    return page.split('id="dashboard"', 1)[1].split('id="staff-pages"', 1)[0]


def cell(part: str, name: str) -> str:
    return part.split(f'data-dash="{name}">', 1)[1].split("</td>", 1)[0]


def test_todays_numbers_pool_and_last_sync(client, boss, settings):
    settings.PORTAL_POOL_MIN = 5
    ann, bob = issue(2, ["ann@example.com", "bob@example.com"])
    pool_keys_create(count=3)  # unissued
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    now = timezone.now()
    served(ann.key, at=now, requests=2, input_tokens=1_000_000, output_tokens=0)
    served(bob.key, at=now, model="internal-llm-7b", requests=3, input_tokens=10,
           output_tokens=0)
    served(bob.key, at=now - timedelta(days=2), requests=7)  # not today
    SyncRun.objects.create(started_at=now - timedelta(minutes=3), finished_at=now, ok=False,
                           message="proxy unreachable")
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())

    assert cell(part, "requests") == "5"
    assert cell(part, "tokens") == "2,000,030"
    assert "≥ $2.00" in cell(part, "cost")  # internal-llm-7b has no price
    assert cell(part, "pool").startswith("3 (") and "low-water mark 5" in cell(part, "pool")
    assert "below the low-water mark" in part and 'data-alert="pool-low"' in part
    assert "failed" in cell(part, "sync") and "proxy unreachable" in cell(part, "sync")
    assert 'data-alert="sync-failed"' in part
    unpriced = part.split('data-alert="unpriced">', 1)[1].split("</td>", 1)[0]
    assert "<code>internal-llm-7b</code>" in unpriced and "mock-gpt" not in unpriced
    assert "/admin/usage/modelprice/add/?model=internal-llm-7b" in unpriced  # one click


def test_a_model_priced_since_is_no_longer_called_unpriced(client, boss):
    (ann,) = issue(1, ["ann@example.com"])
    served(ann.key, at=timezone.now(), model="new-model", requests=1)
    client.force_login(boss)
    assert "<code>new-model</code>" in dashboard_of(client.get("/admin/").content.decode())
    ModelPrice.objects.create(model="new-*", input=Decimal("1"), output=Decimal("1"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    assert "new-model" not in dashboard_of(client.get("/admin/").content.decode())


def test_a_quiet_day_says_nothing_needs_attention(client, boss, settings):
    settings.PORTAL_POOL_MIN = 0
    SyncRun.objects.create(started_at=timezone.now(), finished_at=timezone.now(), ok=True)
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert "Nothing needs attention." in part and "data-alert" not in part
    assert cell(part, "requests") == "0" and "ok" in cell(part, "sync")


def test_quarantine_the_401_latch_and_a_refused_key_list_raise_alerts(client, boss, settings):
    settings.CLIPROXY_URL = "http://127.0.0.1:9"
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong"
    QuarantinedRecord.objects.create(source="queue", reason="negative tokens")
    with ProxyClient.from_settings() as proxy:
        cache.set(proxy.refusal_cache_key, {"status": 401, "message": "refused"}, 600)
    cache.set(IMPLAUSIBLE_NOTIFIED, True, 600)
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert 'data-alert="quarantined"' in part and "1 usage record set aside" in part
    assert 'data-alert="proxy-refused"' in part
    assert 'data-alert="key-list-refused"' in part


def test_a_person_or_a_link_session_never_sees_the_dashboard(client):
    person = User.objects.create_user("ann@example.com")
    client.force_login(person)
    response = client.get("/admin/")
    assert response.status_code == 302 and b"dashboard" not in response.content


@pytest.mark.parametrize("people", [1, 12])
def test_the_index_costs_the_same_queries_however_much_usage(
    client, boss, django_assert_num_queries, people
):
    for n, held in enumerate(issue(people, [f"p{i}@example.com" for i in range(people)])):
        served(held.key, at=timezone.now(), model=f"model-{n}", requests=n + 1)
    ApiKey.objects.update(limit_tokens_day=None)
    client.force_login(boss)
    # session, user, today's sums, pool counts, last sync, unpriced models, the price book,
    # quarantined, the cache flags (one read), the upstreams (is there a CLIProxyAPI, and so
    # a pool?), and the admin's own "recent actions" (a superuser needs no permission reads)
    with django_assert_num_queries(11):
        response = client.get("/admin/")
    assert response.status_code == 200


def test_seed_demo_fills_an_empty_database_once(client, settings):
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.PORTAL_POOL_MIN = 20
    out = StringIO()
    call_command("seed_demo", "--staff-password", "a-long-password-1", "--days", "3",
                 "--currency", "CNY:7.1", stdout=out)
    assert "5 people, 10 keys" in out.getvalue()
    from usage.models import DisplayCurrency

    assert DisplayCurrency.objects.values_list("code", "rate").get() == ("CNY", Decimal("7.1"))
    with pytest.raises(CommandError, match="only fills an empty database"):
        call_command("seed_demo", "--staff-password", "x", stdout=StringIO())
    client.force_login(User.objects.get(email="staff@example.com"))
    part = dashboard_of(client.get("/admin/").content.decode())
    assert "<code>internal-llm-7b</code>" in part and 'data-alert="pool-low"' in part
