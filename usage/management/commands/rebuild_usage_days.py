"""Rebuilds the person × day rollup the leaderboard reads, and the model × day rollup the
staff dashboard reads, from the hourly usage rows."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from usage.rollups import usage_days_rebuild


class Command(BaseCommand):
    help = (
        "Recompute the person × day and model × day usage rollups (UsageDay, UsageModelDay) "
        "from UsageSnapshot: after "
        "changing TIME_ZONE or recomputing past cost. Running it twice changes nothing."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        rows = usage_days_rebuild()
        self.stdout.write(f"Rebuilt {rows} person-day rows.")
