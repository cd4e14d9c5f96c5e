"""The price table the portal ships with: USD per million tokens, list prices (standard tier,
short-prompt band where a vendor has two), taken on 2026-11-22.

Sources: Anthropic's pricing page (platform.claude.com/docs/en/about-claude/pricing), OpenAI's
(developers.openai.com/api/docs/pricing) and Google's (ai.google.dev/gemini-api/docs/pricing),
read through published copies of those pages on 2026-11-22. Staff correct them in the admin
("Model prices"), then run "Recompute cost" on the changed rows.

Each model gets its bare name and its dated releases (`name-20*`, e.g. claude-sonnet-4-5-20250929,
gpt-5-2025-08-07) — never a bare `name*`, which would price a newer model (gpt-5.5) at an older
one's rate instead of showing its cost as unknown. Cache write: Anthropic's 5-minute write
price; OpenAI and Google bill cached writes as ordinary input, so it equals the input price.
"""

from __future__ import annotations

import datetime
from decimal import Decimal

from django.db import migrations

TAKEN_ON = datetime.date(2026, 11, 22)
ANTHROPIC = "platform.claude.com/docs/en/about-claude/pricing"
OPENAI = "developers.openai.com/api/docs/pricing"
GOOGLE = "ai.google.dev/gemini-api/docs/pricing"

# model: (input, output, cache read, cache write, source)
PRICES = {
    # Anthropic
    "claude-opus-5-5": ("4", "20", "0.20", "5", ANTHROPIC),
    "claude-opus-5": ("5", "25", "0.50", "6.25", ANTHROPIC),
    "claude-opus-4-8": ("5", "25", "0.50", "6.25", ANTHROPIC),
    "claude-opus-4-7": ("5", "25", "0.50", "6.25", ANTHROPIC),
    "claude-opus-4-6": ("5", "25", "0.50", "6.25", ANTHROPIC),
    "claude-opus-4-5": ("5", "25", "0.50", "6.25", ANTHROPIC),
    "claude-opus-4-1": ("15", "75", "1.50", "18.75", ANTHROPIC),
    "claude-opus-4": ("15", "75", "1.50", "18.75", ANTHROPIC),
    "claude-opus-4-0": ("15", "75", "1.50", "18.75", ANTHROPIC),
    "claude-sonnet-5-5": ("2", "10", "0.10", "2.50", ANTHROPIC),
    "claude-sonnet-5": ("2", "10", "0.20", "2.50", ANTHROPIC),
    "claude-sonnet-4-6": ("3", "15", "0.30", "3.75", ANTHROPIC),
    "claude-sonnet-4-5": ("3", "15", "0.30", "3.75", ANTHROPIC),
    "claude-sonnet-4": ("3", "15", "0.30", "3.75", ANTHROPIC),
    "claude-sonnet-4-0": ("3", "15", "0.30", "3.75", ANTHROPIC),
    "claude-3-7-sonnet": ("3", "15", "0.30", "3.75", ANTHROPIC),
    "claude-haiku-5-5": ("0.10", "0.50", "0.01", "0.125", ANTHROPIC),
    "claude-haiku-4-5": ("1", "5", "0.10", "1.25", ANTHROPIC),
    "claude-3-5-haiku": ("0.80", "4", "0.08", "1", ANTHROPIC),
    # OpenAI
    "gpt-5.4": ("2.50", "15", "0.25", "2.50", OPENAI),
    "gpt-5.4-mini": ("0.75", "4.50", "0.075", "0.75", OPENAI),
    "gpt-5.2": ("1.75", "14", "0.175", "1.75", OPENAI),
    "gpt-5.1": ("1.25", "10", "0.125", "1.25", OPENAI),
    "gpt-5.1-codex": ("1.25", "10", "0.125", "1.25", OPENAI),
    "gpt-5": ("1.25", "10", "0.125", "1.25", OPENAI),
    "gpt-5-codex": ("1.25", "10", "0.125", "1.25", OPENAI),
    "gpt-5-mini": ("0.25", "2", "0.025", "0.25", OPENAI),
    "gpt-5-nano": ("0.05", "0.40", "0.005", "0.05", OPENAI),
    "gpt-4.1": ("2", "8", "0.50", "2", OPENAI),
    "gpt-4.1-mini": ("0.40", "1.60", "0.10", "0.40", OPENAI),
    "gpt-4o": ("2.50", "10", "1.25", "2.50", OPENAI),
    "gpt-4o-mini": ("0.15", "0.60", "0.075", "0.15", OPENAI),
    "o3": ("2", "8", "0.50", "2", OPENAI),
    "o4-mini": ("1.10", "4.40", "0.275", "1.10", OPENAI),
    # Google
    # Introductory price, until 2026-12-31.
    "gemini-3.6-flash": ("0.75", "3.75", "0.075", "0.75", GOOGLE),
    "gemini-3-pro-preview": ("2", "12", "0.20", "2", GOOGLE),
    "gemini-2.5-pro": ("1.25", "10", "0.125", "1.25", GOOGLE),
    "gemini-2.5-flash": ("0.30", "2.50", "0.03", "0.30", GOOGLE),
    "gemini-2.5-flash-lite": ("0.10", "0.40", "0.01", "0.10", GOOGLE),
}


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("usage", "ModelPrice")
    for name, (inp, out, read, write, source) in PRICES.items():
        values = {
            "input": Decimal(inp), "output": Decimal(out), "cache_read": Decimal(read),
            "cache_write": Decimal(write), "source": source, "taken_on": TAKEN_ON,
        }
        for model in (name, f"{name}-20*"):
            ModelPrice.objects.get_or_create(model=model, defaults=values)


def unseed(apps, schema_editor):
    ModelPrice = apps.get_model("usage", "ModelPrice")
    names = [m for name in PRICES for m in (name, f"{name}-20*")]
    ModelPrice.objects.filter(model__in=names, taken_on=TAKEN_ON).delete()


class Migration(migrations.Migration):
    dependencies = [("usage", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
