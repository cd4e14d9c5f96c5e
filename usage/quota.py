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

from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey
from usage.limits import (
    LIMIT_NAMES, LIMITS, LimitReached, Used, Window, person_usage_in_windows, windows_at,
)

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
    total, by_key = person_usage_in_windows(person_id=person.pk, windows=windows)
    lines = [QuotaLine(by_key.get(k.pk, Used()), _bars(k, by_key.get(k.pk, Used()), windows), k)
             for k in keys if k.status in SHOWN]
    return Quota(person=QuotaLine(total, _bars(person, total, windows)), keys=lines,
                 day=day, month=month, time_zone=str(timezone.get_default_timezone()))


def quota_limit_reached(quota: Quota) -> LimitReached | None:
    """The limit that holds the person's keys, read off quota bars already computed (no
    query); the same answer as usage.limits.limit_reached, which key issuing asks."""
    reached = [
        LimitReached(bar.field, f"{'key' if line.key else 'person'}_{bar.measure}_{bar.window}",
                     bar.resets_at, bar.used, bar.limit, line.key)
        for line in (quota.person, *quota.keys) for bar in line.bars if bar.used >= bar.limit
    ]
    return max(reached, key=lambda r: (r.until, r.key is not None)) if reached else None
