"""Fills an empty database with demo people, keys, prices and 90 days of usage, for
screenshots and trying the pages out (scripts/screenshots.sh). Never for a real portal: it
refuses a database that already has people in it."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from keyportal.audit import Action, audit_record
from pool.models import ApiKey
from pool.services import pool_keys_create
from usage.models import DisplayCurrency, ModelPrice, QuarantinedRecord, SyncRun
from usage.services import usage_ingest

MODELS = {  # model -> (USD per 1M input, per 1M output), or None: no price (unpriced)
    "claude-sonnet-4-5": (Decimal("3"), Decimal("15")),
    "gpt-5-mini": (Decimal("0.25"), Decimal("2")),
    "gemini-2.5-pro": (Decimal("1.25"), Decimal("10")),
    "claude-opus-4-1": (Decimal("15"), Decimal("75")),
    "gpt-5-codex": (Decimal("1.25"), Decimal("10")),
    "deepseek-chat": (Decimal("0.27"), Decimal("1.1")),
    "internal-llm-7b": None,  # a self-hosted model nobody priced
}  # seven: a page's chart gives each its own colour (usage/charts.py)
PEOPLE = [  # email, name, share of the traffic, person limits
    ("li.wei@example.com", "李伟", 1.0, {"limit_tokens_month": 150_000_000}),
    ("zhang.min@example.com", "张敏", 0.6, {"limit_tokens_day": 80_000_000,
                                             "limit_cost_month": Decimal("900")}),
    ("ann@example.com", "Ann Example", 0.3, {}),
    ("bob@example.com", "Bob Example", 0.1, {}),
    # A long address: the staff lists clip it rather than grow past their column.
    ("alexandra.konstantinopoulou@platform-engineering.example.com", "Alexandra", 0.2, {}),
]


class Command(BaseCommand):
    help = "Fills an EMPTY database with demo people, keys and 90 days of usage."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--staff-email", default="staff@example.com")
        parser.add_argument("--staff-password", required=True)
        parser.add_argument("--days", type=int, default=90)
        parser.add_argument("--seed", type=int, default=9)
        parser.add_argument("--currency", default="",
                            help="The display currency and its rate, e.g. CNY:7.1 (default: USD).")

    def handle(self, *args: Any, **options: Any) -> None:
        if User.objects.exists():
            raise CommandError("seed_demo only fills an empty database; this one has people.")
        rng = random.Random(options["seed"])
        now = timezone.now()
        if options["currency"]:
            code, _sep, rate = options["currency"].partition(":")
            DisplayCurrency.objects.update_or_create(id=1, defaults={
                "code": code, "rate": Decimal(rate or "1"), "rate_source": "demo"})
        with transaction.atomic():
            User.objects.create_superuser(options["staff_email"], options["staff_password"],
                                          name="Staff")
            for model, price in MODELS.items():
                if price:
                    # The migrations ship prices for common models: those are kept.
                    ModelPrice.objects.get_or_create(model=model, defaults={
                        "input": price[0], "output": price[1], "cache_read": price[0] / 10,
                        "cache_write": price[0], "source": "demo", "taken_on": now.date()})
            keys = self._people_and_keys(now)
        rows = 0
        for key, share in keys:
            rows += self._usage(key, share, now, options["days"], rng)
        SyncRun.objects.create(started_at=now - timedelta(minutes=4), finished_at=now,
                               ok=True, mode="queue", message="", records_read=rows,
                               records_stored=rows, people=len(PEOPLE), duration_ms=420)
        QuarantinedRecord.objects.create(source=QuarantinedRecord.Source.QUEUE,
                                         reason="negative token count")
        pool_keys_create(count=3)  # below a low-water mark of 20: an alert on the dashboard
        self.stdout.write(f"{len(PEOPLE)} people, {len(keys)} keys, {rows} usage records.")

    def _people_and_keys(self, now: datetime) -> list[tuple[ApiKey, float]]:
        keys = []
        fresh = iter(pool_keys_create(count=2 * len(PEOPLE)))
        for email, name, share, limits in PEOPLE:
            person = User.objects.create_user(email, name=name, **limits)
            for n, label in enumerate(("laptop", "ci")):
                key = next(fresh)
                issued = now - timedelta(days=100 - 10 * n)
                ApiKey.objects.filter(pk=key.pk).update(
                    status=ApiKey.Status.ACTIVE, owner=person, value=None, label=label,
                    issued_at=issued, expires_at=issued + timedelta(days=365),
                    proxy_state=ApiKey.ProxyState.PUSHED,
                    limit_tokens_day=1_000_000 if n else None,
                )
                key.refresh_from_db()
                audit_record(action=Action.KEY_ISSUED, actor=person, target=key,
                             target_label=key.masked)
                keys.append((key, share * (1 if n == 0 else 0.4)))
        return keys

    def _usage(self, key: ApiKey, share: float, now: datetime, days: int,
               rng: random.Random) -> int:
        """One row per request-bundle: a few hours a day, weekdays busier."""
        rows = []
        for back in range(days):
            day = now - timedelta(days=back)
            busy = share * (0.35 if day.weekday() >= 5 else 1.0) * (0.6 + 0.4 * rng.random())
            for model in MODELS:
                if rng.random() > 0.75:
                    continue
                hour = day.replace(hour=rng.randint(1, 12), minute=0, second=0, microsecond=0)
                hour = min(hour, now).astimezone(dt_timezone.utc)
                tokens_in = int(2_000_000 * busy * rng.random()) + 1
                tokens_out = tokens_in // 8
                requests = max(1, tokens_in // 200_000)
                per_in, per_out = tokens_in // requests, tokens_out // requests
                stamp = hour.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
                # Claude Code reads most of its prompt from the cache (usage.accounting).
                read, write = ((per_in * 8 // 10, per_in // 10) if model.startswith("claude")
                               else (0, 0))
                uncached = per_in - read - write
                row = [key.key_hash, model, hour.strftime("%Y-%m-%dT%H"), 0, uncached, per_out,
                       0, read, write, per_in + per_out, stamp, 0]
                rows.extend([row] * requests)
        for start in range(0, len(rows), 5000):
            usage_ingest(rows=rows[start:start + 5000])
        return len(rows)
