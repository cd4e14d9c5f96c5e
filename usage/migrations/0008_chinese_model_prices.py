"""Prices for the Chinese vendors' models people reach through the proxy: DeepSeek, Qwen
(Alibaba Cloud Model Studio, international) and Kimi (Moonshot). USD per million tokens, as
each vendor lists them in USD (no currency conversion was needed), read on 2026-11-29 from the
stored copies named below; `taken_on` is the date of the copy the figure comes from, so the
admin shows how old each price is.

- DeepSeek: api-docs.deepseek.com/quick_start/pricing, copy checked 2026-11-15. DeepSeek bills
  peak hours (01:00-04:00 and 06:00-10:00 UTC, weekdays) at twice the off-peak rate; the
  portal prices per model, not per hour, so the peak rate is used: costs are an upper bound
  (off-peak use costs half). `deepseek-v4-flash` is a legacy name DeepSeek still accepts and
  bills at the Flash price. Cache write: DeepSeek has no write charge (a cache miss is input).
- Qwen: alibabacloud.com/help/en/model-studio/billing-for-model-studio ("Flagship models",
  international), copy last updated 2025-04-22, the newest vendor copy found. The shortest-
  prompt band (Qwen prices by prompt length) and the non-thinking output price; a cache hit
  costs 40 % of the input price (same page). These are old: staff should check them.
- Kimi: platform.moonshot.ai/docs/pricing/chat, archived copy of 2026-03-26 (USD, tax
  included). Cache write: Moonshot has no write charge (a cache miss is input).

Not priced (their cost stays "unknown" until staff add a price; the admin's "Unpriced models
seen" list names them when they are used): see UNPRICED below, with why. No figure was taken
from a reseller, a gateway or a blog: their prices differ from the vendors' and from each other.
"""

from __future__ import annotations

import datetime
from decimal import Decimal

from django.db import migrations

DEEPSEEK = ("api-docs.deepseek.com/quick_start/pricing (peak-hour rate; off-peak is half)",
            datetime.date(2026, 11, 15))
ALIBABA = ("alibabacloud.com/help/en/model-studio/billing-for-model-studio (international, "
           "shortest-prompt band)", datetime.date(2025, 4, 22))
MOONSHOT = ("platform.moonshot.ai/docs/pricing/chat (archived copy)", datetime.date(2026, 3, 26))

# model: (input, output, cache read, cache write, (source, taken on), also its dated releases)
PRICES = {
    "deepseek-flash": ("0.30", "1.20", "0.006", "0.30", DEEPSEEK, False),
    "deepseek-v4-flash": ("0.30", "1.20", "0.006", "0.30", DEEPSEEK, False),
    "deepseek-v4-pro": ("1.32", "3.96", "0.044", "1.32", DEEPSEEK, False),
    "qwen-max": ("1.60", "6.40", "0.64", "1.60", ALIBABA, True),
    "qwen-plus": ("0.40", "1.20", "0.16", "0.40", ALIBABA, True),
    "qwen-turbo": ("0.05", "0.20", "0.02", "0.05", ALIBABA, True),
    "kimi-k2.5": ("0.60", "3.00", "0.10", "0.60", MOONSHOT, False),
    "kimi-k2-0905-preview": ("0.60", "2.50", "0.15", "0.60", MOONSHOT, False),
    "kimi-k2-0711-preview": ("0.60", "2.50", "0.15", "0.60", MOONSHOT, False),
}

UNPRICED = {
    "deepseek-chat": "legacy alias, retired by DeepSeek; not on its current price page",
    "deepseek-reasoner": "legacy alias, retired by DeepSeek; not on its current price page",
    "qwen3-max": "no copy of Alibaba's price page listing it was found",
    "qwen3-coder-plus": "no copy of Alibaba's price page listing it was found",
    "qwen3-coder-flash": "no copy of Alibaba's price page listing it was found",
    "glm-4.6": "no copy of Z.ai's price page (docs.z.ai) was found",
    "glm-4.5": "no copy of Z.ai's price page (docs.z.ai) was found",
    "glm-4.5-air": "no copy of Z.ai's price page (docs.z.ai) was found",
    "kimi-k2.6": "Moonshot's K2.6 price page copy showed no figures",
    "kimi-k3": "no copy of Moonshot's K3 price page was found",
    "kimi-k2-turbo-preview": "not on the archived Moonshot page",
    "doubao-seed-1.6": "Volcano Engine lists prices in its console; no copy was found",
    "doubao-seed-1.6-thinking": "Volcano Engine lists prices in its console; no copy was found",
    "doubao-seed-1.6-flash": "Volcano Engine lists prices in its console; no copy was found",
}


def _names(name: str, dated: bool) -> list[str]:
    # Dated snapshots (qwen-plus-2025-07-28) share the name's price; never a bare `name*`.
    return [name, f"{name}-20*"] if dated else [name]


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("usage", "ModelPrice")
    for name, (inp, out, read, write, (source, taken_on), dated) in PRICES.items():
        values = {
            "input": Decimal(inp), "output": Decimal(out), "cache_read": Decimal(read),
            "cache_write": Decimal(write), "source": source, "taken_on": taken_on,
        }
        for model in _names(name, dated):
            # A price staff already entered for the model wins.
            ModelPrice.objects.get_or_create(model=model, defaults=values)


def unseed(apps, schema_editor):
    ModelPrice = apps.get_model("usage", "ModelPrice")
    for name, (*_prices, (source, taken_on), dated) in PRICES.items():
        ModelPrice.objects.filter(
            model__in=_names(name, dated), source=source, taken_on=taken_on
        ).delete()


class Migration(migrations.Migration):
    dependencies = [("usage", "0007_display_currency")]

    operations = [migrations.RunPython(seed, unseed)]
