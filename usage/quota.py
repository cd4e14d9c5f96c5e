"""Quota: how much of each limit a person and their keys have used today and this month,
for /my-keys, the key page and the staff person page.

Windows and what counts are those the limits are enforced with (usage/limits.py): days
and months of the portal's TIME_ZONE, a person's usage is every key they own or owned, an
unknown cost counts as 0. The person has no time zone setting of their own, so the reset
time is shown in the portal's TIME_ZONE and says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Q, Sum
from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey
from usage.limits import LIMIT_NAMES, LIMITS, Used, Window, windows_at
from usage.models import UsageSnapshot
from usage.selectors import _decimal

SHOWN = (ApiKey.Status.ACTIVE, ApiKey.Status.SUSPENDED)  # keys whose quota still matters


@dataclass(frozen=True)
class QuotaBar:
    field: str
    name: str
    measure: str  # "tokens" or "cost"
    window: str  # "day" or "month"
    used: int | Decimal
    limit: int | Decimal
    unpriced: int  # requests without a price, not in `used` (cost limits only)
    resets_at: datetime

    @property
    def percent(self) -> int:
        """Whole percent, rounded down: 100 only once the limit is reached (when keys stop),
        never for 99.6 %. A limit of 0 is reached from the start."""
        if self.limit <= 0:
            return 100
        return int(self.used * 100 // self.limit)

    @property
    def meter(self) -> int:
        return min(self.percent, 100)

    @property
    def level(self) -> str:
        return "over" if self.percent >= 100 else "high" if self.percent >= 80 else "ok"


@dataclass(frozen=True)
class QuotaLine:
    """A person's or a key's usage in the current day and month, and its limit bars."""

    used: Used
    bars: list[QuotaBar]
    key: ApiKey | None = None


@dataclass(frozen=True)
class Quota:
    person: QuotaLine
    keys: list[QuotaLine] = field(default_factory=list)
    day: Window | None = None
    month: Window | None = None
    time_zone: str = ""


def _bars(limits: Any, used: Used, windows: dict[str, Window]) -> list[QuotaBar]:
    bars = []
    for name, (measure, window) in LIMITS.items():
        limit = getattr(limits, name)
        if limit is None:
            continue
        amount, unpriced = used.of(name)
        bars.append(QuotaBar(name, str(LIMIT_NAMES[name]), measure, window, amount, limit,
                             unpriced, windows[window].end))
    return bars


def quota_for(*, person: User, keys: list[ApiKey], now: datetime | None = None) -> Quota:
    """Quota of `person` and of those of `keys` (theirs, already loaded) still in use, in
    one grouped query over the person's usage this month."""
    windows = windows_at(now or timezone.now())
    day, month = windows["day"], windows["month"]
    in_day = Q(hour__gte=day.start, hour__lt=day.end)
    unpriced = Q(cost__isnull=True)
    rows = (
        UsageSnapshot.objects.filter(api_key__owner=person, hour__gte=month.start,
                                     hour__lt=month.end)
        .values("api_key_id")
        .annotate(
            tokens_month=Sum("total_tokens"), tokens_day=Sum("total_tokens", filter=in_day),
            cost_month=Sum("cost"), cost_day=Sum("cost", filter=in_day),
            unpriced_month=Sum("requests", filter=unpriced),
            unpriced_day=Sum("requests", filter=unpriced & in_day),
        )
        .order_by()
    )
    by_key: dict[int, Used] = {}
    total = Used()
    for row in rows:
        # int(): PostgreSQL sums bigints as numeric.
        used = Used(**{name: _decimal(row[name]) if name.startswith("cost") else int(row[name] or 0)
                       for name in Used.__dataclass_fields__})
        by_key[row["api_key_id"]] = used
        total.add(used)
    lines = [QuotaLine(by_key.get(k.pk, Used()), _bars(k, by_key.get(k.pk, Used()), windows), k)
             for k in keys if k.status in SHOWN]
    return Quota(person=QuotaLine(total, _bars(person, total, windows)), keys=lines,
                 day=day, month=month, time_zone=str(timezone.get_default_timezone()))
