"""Limits: after each usage sync, keys over a limit are suspended and owners are told at 80 %
and 100 %.

Windows. A day or a month starts at local midnight in the portal's TIME_ZONE (not the
request's active zone: enforcement runs from cron). UsageSnapshot rows are UTC hours; a row
belongs to the window its hour *starts* in, which matters only in zones with a non-whole-hour
offset (India, Nepal...), where the hour that straddles midnight counts for the old day.

What counts. A key's usage is its own rows; a person's usage is the rows of every key they
own or owned (a revoked or suspended key's tokens were still spent this window). A model
without a price has an unknown cost: it counts as 0 toward cost limits (the limit can then
only be under-enforced, never over-enforced), and the 80 % / 100 % emails say how many
requests were not priced.

Suspension goes through `pool.services.key_suspend`: the key is marked suspended in the
portal first (with an audit row), so the decision survives a proxy that cannot be reached;
the proxy follows at the next reconcile, which keeps the key's value in escrow, and the
lifecycle step of a later reconcile brings it back when `suspended_until` passes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone, translation
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from accounts.models import Limits, User
from keyportal.links import where_to_look
from keyportal.notify import person_notify
from pool.models import ApiKey
from pool.services import (
    LIMIT_REASONS,
    KeyRefused,
    LifecycleReport,
    ReconcileReport,
    key_limit_lift,
    key_limit_reason_move,
    key_suspend,
    keys_lifecycle,
    keys_reconcile_quietly,
)
from usage.currency import money
from usage.models import LimitNotice, UsageSnapshot
from usage.selectors import _decimal

log = logging.getLogger(__name__)

THRESHOLDS = (80, 100)  # percent of a limit at which the owner is emailed, once per window
Status, Reason = ApiKey.Status, ApiKey.SuspendedFor

# limit field -> (what it measures, which window)
LIMITS: dict[str, tuple[str, str]] = {
    "limit_tokens_day": ("tokens", "day"),
    "limit_tokens_month": ("tokens", "month"),
    "limit_cost_day": ("cost", "day"),
    "limit_cost_month": ("cost", "month"),
}
LIMIT_NAMES = {
    "limit_tokens_day": gettext_lazy("daily token limit"),
    "limit_tokens_month": gettext_lazy("monthly token limit"),
    "limit_cost_day": gettext_lazy("daily cost limit"),
    "limit_cost_month": gettext_lazy("monthly cost limit"),
}


@dataclass(frozen=True)
class Window:
    start: datetime  # aware, local midnight
    end: datetime  # the next window's start: when a key suspended in this window returns


def windows_at(now: datetime) -> dict[str, Window]:
    """The day and the month `now` falls in, in the portal's TIME_ZONE. Built from local
    dates with zoneinfo, so a DST change makes a 23- or 25-hour day, as the wall clock does."""
    zone = timezone.get_default_timezone()
    today = timezone.localtime(now, zone).date()
    tomorrow = today + timedelta(days=1)
    month = today.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)

    def midnight(day: date) -> datetime:
        return datetime.combine(day, time.min, tzinfo=zone)

    return {
        "day": Window(midnight(today), midnight(tomorrow)),
        "month": Window(midnight(month), midnight(next_month)),
    }


@dataclass
class Used:
    """Usage in the current day and month windows."""

    tokens_day: int = 0
    tokens_month: int = 0
    cost_day: Decimal = Decimal(0)
    cost_month: Decimal = Decimal(0)
    unpriced_day: int = 0  # requests whose cost is unknown (counted as 0 in cost_*)
    unpriced_month: int = 0

    def add(self, other: Used) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def of(self, limit_field: str) -> tuple[int | Decimal, int]:
        """(amount used, unpriced requests) toward a limit field."""
        measure, window = LIMITS[limit_field]
        unpriced = getattr(self, f"unpriced_{window}") if measure == "cost" else 0
        return getattr(self, f"{measure}_{window}"), unpriced


def usage_in_windows(*, windows: dict[str, Window]) -> tuple[dict[int, Used], dict[int, Used]]:
    """Usage per key and per owner in the current day and month, from one grouped query
    over the month's rows (the day lies inside the month)."""
    day, month = windows["day"], windows["month"]
    in_day = Q(hour__gte=day.start, hour__lt=day.end)
    unpriced = Q(cost__isnull=True)
    # Only the rows a limit can look at: keys with a limit of their own, and every key of a
    # person with a limit. With few limits set, a sync sums a small part of the month.
    rows = (
        UsageSnapshot.objects.filter(hour__gte=month.start, hour__lt=month.end)
        .filter(_any_limit("api_key__") | _any_limit("api_key__owner__"))
        .values("api_key_id", "api_key__owner_id")
        .annotate(
            tokens_month=Sum("total_tokens"),
            tokens_day=Sum("total_tokens", filter=in_day),
            # SUM skips NULL: an unknown cost adds 0, and is counted separately below.
            cost_month=Sum("cost"),
            cost_day=Sum("cost", filter=in_day),
            unpriced_month=Sum("requests", filter=unpriced),
            unpriced_day=Sum("requests", filter=unpriced & in_day),
        )
        .order_by()
    )
    by_key: dict[int, Used] = {}
    by_person: dict[int, Used] = defaultdict(Used)
    for row in rows:
        used = Used(**{name: row[name] or 0 for name in Used.__dataclass_fields__})
        by_key[row["api_key_id"]] = used
        if row["api_key__owner_id"] is not None:
            by_person[row["api_key__owner_id"]].add(used)
    return by_key, dict(by_person)


def person_usage_in_windows(*, person_id: int, windows: dict[str, Window]
                            ) -> tuple[Used, dict[int, Used]]:
    """One person's usage in the current day and month, in total and per key, from one
    grouped query over their month's rows (every key they own or owned)."""
    day, month = windows["day"], windows["month"]
    in_day = Q(hour__gte=day.start, hour__lt=day.end)
    unpriced = Q(cost__isnull=True)
    rows = (
        UsageSnapshot.objects.filter(api_key__owner_id=person_id, hour__gte=month.start,
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
        # int() and Decimal(): PostgreSQL sums bigints as numeric, SQLite sums decimals as
        # floats.
        used = Used(**{name: _decimal(row[name]) if name.startswith("cost") else int(row[name] or 0)
                       for name in Used.__dataclass_fields__})
        by_key[row["api_key_id"]] = used
        total.add(used)
    return total, by_key


@dataclass
class LimitsReport:
    suspended: int = 0
    released: int = 0  # suspended keys back: their limit was raised or removed
    notices: int = 0
    lifecycle: LifecycleReport | None = None
    proxy: ReconcileReport | None = None
    proxy_postponed: bool = False

    def lines(self) -> list[str]:
        lines = [_("%(n)d keys suspended for reaching a limit.") % {"n": self.suspended}]
        if self.released:
            lines.append(_("%(n)d suspended keys active again (their limit was raised or "
                           "removed).") % {"n": self.released})
        if self.lifecycle:
            lines += self.lifecycle.lines()
        if self.notices:
            lines.append(_("%(n)d limit emails sent (80 %% or 100 %%).") % {"n": self.notices})
        if self.proxy_postponed:
            lines.append(_("The proxy could not be reached: suspended keys leave it at the next "
                           "reconcile."))
        return lines


@dataclass(frozen=True)
class Crossed:
    reason: str  # an ApiKey.SuspendedFor value
    until: datetime


def _crossed(limits: Limits | Any, used: Used | None, windows: dict[str, Window],
             scope: str) -> list[Crossed]:
    """The limits of `limits` (a person or a key) that `used` reached; `scope` is "key" or
    "person", the prefix of the SuspendedFor value. Reaching a limit is enough: at 100 % the
    allowance is spent, and the next request would go over it."""
    if used is None:
        used = Used()
    crossed = []
    for name, (measure, window) in LIMITS.items():
        limit = getattr(limits, name)
        if limit is not None and used.of(name)[0] >= limit:
            crossed.append(Crossed(f"{scope}_{measure}_{window}", windows[window].end))
    return crossed


def limits_enforce(*, now: datetime, reconcile: bool = True) -> LimitsReport:
    """Suspends every active key that reached one of its own limits or whose owner reached a
    person limit, until the window resets (the later reset when several limits are reached,
    so that the key does not come back at midnight only to be suspended again for the month),
    emails owners at 80 % and 100 % once per window, then lets the proxy follow."""
    report = LimitsReport()
    # What the clock decides at `now` comes first (a window that reset brings its keys
    # back), so that a key is judged on the window it is in now; reconcile runs it again
    # with the wall clock, which changes nothing more in production, where now is the clock.
    report.lifecycle = keys_lifecycle(now=now)
    windows = windows_at(now)
    by_key, by_person = usage_in_windows(windows=windows)

    # A deactivated person is not emailed about limits: their keys are suspended anyway.
    people = User.objects.filter(_any_limit(""), is_active=True)
    for person in people.iterator(chunk_size=500):
        report.notices += _notify(subject=f"person:{person.pk}", to=person, limits=person,
                                  used=by_person.get(person.pk), windows=windows, key=None)

    # Keys a limit still holds although it was raised or removed since (in the admin, which
    # releases them at once, or in the shell or SQL, which only this catches).
    report.released = _release(_held_by_limit(now), by_key=by_key, by_person=by_person,
                               windows=windows).released

    candidates = (
        # The lifecycle above suspended the keys of deactivated people; a person deactivated
        # since then is left to the next lifecycle, so that their keys wait for the person
        # and not for a limit's window.
        ApiKey.objects.filter(status=Status.ACTIVE, owner__isnull=False, owner__is_active=True)
        .filter(_any_limit("") | _any_limit("owner__"))
        .select_related("owner")
        .defer("value", "escrow")
    )
    # A list, not an iterator: the loop writes to the table it reads, which a chunked read
    # on SQLite does not isolate from.
    for key in list(candidates):
        report.notices += _notify(subject=f"key:{key.pk}", to=key.owner, limits=key,
                                  used=by_key.get(key.pk), windows=windows, key=key)
        crossed = _crossed(key, by_key.get(key.pk), windows, "key") + _crossed(
            key.owner, by_person.get(key.owner_id), windows, "person"
        )
        if not crossed:
            continue
        worst = _worst(crossed)
        if key_suspend(key=key, reason=worst.reason, until=worst.until,
                       detail=f"{worst.reason} reached; back at {worst.until.isoformat()}"):
            report.suspended += 1

    if reconcile and (report.suspended or report.released or report.lifecycle.lines()
                      or proxy_follow_due(now=now)):
        report.proxy = keys_reconcile_quietly()
        report.proxy_postponed = report.proxy is None
    return report


_REASON_ORDER = {reason: i for i, reason in enumerate(Reason.values)}


def _worst(crossed: list[Crossed]) -> Crossed:
    """The latest return wins (a key back at midnight would only be suspended again for the
    month); among equal ones, the key's own limit names the reason."""
    return max(crossed, key=lambda c: (c.until, -_REASON_ORDER[c.reason]))


# --- a limit raised or removed: its keys come back at once ---------------------------------


def _held_by_limit(now: datetime) -> QuerySet[ApiKey]:
    """Keys suspended by a limit whose window has not reset yet (keys_lifecycle brings back
    the others), of people whose account is active."""
    return (
        ApiKey.objects.filter(status=Status.SUSPENDED, suspended_for__in=LIMIT_REASONS,
                              suspended_until__gt=now, owner__is_active=True)
        .select_related("owner").defer("value", "escrow").order_by("id")
    )


@dataclass
class Released:
    released: int = 0  # active again
    moved: int = 0  # still held, by another limit that resets at another time


def _release(keys: QuerySet[ApiKey], *, by_key: dict[int, Used], by_person: dict[int, Used],
             windows: dict[str, Window], by: User | None = None, ip: str | None = None
             ) -> Released:
    """Judges each suspended key in `keys` again on today's limits and usage: a key that no
    limit holds any more is active again; a key another limit still holds waits for that
    one's reset."""
    done = Released()
    for key in list(keys):
        crossed = _crossed(key, by_key.get(key.pk), windows, "key") + _crossed(
            key.owner, by_person.get(key.owner_id), windows, "person"
        )
        if not crossed:
            done.released += key_limit_lift(
                key=key, by=by, ip=ip, detail=f"{key.suspended_for} raised or removed")
            continue
        worst = _worst(crossed)
        if (worst.reason, worst.until) != (key.suspended_for, key.suspended_until):
            done.moved += key_limit_reason_move(
                key=key, reason=worst.reason, until=worst.until, by=by, ip=ip,
                detail=f"{key.suspended_for} changed; {worst.reason} holds the key until "
                       f"{worst.until.isoformat()}")
    return done


def limits_release(*, now: datetime, person: User | None = None, key: ApiKey | None = None,
                   by: User | None = None, ip: str | None = None) -> Released:
    """After staff changed the limits of `person` or of `key`: the keys those limits held
    are judged again at once (not at the next sync, nor at midnight), and come back if no
    limit holds them. Each change is audited. The proxy follows at the next reconcile,
    which the caller runs once this is committed (keys_reconcile_in_request)."""
    held = _held_by_limit(now)
    if person is not None:
        held, owner_id = held.filter(owner=person), person.pk
    elif key is not None:
        held, owner_id = held.filter(pk=key.pk), key.owner_id
    else:
        raise ValueError("limits_release needs a person or a key")
    if owner_id is None or not held.exists():
        return Released()
    windows = windows_at(now)
    total, by_key = person_usage_in_windows(person_id=owner_id, windows=windows)
    return _release(held, by_key=by_key, by_person={owner_id: total}, windows=windows, by=by,
                    ip=ip)


# --- no working key for someone over a limit ----------------------------------------------


def _format_amount(measure: str, amount: Any) -> str:
    # Costs in the display currency by the one rounding rule, as the pages show them.
    return money(amount) if measure == "cost" else f"{amount:,}"


def _reset_text(when: datetime) -> str:
    return timezone.localtime(when, timezone.get_default_timezone()).strftime("%Y-%m-%d %H:%M %Z")


@dataclass(frozen=True)
class LimitReached:
    """The limit that keeps a person from getting a key now, with what to tell them."""

    field: str  # a Limits field, e.g. "limit_tokens_day"
    reason: str  # the ApiKey.SuspendedFor value, e.g. "person_tokens_day"
    until: datetime  # the window's reset: when keys come back and new ones can be added
    used: Any
    limit: Any
    key: ApiKey | None = None  # the key whose own limit it is; None: the person's limit

    def _values(self) -> dict[str, Any]:
        measure = LIMITS[self.field][0]
        values = {
            "limit_name": LIMIT_NAMES[self.field],
            "used": _format_amount(measure, self.used),
            "limit": _format_amount(measure, self.limit),
            "reset": _reset_text(self.until),
        }
        if self.key is not None:
            values |= {"key": self.key.masked, "label": self.key.label or "—"}
        return values

    @property
    def refusal(self) -> str:
        """Why a new key is refused (the add form, the API)."""
        if self.key is not None:
            text = _("Your key “%(label)s” (%(key)s) has reached its %(limit_name)s (%(used)s "
                     "of %(limit)s), so no new key can be added until it resets at %(reset)s.")
        else:
            text = _("You have reached your %(limit_name)s (%(used)s of %(limit)s), so no new "
                     "key can be added until it resets at %(reset)s.")
        return text % self._values()

    @property
    def banner(self) -> str:
        """What /my-keys says at the top while it holds."""
        if self.key is not None:
            text = _("Your key “%(label)s” (%(key)s) has reached its %(limit_name)s: it is "
                     "suspended until %(reset)s, and no new key can be added before then.")
        else:
            text = _("You have reached your %(limit_name)s: your keys are suspended until "
                     "%(reset)s, and no new key can be added before then.")
        return text % self._values()


def limit_reached(*, person: User, now: datetime | None = None) -> LimitReached | None:
    """The limit that stops `person` getting a key now, or None: one of their own limits
    reached, or the own limit of one of their keys still in use (a fresh key next to a
    suspended one would make that key's limit a formality). Judged on usage as it is, not
    on the keys' states: a person who crossed a limit since the last sync is refused too,
    and a raised limit frees them at once. When several hold, the one that resets last."""
    now = now or timezone.now()
    windows = windows_at(now)
    keys = [k for k in ApiKey.objects.filter(
        owner=person, status__in=(Status.ACTIVE, Status.SUSPENDED)).filter(_any_limit(""))
        .defer("value", "escrow")]
    if not person.has_limits and not keys:
        return None  # nothing to measure: no query
    total, by_key = person_usage_in_windows(person_id=person.pk, windows=windows)
    reached: list[LimitReached] = []
    for owner, used, key in [(person, total, None)] + [(k, by_key.get(k.pk), k) for k in keys]:
        used = used or Used()
        for name, (measure, window) in LIMITS.items():
            limit = getattr(owner, name)
            if limit is not None and used.of(name)[0] >= limit:
                scope = "key" if key is not None else "person"
                reached.append(LimitReached(name, f"{scope}_{measure}_{window}",
                                            windows[window].end, used.of(name)[0], limit, key))
    if not reached:
        return None
    return max(reached, key=lambda r: (r.until, r.key is not None))


def key_issue_guard(user: User) -> KeyRefused | None:
    """Registered with pool (pool.services.key_issue_guard_register) when usage loads."""
    reached = limit_reached(person=user)
    if reached is None:
        return None
    return KeyRefused(reached.refusal, reason=reached.reason, until=reached.until)


def proxy_follow_due(*, now: datetime) -> bool:
    """Whether the proxy's list lags behind the portal: a removal not yet done (the proxy was
    down), a key back from suspension not yet pushed, or a key due to return or expire.
    Then the sync reconciles, so that keys come back after a window reset without waiting
    for the operator's reconcile_keys."""
    return ApiKey.objects.filter(
        Q(proxy_state=ApiKey.ProxyState.REMOVAL_PENDING)
        | Q(status=Status.ACTIVE, escrow__isnull=False)  # back, waiting to be pushed again
        | Q(status=Status.SUSPENDED, suspended_until__lte=now)
        | Q(status=Status.ACTIVE, expires_at__lte=now)
    ).exists()


def _any_limit(prefix: str) -> Q:
    q = Q()
    for name in Limits.LIMIT_FIELDS:
        q |= Q(**{f"{prefix}{name}__isnull": False})
    return q


def _notify(*, subject: str, to: User, limits: Any, used: Used | None,
            windows: dict[str, Window], key: ApiKey | None) -> int:
    """Emails `to` for each limit of `limits` that reached a threshold this window, once:
    the LimitNotice row is the claim (a unique insert), so concurrent syncs or a rerun never
    send twice. When usage jumps past both thresholds at once, one email (the higher) goes
    out and both are claimed."""
    used = used or Used()
    sent = 0
    for name, (_measure, window_name) in LIMITS.items():
        limit = getattr(limits, name)
        if limit is None:
            continue
        amount, unpriced = used.of(name)
        reached = [t for t in THRESHOLDS if amount * 100 >= limit * t]
        if not reached:
            continue
        window = windows[window_name]
        claimed = [t for t in reached if _claim(subject, name, window.start, t)]
        if not claimed or max(claimed) != max(reached):
            continue  # the highest threshold was already told
        threshold = max(claimed)
        # Written in the person's language (cron has no request to take one from).
        with translation.override(to.email_language):
            message = _message(name, threshold, amount, limit, unpriced, window, key)
        if person_notify(user=to, **message):
            sent += 1
        else:
            # Not delivered: release the claims so that the next sync tries again.
            LimitNotice.objects.filter(subject=subject, limit=name, window_start=window.start,
                                       threshold__in=claimed).delete()
    return sent


def _claim(subject: str, limit: str, window_start: datetime, threshold: int) -> bool:
    try:
        with transaction.atomic():
            LimitNotice.objects.create(subject=subject, limit=limit, window_start=window_start,
                                       threshold=threshold)
    except IntegrityError:
        return False
    return True


def _message(name: str, threshold: int, amount: Any, limit: Any, unpriced: int, window: Window,
             key: ApiKey | None) -> dict[str, str]:
    measure = LIMITS[name][0]
    values = {
        "pct": threshold,
        "limit_name": LIMIT_NAMES[name],
        "used": _format_amount(measure, amount),
        "limit": _format_amount(measure, limit),
        "reset": timezone.localtime(window.end, timezone.get_default_timezone()).strftime(
            "%Y-%m-%d %H:%M %Z"),
    }
    if key is not None:
        values |= {"key": key.masked, "label": key.label}
        subject = _("Key Portal: your key %(key)s reached %(pct)d %% of its %(limit_name)s")
        whose = _("Your key \"%(label)s\" (%(key)s) has used %(used)s of its %(limit_name)s of "
                  "%(limit)s.")
        stops = _("The key is now suspended; it works again at %(reset)s.")
        warns = _("At 100 %% the key is suspended until %(reset)s.")
    else:
        subject = _("Key Portal: you reached %(pct)d %% of your %(limit_name)s")
        whose = _("Your keys together have used %(used)s of your %(limit_name)s of %(limit)s.")
        stops = _("All your keys are now suspended; they work again at %(reset)s.")
        warns = _("At 100 %% all your keys are suspended until %(reset)s.")
    lines = [whose % values, (stops if threshold >= 100 else warns) % values]
    if unpriced:
        lines.append(_("%(n)d requests on models without a known price are not counted in this "
                       "cost.") % {"n": unpriced})
    lines += where_to_look()
    return {"subject": subject % values, "body": "\n\n".join(lines)}
