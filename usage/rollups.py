"""The person × day rollup (UsageDay) and the model × day rollup (UsageModelDay): how an hour
in UTC maps to a day of the portal's TIME_ZONE, and a full rebuild from UsageSnapshot. The incremental part is in
usage/services.py `_ingest_rows`, next to the upsert it mirrors."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum


def local_day_of(hour: datetime) -> date:
    """The day of TIME_ZONE an hour (an aware datetime) falls on. Whole-hour offsets keep an
    hour inside one local day; half-hour zones file it under the day it starts in."""
    return hour.astimezone(ZoneInfo(settings.TIME_ZONE)).date()


def usage_days_rebuild(*, snapshot_model: Any = None, day_model: Any = None) -> int:
    """Recomputes every UsageDay row from UsageSnapshot (after a price recompute or a change
    of TIME_ZONE; the migration that adds the rollup runs it with its historical models),
    and, called without models, the model × day rollup too. Returns the number of person ×
    day rows written."""
    if snapshot_model is None or day_model is None:
        from usage.models import UsageDay, UsageModelDay, UsageSnapshot

        snapshot_model, day_model = UsageSnapshot, UsageDay
        model_days_rebuild(snapshot_model=UsageSnapshot, model_day_model=UsageModelDay)
    # Migrations older than the token split run this with models that have no incomplete
    # counts yet.
    incomplete = any(f.name == "incomplete_requests" for f in day_model._meta.get_fields())
    days: dict[tuple[int, date], list[Any]] = defaultdict(lambda: [0, 0, Decimal(0), 0, 0])
    sums: dict[str, Any] = {
        "r": Sum("requests"), "t": Sum("total_tokens"), "c": Sum("cost"),
        "u": Sum("requests", filter=Q(cost__isnull=True)),
        **({"i": Sum("incomplete_requests")} if incomplete else {}),
    }
    grouped = (
        snapshot_model.objects.filter(api_key__owner__isnull=False)
        .values_list("api_key__owner_id", "hour").annotate(**sums).order_by()
    )
    for owner_id, hour, requests, tokens, cost, unpriced, *lost in grouped.iterator(
        chunk_size=5000
    ):
        row = days[(owner_id, local_day_of(hour))]
        row[0] += requests
        row[1] += tokens
        row[2] += cost or 0
        row[3] += unpriced or 0
        if lost:  # models older than the token split have no incomplete counts
            row[4] += lost[0] or 0
    with transaction.atomic():
        day_model.objects.all().delete()
        day_model.objects.bulk_create(
            (
                day_model(person_id=p, day=d, requests=r, total_tokens=t, cost=c,
                          unpriced_requests=u, **({"incomplete_requests": i} if incomplete else {}))
                for (p, d), (r, t, c, u, i) in days.items()
            ),
            batch_size=2000,
        )
    return len(days)


def model_days_rebuild(*, snapshot_model: Any, model_day_model: Any) -> int:
    """Recomputes every UsageModelDay row from UsageSnapshot (the people's keys only, as
    UsageDay). Returns the number of rows written."""
    days: dict[tuple[str, date], list[Any]] = defaultdict(
        lambda: [0, 0, Decimal(0), 0, 0, 0, 0, 0])
    grouped = (
        snapshot_model.objects.filter(api_key__owner__isnull=False)
        .values_list("model", "hour").annotate(
            r=Sum("requests"), t=Sum("total_tokens"), c=Sum("cost"),
            u=Sum("requests", filter=Q(cost__isnull=True)), i=Sum("incomplete_requests"),
            n=Sum("input_tokens"), cr=Sum("cached_tokens"), cw=Sum("cache_creation_tokens"),
        ).order_by()
    )
    for model, hour, *sums in grouped.iterator(chunk_size=5000):
        row = days[(model, local_day_of(hour))]
        for n, value in enumerate(sums):
            row[n] += value or 0
    with transaction.atomic():
        model_day_model.objects.all().delete()
        model_day_model.objects.bulk_create(
            (
                model_day_model(model=m, day=d, requests=r, total_tokens=t, cost=c,
                                unpriced_requests=u, incomplete_requests=i, input_tokens=n,
                                cached_tokens=cr, cache_creation_tokens=cw)
                for (m, d), (r, t, c, u, i, n, cr, cw) in days.items()
            ),
            batch_size=2000,
        )
    return len(days)
