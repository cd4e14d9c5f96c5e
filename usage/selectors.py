"""Reads on usage shared by the API, the admin and (later) the pages."""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from accounts.models import User
from pool.models import ApiKey
from usage.models import SyncRun, UsageSnapshot

_ZERO = 0


def usage_totals(rows: QuerySet[UsageSnapshot]) -> dict[str, int | Decimal | None]:
    """Sums of a set of usage rows in one query (`sum_<field>`). `unpriced_requests` counts
    requests whose cost is unknown (a model without a price): `cost` is then only the known part."""
    return rows.aggregate(
        sum_requests=Coalesce(Sum("requests"), _ZERO),
        sum_failures=Coalesce(Sum("failures"), _ZERO),
        sum_input_tokens=Coalesce(Sum("input_tokens"), _ZERO),
        sum_output_tokens=Coalesce(Sum("output_tokens"), _ZERO),
        sum_total_tokens=Coalesce(Sum("total_tokens"), _ZERO),
        sum_cost=Sum("cost"),
        unpriced_requests=Coalesce(Sum("requests", filter=Q(cost__isnull=True)), _ZERO),
    )


def people_with_usage() -> QuerySet[User]:
    """Everyone who holds a key, with their totals, biggest users first; one query. Usage
    rows join keys one-to-one, so the sums are not multiplied by the join."""
    return (
        User.objects.filter(api_keys__isnull=False)
        .annotate(
            key_count=Count("api_keys", distinct=True),
            total_requests=Coalesce(Sum("api_keys__usage__requests"), _ZERO),
            total_tokens=Coalesce(Sum("api_keys__usage__total_tokens"), _ZERO),
            total_cost=Sum("api_keys__usage__cost"),
            unpriced_requests=Coalesce(
                Sum("api_keys__usage__requests", filter=Q(api_keys__usage__cost__isnull=True)),
                _ZERO,
            ),
        )
        .order_by("-total_tokens", "email")
    )


def keys_with_usage(*, owner: User) -> QuerySet[ApiKey]:
    return (
        ApiKey.objects.filter(owner=owner)
        .annotate(
            total_requests=Coalesce(Sum("usage__requests"), _ZERO),
            total_tokens=Coalesce(Sum("usage__total_tokens"), _ZERO),
            total_cost=Sum("usage__cost"),
            unpriced_requests=Coalesce(
                Sum("usage__requests", filter=Q(usage__cost__isnull=True)), _ZERO
            ),
        )
        .order_by("-created_at", "-id")
    )


def last_sync() -> SyncRun | None:
    return SyncRun.objects.order_by("-started_at", "-id").first()
