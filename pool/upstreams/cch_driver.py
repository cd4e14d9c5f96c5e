"""Claude Code Hub (CCH) behind the upstream interface.

People. A portal person is a CCH user, made with their first key there (named by their email,
cut to CCH's 64 characters). CCH would make a key named "default" with every user: the user is
created with `?withDefaultKey=false`, and should a CCH make one anyway (an older one ignores
the flag) it is switched off at once and deleted with the person's first portal key. So no
key of a portal person at CCH is one the portal did not hand out. (CCH user names are not
unique: a creation whose answer was lost leaves a user with no key, and the next try makes
another.)

Keys are made in the person's account and work at once. Their CCH name is the label plus a
short random suffix (CCH refuses two enabled keys of one user with the same name). CCH will not
delete, nor switch off through its enable route, a user's last enabled key; an admin may switch
it off through PATCH, and a switched-off key can always be deleted: so revoking switches the
key off first when CCH says it is the last one.

Limits. The person's cost limits become their CCH user's USD windows (`dailyQuota`,
`limitMonthlyUsd`); each key's become the key's (`limitDailyUsd`, `limitMonthlyUsd`), folded
with the person's (CCH refuses a key limit above its user's), and its expiry the key's
`expiresAt`. CCH refuses a request (402) once the cost in a window has reached the limit (the
request that crosses it goes through), with no sync needed. Limits are kept to the cent at CCH,
rounded down (pool.upstreams.cch.cents). Token limits have no CCH field: they stay the
portal's suspension after each sync.

Time zone. CCH's day and month windows are in its own time zone (its system setting, else its
TZ, else UTC), the portal's in TIME_ZONE. The day is aligned: each user's and key's
`dailyResetTime` is the portal's midnight in CCH's zone (e.g. 08:00 for a portal on UTC and a
CCH on Asia/Shanghai), computed when the limits are pushed (a daylight-saving change moves it
by an hour until the next push). The month cannot be moved: CCH's month starts at 00:00 on the
1st in its zone, so around a month's turn the two count a few hours differently, and the
portal's suspension (on its own month) stays the authority there.

Usage. CCH logs each request by key with an id (`message_request.id`) and its start time
(`createdAt`); the row is written when the request starts and completed when it ends. The
cursor is, per key, a start time (`from`) and the ids already counted at or after it: each read
asks for the rows since `from` (inclusive, ms), counts the finished rows not yet counted, and
moves `from` no further than the oldest unfinished row (one left unfinished for
STALE_AFTER is given up, and said) and SETTLE before the newest row seen (a row whose start
is a little older than one already seen may be committed after it). So each request is counted
once, across restarts, as long as the cursor is stored with the counts (usage.relays). CCH
keeps its log until its own cleanup (a setting, off by default): what it deletes before a sync
reads it is lost.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.utils.translation import gettext as _

from pool.models import UpstreamAccount
from pool.upstream import UpstreamError, UpstreamNotConfigured
from pool.upstreams import registry
from pool.upstreams.base import Driver, Health, NewKey, RelayLimits, RelayUsage, UsageRead
from pool.upstreams.cch import CchClient, DuplicateName, LastKey, Limits, LogRow

if TYPE_CHECKING:
    from accounts.models import User
    from pool.models import ApiKey

log = logging.getLogger(__name__)

SETTLE = timedelta(seconds=60)
STALE_AFTER = timedelta(hours=2)
LABEL_ROOM = 56  # CCH names are at most 64 characters: the label, " #", 6 hex
ZONE_KEEP = 600.0  # seconds a CCH's time zone is remembered

_zones: dict[str, tuple[str, float]] = {}
_zones_lock = threading.Lock()


def reset_time(*, portal_zone: str, relay_zone: str, now: datetime) -> str:
    """The portal's midnight today, as HH:mm in the relay's time zone."""
    midnight = now.astimezone(ZoneInfo(portal_zone)).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
    there = midnight.astimezone(ZoneInfo(relay_zone))
    return f"{there.hour:02d}:{there.minute:02d}"


class CchDriver(Driver):
    kind = "cch"
    instant_keys = True
    has_people = True
    folds_person_limits = True
    enforces = "cost per day and month, per person and key (CCH refuses, 402); tokens: suspension"

    def __init__(self, upstream: Any) -> None:
        super().__init__(upstream)
        self._client: CchClient | None = None
        self._names: dict[int, str] = {}  # key id -> its name at CCH, as learnt

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def client(self) -> CchClient:
        if self._client is None:
            where = registry.endpoint(self.upstream)
            if not where.management_url or not where.secret:
                raise UpstreamNotConfigured(
                    _("%(name)s has no address or admin token set.") % {"name": self.upstream.name})
            self._client = CchClient(where.management_url, where.secret,
                                     timeout=settings.UPSTREAM_TIMEOUT)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def zone(self, *, fresh: bool = False) -> str:
        """CCH's time zone, asked at most every ZONE_KEEP seconds per CCH (`fresh`: now)."""
        url = self.client.base_url
        with _zones_lock:
            known = _zones.get(url)
        if not fresh and known is not None and time.monotonic() - known[1] < ZONE_KEEP:
            return known[0]
        zone = self.client.time_zone()
        with _zones_lock:
            _zones[url] = (zone, time.monotonic())
        return zone

    def _limits(self, limits: RelayLimits) -> Limits:
        try:
            reset = reset_time(portal_zone=settings.TIME_ZONE, relay_zone=self.zone(),
                               now=datetime.now(timezone.utc))
        except ZoneInfoNotFoundError:
            reset = "00:00"  # a zone this machine does not know: CCH's own midnight
        return Limits(daily_usd=limits.cost_day, monthly_usd=limits.cost_month,
                      daily_reset_time=reset)

    def _name(self, key: ApiKey) -> str:
        """The key's name at CCH, which every PATCH must carry."""
        key_id = int(key.remote_id)
        if key_id in self._names:
            return self._names[key_id]
        account = UpstreamAccount.objects.filter(
            upstream_id=self.upstream.pk, person_id=key.owner_id).values_list(
            "remote_id", flat=True).first()
        if account:
            for found in self.client.list_keys(int(account)):
                self._names[found.id] = found.name
        if key_id not in self._names:
            from pool.upstream import UpstreamNotFound  # noqa: PLC0415

            raise UpstreamNotFound(
                _("%(name)s does not list this key in its person's account.")
                % {"name": self.upstream.name})
        return self._names[key_id]

    # --- people -----------------------------------------------------------------------------

    def person_create(self, *, person: User, limits: RelayLimits) -> str:
        made = self.client.create_user(
            name=person.email, note=f"Key Portal person {person.pk}", limits=self._limits(limits))
        if made.default_key_id is not None:
            # A CCH that made a "default" key anyway: off at once (it is the user's only key,
            # so only PATCH may do it), deleted once the person's first key exists.
            try:
                self.client.update_key(made.default_key_id, name="default", enabled=False)
            except UpstreamError:
                # Not filed, so made again next time: this user must not stay with a working
                # key nobody was given.
                try:
                    self.client.delete_user(made.id)
                except UpstreamError as exc:
                    log.error("A Claude Code Hub user made for a person keeps its default key "
                              "(user %s): %s", made.id, exc)
                raise
        return str(made.id)

    def person_limits_push(self, *, account: str, limits: RelayLimits) -> None:
        self.client.update_user_limits(int(account), self._limits(limits))

    # --- keys -------------------------------------------------------------------------------

    def key_issue(self, *, person: User, label: str, limits: RelayLimits,
                  account: str | None) -> NewKey:
        if account is None:
            raise ValueError("a Claude Code Hub key is made in its person's account")
        user_id = int(account)
        cch_limits = self._limits(limits)
        for attempt in range(2):
            name = f"{(label or 'key')[:LABEL_ROOM]} #{secrets.token_hex(3)}"
            try:
                made = self.client.create_key(user_id, name=name, limits=cch_limits,
                                              expires_at=limits.expires_at)
                break
            except DuplicateName:
                if attempt:
                    raise
        self._names[made.id] = made.name
        try:
            self._default_keys_remove(user_id, keep=made.id)
        except UpstreamError as exc:
            # The key is made and works: it is handed out. A default key is switched off
            # already (person_create); it is deleted with the person's next key.
            log.warning("The default key of Claude Code Hub user %s is not deleted yet: %s",
                        user_id, exc)
        return NewKey(remote_id=str(made.id), value=made.value)

    def _default_keys_remove(self, user_id: int, *, keep: int) -> None:
        """Deletes the "default" key CCH may have made with the user (switched off first: a
        switched-off key can always be deleted)."""
        for found in self.client.list_keys(user_id):
            self._names[found.id] = found.name
            if found.name != "default" or found.id == keep:
                continue
            if found.is_enabled:
                self.client.update_key(found.id, name=found.name, enabled=False)
            self.client.delete_key(found.id)

    def key_revoke(self, *, key: ApiKey) -> None:
        key_id = int(key.remote_id)
        try:
            self.client.delete_key(key_id)
        except LastKey:
            # The person's last enabled key: switched off (PATCH allows it), then deleted.
            self.client.update_key(key_id, name=self._name(key), enabled=False)
            self.client.delete_key(key_id)

    def key_set_active(self, *, key: ApiKey, active: bool) -> None:
        # PATCH, not `:enable`: the enable route refuses to switch off the last enabled key.
        self.client.update_key(int(key.remote_id), name=self._name(key), enabled=active)

    def key_limits_push(self, *, key: ApiKey, limits: RelayLimits) -> None:
        self.client.update_key(int(key.remote_id), name=self._name(key),
                               limits=self._limits(limits), expires_at=limits.expires_at)

    # --- usage and health -------------------------------------------------------------------

    def usage_read(self, *, keys: list[ApiKey], cursor: dict[str, Any]) -> UsageRead:
        read = UsageRead()
        was = cursor.get("keys") if isinstance(cursor.get("keys"), dict) else {}
        now = datetime.now(timezone.utc)
        kept: dict[str, Any] = {}
        for key in keys:
            if not key.remote_id:
                continue
            state = was.get(key.remote_id) or {}
            since = _moment(state.get("from"))
            seen = {int(i) for i in state.get("ids", []) if str(i).isdigit()}
            rows = self.client.usage_logs(int(key.remote_id), since=since)
            given_up = 0
            waiting: list[LogRow] = []
            for row in rows:
                if row.id in seen:
                    continue
                if not row.finished:
                    if now - row.created_at > STALE_AFTER:
                        given_up += 1
                    else:
                        waiting.append(row)
                    continue
                read.records.append(_record(key.remote_id, row))
                seen.add(row.id)
            if given_up:
                read.notes.append(_(
                    "%(name)s: %(n)d requests of key %(key)s have not finished after %(hours)d "
                    "hours; they are left out.") % {
                    "name": self.upstream.name, "n": given_up, "key": key.masked,
                    "hours": STALE_AFTER.total_seconds() // 3600})
            kept[key.remote_id] = _next_state(rows, seen, waiting, since)
        # Keys no longer read (revoked long ago) drop out of the cursor.
        read.cursor = {"keys": kept}
        return read

    def health(self) -> Health:
        try:
            self.client.admin_check()  # a user's key would pass the read routes
            zone = self.zone(fresh=True)
        except UpstreamError as exc:
            return Health(False, str(exc))
        if zone == settings.TIME_ZONE:
            detail = _("Answers with the admin token; its days and months are in %(zone)s, "
                       "as the portal's.") % {"zone": zone}
        else:
            detail = _("Answers with the admin token; its days and months are in %(zone)s, the "
                       "portal's in %(portal)s: days are aligned by each limit's reset time, "
                       "months start at its own midnight.") % {
                "zone": zone, "portal": settings.TIME_ZONE}
        return Health(True, detail)


def _record(remote_id: str, row: LogRow) -> RelayUsage:
    # CCH's buckets are disjoint already: inputTokens is uncached input (see pool.upstreams.cch).
    return RelayUsage(
        key=remote_id, record_id=str(row.id), model=row.model, at=row.created_at,
        uncached=row.input_tokens, cache_read=row.cache_read_tokens,
        cache_write=row.cache_creation_tokens, output=row.output_tokens,
        failed=(row.status_code or 0) >= 400, relay_cost=row.cost,
    )


def _next_state(rows: list[LogRow], seen: set[int], waiting: list[LogRow],
                since: datetime | None) -> dict[str, Any]:
    """Where the key's next read starts, and the ids already counted from there on."""
    if not rows:
        start = since
    else:
        start = max(r.created_at for r in rows) - SETTLE
        if waiting:
            start = min(start, min(r.created_at for r in waiting))
        if since is not None:
            start = max(start, since)
    if start is None:
        return {"from": None, "ids": []}
    # CCH's startTime is in whole milliseconds: the rows it answers from this start are the
    # ones at or after its millisecond, which the ids must cover.
    start = start.replace(microsecond=start.microsecond // 1000 * 1000)
    ids = sorted(r.id for r in rows if r.id in seen and r.created_at >= start)
    return {"from": start.isoformat(), "ids": ids}


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
