"""Cost: known models priced at ingest, unknown ones unknown (never 0), recompute on change."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from django.db.models import Sum

import pytest

from accounts.models import User
from tests.usage.conftest import sync
from usage.models import ModelPrice, UsageSnapshot
from usage.pricing import PriceBook, cost_of
from usage.services import usage_cost_recompute

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 22, 3, 10, tzinfo=timezone.utc).timestamp()


def price(model: str, inp: str, out: str, read: str = "0", write: str = "0") -> ModelPrice:
    return ModelPrice.objects.update_or_create(
        model=model, defaults=dict(input=Decimal(inp), output=Decimal(out),
                                   cache_read=Decimal(read), cache_write=Decimal(write)),
    )[0]


def test_known_model_is_priced_and_unknown_model_is_unknown(fake_proxy, people_keys):
    price("mock-gpt", "3", "15", "0.30", "3.75")
    ann = people_keys[0]
    # 1000 input of which 400 cache reads and 100 cache writes, 200 output: both requests.
    for i in range(2):
        fake_proxy.add_usage(ann.value, timestamp=T0 + i, input_tokens=1000, output_tokens=200,
                             cached_tokens=400, cache_creation_tokens=100)
    fake_proxy.add_usage(ann.value, timestamp=T0, model="brand-new-model")

    sync()

    known = UsageSnapshot.objects.get(model="mock-gpt")
    # 2 × (500 × 3 + 400 × 0.30 + 100 × 3.75 + 200 × 15) / 1M = 2 × 0.004995
    assert known.cost == Decimal("0.00999")
    assert UsageSnapshot.objects.get(model="brand-new-model").cost is None


def test_each_part_of_the_split_is_billed_at_its_own_rate_and_unknown_is_not_zero():
    p = PriceBook([ModelPrice(model="m", input=Decimal(1), output=Decimal(10),
                              cache_read=Decimal(100), cache_write=Decimal(1000))]).price_for("m")
    assert cost_of(p, uncached=1_000_000, cache_read=0, cache_write=0, output=0) == 1
    assert cost_of(p, uncached=0, cache_read=0, cache_write=0, output=1_000_000) == 10
    assert cost_of(p, uncached=0, cache_read=1_000_000, cache_write=0, output=0) == 100
    assert cost_of(p, uncached=0, cache_read=0, cache_write=1_000_000, output=0) == 1000
    assert cost_of(None, uncached=1, cache_read=0, cache_write=0, output=1) is None


def test_reasoning_is_billed_once_whichever_way_it_is_reported():
    from usage.accounting import split_tokens

    # OpenAI: reasoning inside output (total = input + output).
    openai = split_tokens({"input_tokens": 10, "output_tokens": 50, "reasoning_tokens": 30,
                           "total_tokens": 60}, provider="codex", model="gpt-5")
    # Gemini: reasoning beside output (total = input + output + reasoning).
    gemini = split_tokens({"input_tokens": 10, "output_tokens": 50, "reasoning_tokens": 30,
                           "total_tokens": 90}, provider="gemini", model="gemini-2.5-pro")
    assert openai[3] == 50 and gemini[3] == 80
    assert openai[4] == gemini[4] == 30


def test_price_matching_exact_then_longest_prefix_ignoring_case():
    entries = [
        ModelPrice(model=m, input=Decimal(i), output=Decimal(0), cache_read=Decimal(0),
                   cache_write=Decimal(0))
        for m, i in [("gpt-5", 1), ("gpt-5-20*", 2), ("gpt-5-mini", 3), ("claude-*", 4),
                     ("claude-sonnet-4-5*", 5)]
    ]
    book = PriceBook(entries)
    assert book.price_for("gpt-5").input == 1
    assert book.price_for("GPT-5-2025-08-07").input == 2
    assert book.price_for("gpt-5-mini").input == 3
    assert book.price_for("gpt-5.5") is None  # no guess: unknown, not gpt-5's price
    assert book.price_for("claude-sonnet-4-5-20250929").input == 5
    assert book.price_for("claude-haiku-4-5").input == 4


def test_shipped_prices_cover_the_common_models(db):
    book = PriceBook.load()
    for model in ("claude-sonnet-4-5-20250929", "claude-opus-4-5", "claude-haiku-4-5-20251001",
                  "gpt-5", "gpt-5-mini", "gemini-2.5-pro", "gemini-2.5-flash"):
        assert book.price_for(model) is not None, model
    assert book.price_for("gpt-5.5") is None
    assert ModelPrice.objects.filter(taken_on__isnull=True).count() == 0


def test_recompute_after_a_price_change(fake_proxy, people_keys):
    entry = price("mock-gpt", "1", "1")
    for i in range(3):
        fake_proxy.add_usage(people_keys[0].value, timestamp=T0 + i)  # 11 in, 7 out
    fake_proxy.add_usage(people_keys[0].value, timestamp=T0, model="unpriced")
    sync()
    assert UsageSnapshot.objects.get(model="mock-gpt").cost == Decimal("0.000054")

    entry.input, entry.output = Decimal("10"), Decimal("100")
    entry.save()
    price("unpriced", "1", "0")
    changed = usage_cost_recompute()

    assert changed == 2
    assert UsageSnapshot.objects.get(model="mock-gpt").cost == Decimal("0.00243")
    assert UsageSnapshot.objects.get(model="unpriced").cost == Decimal("0.000011")
    assert usage_cost_recompute() == 0
    # The leaderboard's per-person × day rollup follows the new prices too.
    from usage.models import UsageDay

    assert UsageDay.objects.aggregate(c=Sum("cost"))["c"] == Decimal("0.002441")


def test_admin_action_recomputes_the_selected_models(client, fake_proxy, people_keys):
    staff = User.objects.create_superuser("root@example.com", password="x-long-pass-1")
    entry = price("mock-gpt", "1", "1")
    fake_proxy.add_usage(people_keys[0].value, timestamp=T0)
    sync()
    ModelPrice.objects.filter(pk=entry.pk).update(input=Decimal("0"), output=Decimal("0"))
    client.force_login(staff)

    answer = client.post("/admin/usage/modelprice/", {
        "action": "recompute_cost", "_selected_action": [entry.pk],
    }, follow=True)

    assert answer.status_code == 200
    assert UsageSnapshot.objects.get().cost == Decimal("0")


def test_admin_usage_list_shows_totals_in_one_query_per_page(client, fake_proxy, people_keys,
                                                             django_assert_max_num_queries):
    staff = User.objects.create_superuser("root@example.com", password="x-long-pass-1")
    for held in people_keys:
        for i in range(3):
            fake_proxy.add_usage(held.value, timestamp=T0 + i * 3600)
    sync()
    client.force_login(staff)
    with django_assert_max_num_queries(12):
        answer = client.get("/admin/usage/usagesnapshot/", {"q": "ann@example.com"})
    assert answer.status_code == 200
    assert "Selected: 6 requests" in answer.content.decode()
    assert people_keys[0].value not in answer.content.decode()
