"""Prices for the Chinese vendors' models (shipped by a data migration, dated, with their
source), the "Unpriced models seen" admin list with its one-click add, and audited price
changes."""

from __future__ import annotations

import importlib
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from keyportal.models import AuditEvent
from tests.usage.conftest import issue
from usage.models import ModelPrice, UsageSnapshot
from usage.pricing import PriceBook, cost_of

pytestmark = pytest.mark.django_db
SHIPPED = importlib.import_module("usage.migrations.0008_chinese_model_prices")
URL = "/admin/usage/modelprice/unpriced/"


@pytest.mark.parametrize(
    "model, expected",
    [
        ("deepseek-flash", ("0.30", "1.20", "0.006")),
        ("deepseek-v4-flash", ("0.30", "1.20", "0.006")),
        ("deepseek-v4-pro", ("1.32", "3.96", "0.044")),
        ("qwen-plus", ("0.40", "1.20", "0.16")),
        ("qwen-plus-2025-07-28", ("0.40", "1.20", "0.16")),  # a dated snapshot
        ("Qwen-Turbo", ("0.05", "0.20", "0.02")),  # case does not matter
        ("qwen-max", ("1.60", "6.40", "0.64")),
        ("kimi-k2.5", ("0.60", "3.00", "0.10")),
        ("kimi-k2-0905-preview", ("0.60", "2.50", "0.15")),
    ],
)
def test_the_shipped_prices_match_the_models(model, expected):
    price = PriceBook.load().price_for(model)
    assert price is not None
    assert (price.input, price.output, price.cache_read) == tuple(Decimal(x) for x in expected)


@pytest.mark.parametrize("model", [*SHIPPED.UNPRICED, "qwen-plus-latest", "deepseek-flashy"])
def test_models_without_a_vendor_price_stay_unknown(model):
    assert PriceBook.load().price_for(model) is None


def test_every_shipped_price_names_its_source_and_date():
    for name in SHIPPED.PRICES:
        row = ModelPrice.objects.get(model=name)
        assert row.source and row.taken_on, name
    assert not set(SHIPPED.PRICES) & set(SHIPPED.UNPRICED)


def test_a_deepseek_request_costs_what_the_vendor_page_says():
    price = PriceBook.load().price_for("deepseek-v4-pro")
    # 1M input of which 400k cache hits, 100k output: 0.6 M x 1.32 + 0.4 M x 0.044 + 0.1 M x 3.96
    usd = cost_of(price, uncached=600_000, cache_read=400_000, cache_write=0, output=100_000)
    assert usd == Decimal("0.792") + Decimal("0.0176") + Decimal("0.396")


@pytest.fixture
def seen(db):
    """Usage on two unpriced models (one old), one model priced after it was counted, and a
    priced model."""
    ann, bob = issue(2, ["ann@example.com", "bob@example.com"])
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    rows = [
        (ann, "glm-4.6", now - timedelta(hours=1), 5, 500, None),
        (bob, "glm-4.6", now - timedelta(hours=2), 2, 100, None),
        (ann, "mystery-model", now - timedelta(days=40), 1, 10, None),  # outside 30 days
        (bob, "qwen-plus", now - timedelta(hours=3), 3, 300, None),  # priced since
        (ann, "deepseek-flash", now - timedelta(hours=3), 4, 400, Decimal("0.01")),
    ]
    for held, model, hour, requests, tokens, cost in rows:
        UsageSnapshot.objects.create(api_key=held.key, model=model, hour=hour,
                                     requests=requests, total_tokens=tokens, cost=cost)


def test_the_unpriced_list_names_models_without_a_price_with_their_use(admin_client, seen):
    response = admin_client.get(URL)
    assert response.status_code == 200
    unpriced = response.context["unpriced"]
    assert [(r["model"], r["requests"], r["tokens"], r["keys"]) for r in unpriced] == [
        ("glm-4.6", 7, 600, 2)
    ]
    assert [r["model"] for r in response.context["priced_since"]] == ["qwen-plus"]
    html = response.content.decode()
    assert 'href="/admin/usage/modelprice/add/?model=glm-4.6"' in html
    assert "site-name" in html or response.context["site_header"]  # the admin frame
    everything = admin_client.get(URL, {"period": "all"}).context["unpriced"]
    assert [r["model"] for r in everything] == ["glm-4.6", "mystery-model"]


def test_add_price_opens_the_form_with_the_model_filled_in(admin_client):
    response = admin_client.get("/admin/usage/modelprice/add/", {"model": "glm-4.6"})
    assert response.status_code == 200
    assert response.context["adminform"].form.initial["model"] == "glm-4.6"
    assert 'value="glm-4.6"' in response.content.decode()


def test_the_price_list_links_to_the_unpriced_list(admin_client):
    assert f'href="{URL}"' in admin_client.get("/admin/usage/modelprice/").content.decode()


@pytest.mark.parametrize("models", [1, 20])
def test_the_unpriced_list_costs_the_same_queries_however_many_models(
    admin_client, django_assert_num_queries, models
):
    (held,) = issue(1, ["ann@example.com"])
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for n in range(models):
        UsageSnapshot.objects.create(api_key=held.key, model=f"unknown-{n}", hour=hour,
                                     requests=1, total_tokens=10)
    admin_client.get(URL)  # warm the session
    # session, user, the grouped usage, the price book (a superuser's sidebar reads nothing)
    with django_assert_num_queries(4):
        response = admin_client.get(URL)
    assert len(response.context["unpriced"]) == models


def test_price_changes_are_audited(admin_client):
    response = admin_client.post("/admin/usage/modelprice/add/", {
        "model": "glm-4.6", "input": "0.6", "output": "2.2", "cache_read": "0.11",
        "cache_write": "0.6", "source": "docs.z.ai", "taken_on": "2026-11-29",
    })
    assert response.status_code == 302
    price = ModelPrice.objects.get(model="glm-4.6")
    added = AuditEvent.objects.get(action="price_changed", target_id=str(price.pk))
    assert added.before["output"] is None and added.after["output"] == "2.2"
    assert added.after["model"] == "glm-4.6"
    admin_client.post(f"/admin/usage/modelprice/{price.pk}/change/", {
        "model": "glm-4.6", "input": "0.6", "output": "2.4", "cache_read": "0.11",
        "cache_write": "0.6", "source": "docs.z.ai", "taken_on": "2026-11-29",
    })
    changed = AuditEvent.objects.filter(action="price_changed").order_by("-id").first()
    assert changed.before == {"output": "2.200000"} and changed.after == {"output": "2.4"}
    admin_client.post(f"/admin/usage/modelprice/{price.pk}/delete/", {"post": "yes"})
    assert not ModelPrice.objects.filter(model="glm-4.6").exists()
    deleted = AuditEvent.objects.filter(action="price_changed").order_by("-id").first()
    assert deleted.after is None and deleted.before["model"] == "glm-4.6"
