"""Writes on keys and on the proxy's key list.

The proxy's list (`/api-keys`) is shared with the operator, so every write here follows three
rules: keys the portal does not own are never removed or rewritten, the list is never left
empty (an empty list opens the proxy), and portal processes write one at a time (the proxy's
handlers are not safe for concurrent writes) under the `proxy-keys` lease.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from accounts.models import LimitDefaults, SignInLink, User
from accounts.services import signin_link_redeem
from keyportal.audit import Action, audit_record
from keyportal.locks import LeaseHeld, lease
from keyportal.notify import person_email, staff_alert
from pool.escrow import EscrowUnreadable, escrow_open, escrow_seal
from pool.models import ON_CLIPROXYAPI, ApiKey, Upstream, key_digest
from pool.upstream import ProxyClient, UpstreamError
from pool.upstreams.base import Health
from pool.upstreams.registry import (
    cliproxyapi_endpoint, cliproxyapi_in_use, open_to, open_to_everyone, relays,
)
from pool.upstreams.relays import relay_key_issue, relays_reconcile

log = logging.getLogger(__name__)

PROXY_WRITE_LEASE = "proxy-keys"
PROXY_WRITE_WAIT_SECONDS = 30
CREATE_BATCH = 250
UPDATE_CHUNK = 500  # stays under SQLite's bound-parameter limit whatever its version

Progress = Callable[[int, int], None]
State = ApiKey.ProxyState
Status = ApiKey.Status


class ProxyBusy(UpstreamError):
    """Another portal process kept the proxy's key list busy for too long."""


class KeysNotPushed(UpstreamError):
    """Keys were created in the portal but the proxy did not take them (yet)."""


class ImplausibleKeyList(UpstreamError):
    """The proxy's list is empty, or lacks most of the keys the portal put there: a reset or
    broken proxy, not drift. Reconcile changes nothing unless forced."""

    def __init__(self, *, expected: int, listed: int, total: int) -> None:
        self.expected, self.listed, self.total = expected, listed, total
        super().__init__(
            _("The proxy lists only %(listed)d of the %(expected)d keys the portal put there "
              "(%(total)d keys in its whole list), so reconcile changed nothing: run "
              "reconcile_keys --force if the proxy was really reset.")
            % {"listed": listed, "expected": expected, "total": total}
        )


def key_value_new() -> str:
    """A new key: the configured prefix and 256 bits from the OS's CSPRNG."""
    return settings.PORTAL_KEY_PREFIX + secrets.token_urlsafe(32)


def pool_keys_create(*, count: int, progress: Progress | None = None) -> list[ApiKey]:
    """Creates `count` unissued keys, not yet at the proxy. Batches keep memory flat and let
    long runs show progress."""
    created: list[ApiKey] = []
    prefix = settings.PORTAL_KEY_PREFIX
    while len(created) < count:
        batch = []
        for _i in range(min(CREATE_BATCH, count - len(created))):
            value = key_value_new()
            batch.append(
                ApiKey(value=value, key_hash=key_digest(value), prefix=prefix, last4=value[-4:])
            )
        with transaction.atomic():
            created.extend(ApiKey.objects.bulk_create(batch))
        if progress:
            progress(len(created), count)
    return created


@contextmanager
def _proxy_write_lease(*, wait: float | None = None) -> Iterator[None]:
    wait = PROXY_WRITE_WAIT_SECONDS if wait is None else wait
    try:
        with lease(PROXY_WRITE_LEASE, wait=wait):
            yield
    except LeaseHeld:
        if wait <= 0:
            raise ProxyBusy(
                _("Another portal process is writing the proxy's key list right now; the next "
                  "sync or reconcile_keys run brings the proxy in line.")
            ) from None
        raise ProxyBusy(
            _("Another portal process has been writing the proxy's key list for over %(s)d s; "
              "try again shortly.") % {"s": wait}
        ) from None


def _set_proxy_state(ids: Iterable[int], state: str, **only: Any) -> int:
    """Moves the given keys to `state`, skipping those already there; `only` narrows further
    (a key revoked meanwhile must not be marked as wanted, and the other way round)."""
    ids = list(ids)
    changed = 0
    for start in range(0, len(ids), UPDATE_CHUNK):
        changed += (
            ApiKey.objects.filter(id__in=ids[start : start + UPDATE_CHUNK], **only)
            .exclude(proxy_state=state)
            .update(proxy_state=state)
        )
    return changed


KEY_ROWS_LOCK = 0x4B505F4B455953  # "KP_KEYS": the advisory lock of multi-row key writes


def keys_lock() -> None:
    """Inside a transaction, before it updates several key rows: waits for any other such
    transaction to end. A sync's "last used" update and a revoke's reconcile both update many
    key rows, in no fixed order; on PostgreSQL two of them could each hold rows the other
    waits for ("deadlock detected", seen as 500s on revoke). Holding this lock first makes
    them take turns. It is a transaction-level advisory lock: released at commit or rollback,
    one statement, no row written. Single-row writes (issue, revoke) need nothing: holding
    one row they cannot close a circle. SQLite locks the whole database per write
    transaction and needs nothing either."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [KEY_ROWS_LOCK])


# --- generate -------------------------------------------------------------------------------


@dataclass
class GenerateReport:
    created: int
    proxy_before: int
    proxy_after: int

    def lines(self) -> list[str]:
        return [
            _("Created %(n)d pool keys and pushed them to the proxy in one write.")
            % {"n": self.created},
            _("The proxy's list went from %(a)d to %(b)d keys; no other key was touched.")
            % {"a": self.proxy_before, "b": self.proxy_after},
        ]


def pool_generate(
    *,
    count: int,
    client: ProxyClient,
    progress: Progress | None = None,
    by: Any = None,
    ip: str | None = None,
) -> GenerateReport:
    """Creates `count` pool keys and appends them to the proxy's list with a single PUT.
    `by` is the staff member who asked (None: a command)."""
    if count < 1:
        raise ValueError(_("The number of keys must be at least 1."))
    # Ask first: an unreachable or refusing proxy stops us before any key exists.
    client.list_keys()
    keys = pool_keys_create(count=count, progress=progress)
    try:
        with _proxy_write_lease():
            before = client.list_keys()
            present = set(before)
            after = before + [k.value for k in keys if k.value not in present]
            client.replace_keys(after)
    except UpstreamError as exc:
        # The keys stay in the pool, unpushed and never handed out; the PUT may even have
        # landed with its answer lost, and reconcile tells which by reading the list.
        audit_record(action=Action.POOL_GENERATED, actor=by, ip=ip,
                     after={"created": len(keys), "pushed": False}, detail=str(exc))
        raise KeysNotPushed(
            _("%(n)d keys were created but not pushed: %(why)s Run reconcile_keys once the "
              "proxy answers.") % {"n": len(keys), "why": exc}
        ) from None
    with transaction.atomic():
        keys_lock()
        _set_proxy_state((k.id for k in keys), State.PUSHED, status=Status.POOL)
        audit_record(action=Action.POOL_GENERATED, actor=by, ip=ip,
                     before={"proxy_keys": len(before)},
                     after={"created": len(keys), "pushed": True, "proxy_keys": len(after)})
    return GenerateReport(created=len(keys), proxy_before=len(before), proxy_after=len(after))


# --- reconcile ------------------------------------------------------------------------------


class _PortalKey(NamedTuple):
    key_hash: str
    id: int
    status: str
    proxy_state: str
    value: str | None
    escrow: str | None


@dataclass
class ReconcileReport:
    dry_run: bool = False
    proxy_before: int = 0
    proxy_after: int = 0
    foreign: int = 0
    foreign_with_prefix: int = 0
    pushed: int = 0
    restored: int = 0
    removed: int = 0
    duplicates: int = 0
    missing: int = 0
    refilled: int = 0
    states_fixed: int = 0
    unreadable: int = 0
    pool_unused: int = 0
    lifecycle: LifecycleReport | None = None
    forced_past: ImplausibleKeyList | None = None  # the refusal --force went past

    @property
    def changed(self) -> bool:
        return any(
            (self.pushed, self.restored, self.removed, self.duplicates, self.missing,
             self.refilled, self.states_fixed, self.unreadable,
             self.lifecycle and self.lifecycle.lines())
        )

    def lines(self) -> list[str]:
        would = self.dry_run
        lines = [
            (_("Dry run: nothing was changed.") if would else None),
            *(self.lifecycle.lines() if self.lifecycle else []),
            (_("Forced: the proxy listed only %(listed)d of the %(expected)d keys the portal "
               "put there, and its list was taken as it is.")
             % {"listed": self.forced_past.listed, "expected": self.forced_past.expected}
             if self.forced_past else None),
            _("The proxy lists %(n)d keys; %(f)d of them are not the portal's and stay "
              "untouched.") % {"n": self.proxy_before, "f": self.foreign},
        ]
        if self.foreign_with_prefix:
            lines.append(
                _("%(n)d keys at the proxy carry the portal's prefix but are unknown to this "
                  "portal; they were left alone.") % {"n": self.foreign_with_prefix}
            )
        counts = [
            (self.pushed, _("pool keys added to the proxy")),
            (self.restored, _("suspended or expired keys back at the proxy")),
            (self.removed, _("revoked, suspended or expired keys removed from the proxy")),
            (self.duplicates, _("duplicate copies of portal keys removed")),
            (self.refilled, _("new pool keys created to refill the pool")),
            (self.missing, _("issued keys found missing at the proxy (they cannot be pushed "
                             "again: their owners must replace them)")),
            (self.states_fixed, _("key states brought in line with the proxy")),
            (self.unreadable, _("unissued pool keys retired because their sealed value cannot "
                                "be read (PORTAL_ESCROW_KEY or SECRET_KEY changed)")),
        ]
        for n, what in counts:
            if n:
                lines.append((_("Would change: %(n)d %(what)s.") if would else
                              _("%(n)d %(what)s.")) % {"n": n, "what": what})
        lines.append(
            _("Pool: %(n)d unused keys (refill below %(min)d).")
            % {"n": self.pool_unused, "min": settings.PORTAL_POOL_MIN}
        )
        if not self.changed:
            lines.append(_("No change."))
        elif not would:
            lines.append(
                _("The proxy's list now holds %(n)d keys.") % {"n": self.proxy_after}
            )
        return [line for line in lines if line]


def keys_reconcile(
    *,
    client: ProxyClient,
    dry_run: bool = False,
    force: bool = False,
    lease_wait: float | None = None,
    by: Any = None,
    ip: str | None = None,
) -> ReconcileReport:
    """Makes the proxy's list match the portal: pool and active keys present; revoked,
    suspended and expired keys absent; foreign keys untouched; never an empty list. Refills
    the pool below PORTAL_POOL_MIN. Running it twice in a row changes nothing the second time.

    A list that lacks all or most of the keys the portal put there is refused (nothing is
    written, staff are alerted, ImplausibleKeyList is raised) unless `force`. `lease_wait`:
    seconds to wait for another process's write to the list (0 on a page: try once).
    """
    report = ReconcileReport(dry_run=dry_run)
    # A dry run writes nothing, so it neither waits for nor blocks a real one (the staff
    # status page runs it on every view).
    with nullcontext() if dry_run else _proxy_write_lease(wait=lease_wait):
        if not dry_run:
            # First, and whether or not the proxy answers: an expired key stops counting as
            # live in the portal at once, and leaves the proxy as soon as it can be reached.
            report.lifecycle = keys_lifecycle(now=timezone.now())
        current = client.list_keys()
        portal = {
            row[0]: _PortalKey(*row)
            for row in ApiKey.objects.filter(ON_CLIPROXYAPI).values_list(
                "key_hash", "id", "status", "proxy_state", "value", "escrow"
            )
        }
        after: list[str] = []
        seen: set[int] = set()
        present_wanted: list[int] = []
        removed: list[int] = []
        to_escrow: list[tuple[int, str]] = []
        stale_escrow: list[int] = []
        # Pool keys whose sealed value no longer opens (the secret changed) but which the
        # proxy still lists: the proxy's copy is sealed again under the current secret.
        to_reseal: list[tuple[int, str]] = []
        for entry in current:
            key = portal.get(key_digest(entry))
            if key is None:
                after.append(entry)
                report.foreign += 1
                report.foreign_with_prefix += entry.startswith(settings.PORTAL_KEY_PREFIX)
            elif key.id in seen:
                report.duplicates += 1
            elif key.status in ApiKey.WANTED_AT_PROXY:
                seen.add(key.id)
                after.append(entry)
                present_wanted.append(key.id)
                if key.status == Status.POOL and not key.value:
                    to_reseal.append((key.id, entry))
                if key.escrow:
                    stale_escrow.append(key.id)
            else:
                seen.add(key.id)
                removed.append(key.id)
                if key.status in ApiKey.RETURNABLE and not key.escrow:
                    to_escrow.append((key.id, entry))
        implausible = _implausible(portal.values(), seen=seen, total=len(current))
        if implausible and not force:
            if not dry_run:  # the staff page's dry run shows the refusal to whoever looks
                implausible_list_notify(error=implausible)
            raise implausible
        report.forced_past = implausible
        report.removed = len(removed)

        absent = [k for k in portal.values() if k.id not in seen]
        # An unissued key that is not at the proxy and whose value cannot be read can never
        # be pushed or handed out: it is retired, and the pool refilled in its place.
        unreadable = [k.id for k in absent if k.status == Status.POOL and not k.value]
        report.unreadable = len(unreadable)
        to_push = [k for k in absent if k.status == Status.POOL and k.value]
        after.extend(k.value for k in to_push)
        report.pushed = len(to_push)
        returning = _escrowed_values(k for k in absent if k.status == Status.ACTIVE and k.escrow)
        after.extend(returning.values())
        report.restored = len(returning)
        lost = [
            k.id for k in absent
            if k.status == Status.ACTIVE and k.id not in returning and k.proxy_state != State.MISSING
        ]
        report.missing = len(lost)
        gone = [k.id for k in absent if k.status not in ApiKey.WANTED_AT_PROXY]

        unused = sum(1 for k in portal.values() if k.status == Status.POOL) - len(unreadable)
        need = settings.PORTAL_POOL_TARGET - unused if unused < settings.PORTAL_POOL_MIN else 0
        if not after and not need:
            need = 1  # one unissued key keeps the list closed
        report.refilled = need
        report.pool_unused = unused + need
        report.proxy_before = len(current)
        report.proxy_after = len(after) + need
        # Keys already where they belong at the proxy but filed under another state (a PUT
        # whose answer was lost, a key removed by hand) are put right without a proxy write.
        wanted_here = set(present_wanted)
        gone_here = set(gone)
        report.states_fixed = sum(
            1
            for k in portal.values()
            if (k.id in wanted_here and k.proxy_state != State.PUSHED)
            or (k.id in gone_here and k.proxy_state != State.REMOVED)
        )
        if dry_run:
            return report

        new_keys = pool_keys_create(count=need) if need else []
        after.extend(k.value for k in new_keys)
        # A suspended or expired key leaves the proxy only once its value is safely kept,
        # so that it can come back; the escrow is written before the list is.
        with transaction.atomic():
            keys_lock()
            for key_id, value in to_reseal:
                ApiKey.objects.filter(id=key_id, status=Status.POOL).update(value=value)
            if unreadable:
                ApiKey.objects.filter(id__in=unreadable, status=Status.POOL).update(
                    status=Status.REVOKED, value=None, revoked_at=timezone.now(),
                    proxy_state=State.REMOVED,
                )
            for key_id, value in to_escrow:
                ApiKey.objects.filter(id=key_id, status__in=ApiKey.RETURNABLE).update(
                    escrow=escrow_seal(value)
                )
        if after != current:
            client.replace_keys(after)

    # The list is settled; record where each key now stands. Conditions on status keep a
    # key revoked (or issued) during the run from being filed under the wrong state.
    pushed_ids = present_wanted + [k.id for k in to_push] + [k.id for k in new_keys]
    pushed_ids += list(returning)
    with transaction.atomic():
        keys_lock()
        _set_proxy_state(pushed_ids, State.PUSHED, status__in=ApiKey.WANTED_AT_PROXY)
        # Back at the proxy: the encrypted copy has done its job.
        ApiKey.objects.filter(
            id__in=[*returning, *stale_escrow],
            status=Status.ACTIVE,
        ).update(escrow=None)
        _set_proxy_state(removed + gone, State.REMOVED, status__in=_UNWANTED)
        _set_proxy_state(lost, State.MISSING, status=Status.ACTIVE)
        if report.changed:  # a run that changed nothing leaves no trail
            audit_record(
                action=Action.RECONCILE_RUN, actor=by, ip=ip,
                before={"proxy_keys": report.proxy_before},
                after={"proxy_keys": report.proxy_after, "pushed": report.pushed,
                       "removed": report.removed, "duplicates": report.duplicates,
                       "missing": report.missing, "refilled": report.refilled,
                       "states_fixed": report.states_fixed, "unreadable": report.unreadable,
                       **({"forced": True} if report.forced_past else {})},
            )
    return report


RECONCILE_LOSS_FLOOR = 3  # fewer missing keys than this is drift, whatever the share
IMPLAUSIBLE_MAIL_EVERY = timedelta(minutes=30)
# Set in the shared cache while a refusal's alert is recent (the admin dashboard shows it).
IMPLAUSIBLE_NOTIFIED = "pool:implausible-list-notified"


def _implausible(
    portal: Iterable[_PortalKey], *, seen: set[int], total: int
) -> ImplausibleKeyList | None:
    """The refusal, when the proxy's list is empty (or null) although the portal believes
    some of its keys are there, or lacks more than PORTAL_RECONCILE_MAX_LOSS of those keys and
    at least RECONCILE_LOSS_FLOOR of them. A fresh install (no key pushed yet) believes
    nothing is there, and any list is plausible; losing a key or two is drift."""
    believed = [
        k.id for k in portal
        if k.proxy_state == State.PUSHED and k.status in ApiKey.WANTED_AT_PROXY
    ]
    listed = sum(1 for key_id in believed if key_id in seen)
    lost = len(believed) - listed
    if not believed or (total and (
        lost < RECONCILE_LOSS_FLOOR or lost <= settings.PORTAL_RECONCILE_MAX_LOSS * len(believed)
    )):
        return None
    return ImplausibleKeyList(expected=len(believed), listed=listed, total=total)


def implausible_list_notify(*, error: ImplausibleKeyList) -> bool:
    """Emails staff (and posts to the webhook) that reconcile refused the proxy's list, at
    most once per half hour across portal processes. True when an alert went out."""
    if not cache.add(IMPLAUSIBLE_NOTIFIED, True,
                     IMPLAUSIBLE_MAIL_EVERY.total_seconds()):
        return False
    return staff_alert(
        event="implausible_key_list",
        subject=_("Key Portal: the proxy's key list looks reset; nothing was changed"),
        body=_("%(why)s\n\nUntil the proxy lists the portal's keys again, the portal leaves its "
               "list alone: keys revoked or suspended meanwhile stay pending, and no issued key "
               "is marked missing. If the proxy's config.yaml was replaced by mistake, restore "
               "it. If the proxy really was reset, `manage.py reconcile_keys --force` pushes "
               "the pool keys (and keys back from a suspension) again and marks the issued keys "
               "it lost missing; their owners must add new keys.") % {"why": error},
        data={"expected": error.expected, "listed": error.listed, "total": error.total},
    )


_UNWANTED = [s for s in Status.values if s not in ApiKey.WANTED_AT_PROXY]


def _escrowed_values(keys: Iterable[_PortalKey]) -> dict[int, str]:
    """The values of restored keys, from their escrow; a key whose escrow cannot be read
    (the escrow key changed) or does not match its hash is left out, and counts as missing."""
    values = {}
    for key in keys:
        try:
            value = escrow_open(key.escrow or "")
        except EscrowUnreadable:
            log.warning("Escrow of key %s cannot be read; it is reported missing.", key.id)
            continue
        if key_digest(value) == key.key_hash:
            values[key.id] = value
    return values


# --- issue and revoke -----------------------------------------------------------------------
# Appended for self-service (issue 3). Issuing never calls the proxy: a pool key is already
# at the proxy (proxy_state=pushed), so it works the moment it changes hands.

ASSIGN_ATTEMPTS = 10
POOL_EMPTY_MAIL_EVERY = timedelta(minutes=30)


class PoolEmpty(Exception):
    """No unissued key is at the proxy right now."""


class RelayUnavailable(Exception):
    """A relay that makes its own keys (claude-relay-service, Claude Code Hub) did not make
    one now: down, refusing the portal's credentials, or answering garbage. Nothing was filed
    (a registration link stays unused); the message is the sentence to show the person, and
    holds no address or secret of the relay (the log has the details)."""


class KeyRefused(Exception):
    """The person may not get a working key now: their account is deactivated, or they (or
    one of their keys) reached a limit. The message is the sentence to show them; `reason`
    is an ApiKey.SuspendedFor value and `until` when the refusal ends (None: not on its own)."""

    def __init__(self, message: str, *, reason: str, until: datetime | None = None) -> None:
        super().__init__(message)
        self.reason, self.until = reason, until


# Checks run before a key is handed out. Limits are measured on usage, which lives above
# pool (usage -> pool -> accounts), so usage registers its check here when it loads
# (usage.apps.UsageConfig.ready) instead of pool importing it. Checking inside key_assign,
# the one service that issues keys, closes every way in at once: /my-keys, the API and the
# registration link.
IssueGuard = Callable[[User], "KeyRefused | None"]
_issue_guards: list[IssueGuard] = []


def key_issue_guard_register(guard: IssueGuard) -> None:
    """Adds a check that key_assign runs first; registering the same one twice adds it once."""
    if guard not in _issue_guards:
        _issue_guards.append(guard)


def key_issue_refusal(*, user: User) -> KeyRefused | None:
    """Why `user` may not get a key now, or None. A deactivated account first, then the
    registered checks (usage: limits reached)."""
    if not user.is_active:
        return KeyRefused(
            _("This account is deactivated: no key can be issued until staff reactivate it."),
            reason=ApiKey.SuspendedFor.PERSON_INACTIVE,
        )
    for guard in _issue_guards:
        refusal = guard(user)
        if refusal is not None:
            return refusal
    return None


@dataclass(frozen=True)
class IssuedKey:
    """A key just handed out, with the only copy of its full value the portal will ever
    give: show it once, store it nowhere."""

    key: ApiKey
    value: str


def key_assign(
    *, user: User, label: str, by: User | None = None, ip: str | None = None,
    upstream: Upstream | None = None,
) -> IssuedKey:
    """Hands `user` an unissued pool key. Raises PoolEmpty when none is ready. At a relay
    that makes its own keys (`upstream`, or the person's default), the key is made there
    instead; RelayUnavailable when it does not answer.

    On PostgreSQL, SKIP LOCKED lets concurrent callers pick different rows without waiting
    on each other; on every database the conditional UPDATE (still unowned, still in the
    pool) is what guarantees that no key goes to two people: a caller whose row was taken
    meanwhile sees a row count of 0 and tries the next one.

    Raises KeyRefused, before any key changes hands, when the person may not get one (see
    key_issue_refusal): a key given to someone over a limit would work at the proxy until
    the next sync suspended it."""
    refusal = key_issue_refusal(user=user)
    if refusal is not None:
        raise refusal
    if upstream is None:
        upstream = upstream_default(user)
        if upstream is None and not cliproxyapi_in_use():
            # A portal on relays only, none open to this person: there is no pool to fall
            # back on (and an "empty pool" alert to staff would be wrong).
            raise UpstreamClosed(_("No upstream is open to you, so the portal cannot make you "
                                   "a key; ask staff to open one to you."))
    if upstream is not None and not upstream.is_cliproxyapi:
        # A relay that makes its own keys: made there now, working at once (UpstreamError
        # when it does not answer; nothing is filed then).
        try:
            made = relay_key_issue(upstream=upstream, user=user, label=label, by=by, ip=ip,
                                   expires=_default_expiry(timezone.now()))
        except UpstreamError as exc:
            log.warning("No key made at %s for person %s: %s", upstream.name, user.pk, exc)
            raise RelayUnavailable(_(
                "%(name)s could not make a key just now; nothing was changed. Please try "
                "again in a few minutes."
            ) % {"name": upstream.name}) from exc
        return IssuedKey(key=made.key, value=made.value)
    try:
        return _key_assign(user=user, label=label, by=by, ip=ip)
    except _PoolUnreadable:
        # Sealed under a secret the portal no longer has (pool.fields): such keys are
        # useless to anyone, so all of them leave the pool at once, in a transaction of
        # their own (reconcile then takes them off the proxy and refills the pool).
        _pool_unreadable_retire(timezone.now())
    return _key_assign(user=user, label=label, by=by, ip=ip)


class UpstreamClosed(Exception):
    """The person may not add a key at that upstream (closed to them, or disabled)."""


def upstream_default(user: User) -> Upstream | None:
    """Where a key goes when the person does not pick: the first upstream open to them; None
    for the CLIProxyAPI pool (also when no upstream is declared at all, as before upstreams
    existed)."""
    found = open_to(user)
    if not found:
        return None
    return found[0]


def upstream_pick(*, user: User, upstream_id: Any) -> Upstream | None:
    """The upstream a person picked by id, if it is open to them. Raises UpstreamClosed."""
    for each in open_to(user):
        if str(each.pk) == str(upstream_id):
            return each
    raise UpstreamClosed(_("That upstream is not open to you."))


class _PoolUnreadable(Exception):
    pass


def _key_assign(*, user: User, label: str, by: User | None, ip: str | None) -> IssuedKey:
    now = timezone.now()
    with transaction.atomic():
        for _attempt in range(ASSIGN_ATTEMPTS):
            ready = ApiKey.objects.filter(
                status=Status.POOL, proxy_state=State.PUSHED, owner__isnull=True
            ).order_by("id")
            if connection.features.has_select_for_update_skip_locked:
                ready = ready.select_for_update(skip_locked=True)
            candidate = ready.values_list("id", "value").first()
            if candidate is None:
                raise PoolEmpty
            key_id, value = candidate
            if not value:
                raise _PoolUnreadable
            taken = ApiKey.objects.filter(
                id=key_id, status=Status.POOL, owner__isnull=True
            ).update(
                owner=user, label=label, status=Status.ACTIVE, issued_at=now,
                value=None, expires_at=_default_expiry(now),
            )
            if taken == 1:
                key = ApiKey.objects.get(id=key_id)
                audit_record(action=Action.KEY_ISSUED, actor=by or user, target=key, ip=ip,
                             after={"owner": user.email, "label": label})
                return IssuedKey(key=key, value=value)
    raise PoolEmpty


def _pool_unreadable_retire(now: datetime) -> int:
    unreadable = [
        key_id for key_id, value in
        ApiKey.objects.filter(status=Status.POOL).values_list("id", "value").iterator()
        if not value
    ]
    log.warning("%d unissued keys cannot be read (the secret changed); retiring them.",
                len(unreadable))
    with transaction.atomic():
        return ApiKey.objects.filter(id__in=unreadable, status=Status.POOL).update(
            status=Status.REVOKED, value=None, revoked_at=now,
        )


def _default_expiry(now: datetime) -> datetime | None:
    days = LimitDefaults.objects.filter(id=1).values_list("key_valid_days", flat=True).first()
    return now + timedelta(days=days) if days else None


def registration_complete(*, token: str, ip: str | None = None,
                          upstream_id: Any = None) -> tuple[User, IssuedKey]:
    """Uses a registration link and issues its key, all or nothing: with the pool empty (or
    the picked relay not answering, UpstreamError) the link stays unused (it works again
    later) and no person is created. `upstream_id`: the upstream the person picked on the
    link's page when several are open to them (UpstreamClosed when it is not one of them)."""
    with transaction.atomic():
        user, link = signin_link_redeem(token=token, purpose=SignInLink.Purpose.REGISTER, ip=ip)
        upstream = upstream_pick(user=user, upstream_id=upstream_id) if upstream_id else None
        issued = key_assign(user=user, label=link.label, ip=ip, upstream=upstream)
    return user, issued


def upstreams_open_to_email(email: str) -> list[Upstream]:
    """The upstreams a registration link's person may pick from: theirs when they exist
    already, else those open to everyone."""
    person = User.objects.filter(email=email).first()
    if person is not None:
        return open_to(person)
    return [u for u in open_to_everyone()]


def pool_empty_notify() -> bool:
    """Emails staff that someone found the pool empty, at most once per half hour (every
    portal process shares the cache that says so). True when an email went out."""
    if not cache.add("pool:empty-notified", True, POOL_EMPTY_MAIL_EVERY.total_seconds()):
        return False
    return staff_alert(
        event="pool_empty",
        subject=_("Key Portal: the key pool is empty"),
        body=_("Someone just asked for an API key and none was ready. Run `manage.py "
               "reconcile_keys` (it refills the pool when the proxy answers) or `manage.py "
               "generate_keys --count N`, and check that the proxy is reachable."),
    )


def key_revoke(*, key: ApiKey, by: User, ip: str | None = None) -> bool:
    """Revokes an issued key in the portal at once: it is marked for removal at the proxy,
    and never goes back to the pool. False when it was not live (already revoked)."""
    with transaction.atomic():
        before = ApiKey.objects.filter(id=key.id).values_list("status", flat=True).first()
        changed = ApiKey.objects.filter(
            id=key.id, status__in=[Status.ACTIVE, Status.SUSPENDED, Status.EXPIRED]
        ).update(
            status=Status.REVOKED, revoked_at=timezone.now(), proxy_state=State.REMOVAL_PENDING,
            escrow=None,
        )
        if changed:
            audit_record(action=Action.KEY_REVOKED, actor=by, target=key, ip=ip,
                         before={"status": before}, after={"status": Status.REVOKED})
    key.refresh_from_db()
    if changed:
        log.info("Key %s (id %s) revoked by %s.", key.masked, key.id, by.pk)
    return bool(changed)


def key_rename(*, key: ApiKey, label: str, by: User, ip: str | None = None) -> bool:
    """Gives a key a new label (a clean one: see pool.forms.label_clean). False, and no audit
    row, when the label is the one it has."""
    with transaction.atomic():
        before = ApiKey.objects.select_for_update().filter(id=key.id).values_list(
            "label", flat=True
        ).first()
        if before is None or before == label:
            key.refresh_from_db()
            return False
        ApiKey.objects.filter(id=key.id).update(label=label)
        audit_record(action=Action.KEY_RENAMED, actor=by, target=key, ip=ip,
                     before={"label": before}, after={"label": label})
    key.refresh_from_db()
    return True


def keys_reconcile_quietly(
    *, budget: float | None = None, lease_wait: float | None = None
) -> ReconcileReport | None:
    """Reconciles now if the proxy answers; otherwise (unreachable, refused, busy, an
    implausible list) the change stays pending and the next sync or `reconcile_keys` run
    does it. Called after a change has been committed. `budget`: seconds the proxy may take
    in all; `lease_wait`: seconds to wait for another process writing the list."""
    relays_reconcile_quietly()
    if not cliproxyapi_endpoint().management_url and relays():
        return None  # a portal on other relays only: no CLIProxyAPI to follow
    try:
        with ProxyClient.from_settings(budget=budget) as client:
            return keys_reconcile(client=client, lease_wait=lease_wait)
    except UpstreamError as exc:
        log.warning("Reconcile postponed: %s", exc)
        return None


def relays_reconcile_quietly() -> None:
    """The relays that make their own keys follow the portal now if they answer; what they
    do not take waits for the next sync or `reconcile_keys` (it is committed in the portal)."""
    try:
        for report in relays_reconcile():
            for line in report.errors:
                log.warning("Reconcile at %s postponed: %s", report.upstream, line)
    except UpstreamError as exc:
        log.warning("Reconcile postponed: %s", exc)


def keys_reconcile_in_request() -> ReconcileReport | None:
    """keys_reconcile_quietly as a page or an API call may run it: it never waits for another
    portal process's write, and gives the proxy PORTAL_REQUEST_PROXY_BUDGET seconds in all,
    so that a stalled proxy cannot tie up the web workers."""
    return keys_reconcile_quietly(budget=settings.PORTAL_REQUEST_PROXY_BUDGET, lease_wait=0)


# --- time-driven changes: expiry, and keys coming back -------------------------------------


@dataclass
class LifecycleReport:
    expired: int = 0
    unexpired: int = 0
    restored: int = 0
    warned: int = 0
    owner_inactive: int = 0  # active keys suspended: their owner was deactivated
    owner_active: int = 0  # keys back: their owner is active again
    held: int = 0  # limit windows that reset while the owner is deactivated

    def lines(self) -> list[str]:
        counts = [
            (self.owner_inactive, _("keys suspended (their owner's account is deactivated)")),
            (self.owner_active, _("keys active again (their owner's account is active again)")),
            (self.expired, _("keys expired")),
            (self.unexpired, _("expired keys active again (their expiry was extended)")),
            (self.restored, _("suspended keys active again (their limit's window reset)")),
            (self.held, _("suspended keys kept off the proxy after their limit's window reset "
                          "(their owner's account is deactivated)")),
            (self.warned, _("owners told that a key expires soon")),
        ]
        return [_("%(n)d %(what)s.") % {"n": n, "what": what} for n, what in counts if n]


def _move_key(
    key: ApiKey, *, frm: str, action: str, detail: str = "", actor: User | None = None,
    ip: str | None = None, where: dict[str, Any] | None = None, **changes: Any,
) -> bool:
    """One key from status `frm` to new values, if nobody moved it meanwhile (and it still
    matches `where`, e.g. its owner's state); one audit row when it moved."""
    with transaction.atomic():
        moved = ApiKey.objects.filter(id=key.id, status=frm, **(where or {})).update(**changes)
        if moved:
            audit_record(action=action, actor=actor, target=key, ip=ip, before={"status": frm},
                         after={"status": changes.get("status", frm)}, detail=detail)
    return bool(moved)


def keys_lifecycle(*, now: datetime) -> LifecycleReport:
    """Applies what the clock decides: active keys past their expiry become expired (and
    leave the proxy at the reconcile that follows); expired keys whose expiry staff moved
    into the future, and keys suspended by a limit whose window has reset, become active
    again (and return to the proxy from escrow). Owners of keys that expire within
    PORTAL_EXPIRY_WARNING_DAYS are told once.

    First of all, keys follow their owner's `is_active`, however it was changed (the admin,
    the shell, SQL): an active key of a deactivated person is suspended, and keys suspended
    for that come back once the person is active again. Nothing later in this pass brings
    back a key of a deactivated person: an extended expiry waits for the reactivation, and a
    limit whose window resets hands its key over to the deactivation."""
    report = LifecycleReport()
    people = _person_keys_follow(Q(), now=now)
    report.owner_inactive, report.owner_active = people.suspended, people.restored
    report.expired = people.expired
    for key in ApiKey.objects.filter(status=Status.ACTIVE, expires_at__lte=now):
        report.expired += _move_key(
            key, frm=Status.ACTIVE, action=Action.KEY_EXPIRED,
            status=Status.EXPIRED, proxy_state=State.REMOVAL_PENDING,
        )
    owner_active = {"owner__is_active": True}
    extended = ApiKey.objects.filter(status=Status.EXPIRED, **owner_active).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
    for key in extended:
        report.unexpired += _move_key(
            key, frm=Status.EXPIRED, action=Action.KEY_RESTORED, detail="expiry extended",
            where=owner_active, status=Status.ACTIVE,
        )
    window_reset = ApiKey.objects.filter(
        status=Status.SUSPENDED, suspended_until__lte=now
    ).exclude(suspended_for__in=[ApiKey.SuspendedFor.STAFF, ApiKey.SuspendedFor.PERSON_INACTIVE])
    for key in window_reset.filter(**owner_active):
        report.restored += _move_key(
            key, frm=Status.SUSPENDED, action=Action.KEY_RESTORED,
            detail=f"{key.suspended_for} window reset", where=owner_active,
            status=Status.ACTIVE, suspended_for="", suspended_until=None,
        )
    # The limit no longer holds the key, the deactivation does: it stays off the proxy,
    # says why, and comes back with the person (and no sync keeps reconciling for it).
    for key in window_reset.filter(owner__is_active=False):
        report.held += _move_key(
            key, frm=Status.SUSPENDED, action=Action.KEY_SUSPENDED,
            detail=f"{key.suspended_for} window reset; owner deactivated",
            where={"owner__is_active": False, "suspended_for": key.suspended_for},
            suspended_for=ApiKey.SuspendedFor.PERSON_INACTIVE, suspended_until=None,
        )
    report.warned = _expiry_warnings(now=now)
    return report


def _expiry_warnings(*, now: datetime) -> int:
    horizon = now + timedelta(days=settings.PORTAL_EXPIRY_WARNING_DAYS)
    due = ApiKey.objects.select_related("owner").filter(
        status=Status.ACTIVE, expires_at__gt=now, expires_at__lte=horizon,
        expiry_notified_at__isnull=True,
    )
    warned = 0
    for key in due:
        # Claim the warning first: two processes never both send it.
        if not ApiKey.objects.filter(id=key.id, expiry_notified_at__isnull=True).update(
            expiry_notified_at=now
        ):
            continue
        with translation.override(key.owner.email_language):  # cron: no request's language
            subject = _("Your Key Portal key %(key)s expires soon") % {"key": key.masked}
            body = _("Your key \"%(label)s\" (%(key)s) expires on %(when)s. After that it stops "
                     "working; add a new key on your keys page before then.") % {
                "label": key.label, "key": key.masked,
                "when": timezone.localtime(key.expires_at).strftime("%Y-%m-%d %H:%M %Z"),
            }
        person_email(to=key.owner.email, subject=subject, body=body)
        warned += 1
    return warned


# --- suspension ----------------------------------------------------------------------------


def key_suspend(
    *,
    key: ApiKey,
    reason: str,
    until: datetime | None = None,
    by: User | None = None,
    ip: str | None = None,
    detail: str = "",
) -> bool:
    """Suspends an active key: it leaves the proxy at the next reconcile (its value kept in
    escrow) and comes back at `until` on its own, or when staff resume it. False when the
    key was not active."""
    return _move_key(
        key, frm=Status.ACTIVE, action=Action.KEY_SUSPENDED, actor=by, ip=ip,
        detail=detail or reason,
        status=Status.SUSPENDED, suspended_for=reason, suspended_until=until,
        proxy_state=State.REMOVAL_PENDING,
    )


# The suspensions a limit decides (enforcement in usage/limits.py); staff and deactivation
# suspensions are not theirs to lift.
LIMIT_REASONS = tuple(
    r for r in ApiKey.SuspendedFor.values
    if r not in (ApiKey.SuspendedFor.STAFF, ApiKey.SuspendedFor.PERSON_INACTIVE)
)


def key_limit_lift(*, key: ApiKey, detail: str, by: User | None = None,
                   ip: str | None = None) -> bool:
    """A key suspended for a limit that no longer holds (raised or removed) is active again
    now; it returns to the proxy at the next reconcile, from escrow. Only if it is still
    suspended for the reason the caller judged, and its owner is active. Audited."""
    return _move_key(
        key, frm=Status.SUSPENDED, action=Action.KEY_RESTORED, actor=by, ip=ip, detail=detail,
        where={"owner__is_active": True, "suspended_for": key.suspended_for,
               "suspended_for__in": LIMIT_REASONS},
        status=Status.ACTIVE, suspended_for="", suspended_until=None,
    )


def key_limit_reason_move(*, key: ApiKey, reason: str, until: datetime, detail: str,
                          by: User | None = None, ip: str | None = None) -> bool:
    """A key suspended for a limit that changed, while another limit still holds it: it now
    waits for that limit's reset instead (earlier when a month limit was lifted and the day
    limit remains). Audited; the key stays off the proxy."""
    return _move_key(
        key, frm=Status.SUSPENDED, action=Action.KEY_SUSPENDED, actor=by, ip=ip, detail=detail,
        where={"suspended_for": key.suspended_for, "suspended_for__in": LIMIT_REASONS},
        suspended_for=reason, suspended_until=until,
    )


def key_resume(*, key: ApiKey, by: User | None = None, ip: str | None = None) -> bool:
    """Staff bring a suspended key back now (it returns to the proxy at the next reconcile).
    False, and nothing changes, for a key whose owner is deactivated: it comes back when the
    person is reactivated (person_set_active), not one key at a time."""
    return _move_key(
        key, frm=Status.SUSPENDED, action=Action.KEY_RESTORED, actor=by, ip=ip,
        detail="resumed by staff", where={"owner__is_active": True},
        status=Status.ACTIVE, suspended_for="", suspended_until=None,
    )


# --- people: a deactivated person's keys ----------------------------------------------------
# Deactivating a person (is_active off) suspends every active key of theirs, for
# PERSON_INACTIVE and with no end; reactivating brings back exactly those keys. Keys suspended
# by a limit or by staff, and revoked or expired keys, keep their own state (a limit-suspended
# key of a reactivated person waits for its window as before). Keys leave the proxy and
# return to it through reconcile and escrow, as limit suspensions do.


@dataclass
class PersonKeysReport:
    changed: bool = False  # the person's is_active was changed by this call
    suspended: int = 0
    restored: int = 0
    expired: int = 0  # came back past their expiry: expired, not active

    @property
    def keys_moved(self) -> int:
        return self.suspended + self.restored + self.expired


def person_set_active(
    *, person: User, active: bool, by: User | None = None, ip: str | None = None
) -> PersonKeysReport:
    """Activates or deactivates `person`, and their keys follow in the same transaction:
    deactivated, each active key is suspended (PERSON_INACTIVE, audited); active again, each
    key suspended that way is active again. The proxy follows at the next reconcile, which
    the caller may run at once (`keys_reconcile_quietly`, after the commit). Idempotent:
    called with the state the person already has, it only puts the keys in line."""
    now = timezone.now()
    with transaction.atomic():
        keys_lock()  # first: this transaction moves several key rows
        # The row lock orders two changes of one person on PostgreSQL; the keys then follow
        # the state in the database, never a stale `person` instance. NO KEY: rows that
        # merely point at the person (an audit row of theirs) are not held up by it.
        was = (
            User.objects.select_for_update(no_key=True).filter(pk=person.pk)
            .values_list("is_active", flat=True).get()
        )
        report = PersonKeysReport(changed=was != active)
        if report.changed:
            User.objects.filter(pk=person.pk).update(is_active=active)
            audit_record(
                action=Action.PERSON_REACTIVATED if active else Action.PERSON_DEACTIVATED,
                actor=by, target=person, ip=ip,
                before={"is_active": was}, after={"is_active": active},
            )
        keys = _person_keys_follow(Q(owner=person), now=now, by=by, ip=ip)
    person.is_active = active
    report.suspended, report.restored, report.expired = keys.suspended, keys.restored, keys.expired
    return report


def _person_keys_follow(
    scope: Q, *, now: datetime, by: User | None = None, ip: str | None = None
) -> PersonKeysReport:
    """Keys in `scope` follow their owner's is_active as it is in the database. Each move is
    conditional on the owner's state, so a person reactivated meanwhile keeps their keys."""
    report = PersonKeysReport()
    inactive, active = {"owner__is_active": False}, {"owner__is_active": True}
    # In id order: inside person_set_active's transaction the key rows are locked one by
    # one as they are updated, and every transaction that locks several keys goes up the
    # ids, so that two of them never wait on each other in a circle (PostgreSQL).
    away = ApiKey.objects.filter(scope, status=Status.ACTIVE, **inactive).order_by("id").only(
        "id", "prefix", "last4"
    )
    for key in list(away):
        report.suspended += _move_key(
            key, frm=Status.ACTIVE, action=Action.KEY_SUSPENDED, actor=by, ip=ip,
            detail="owner deactivated", where=inactive,
            status=Status.SUSPENDED, suspended_for=ApiKey.SuspendedFor.PERSON_INACTIVE,
            suspended_until=None, proxy_state=State.REMOVAL_PENDING,
        )
    back = ApiKey.objects.filter(
        scope, status=Status.SUSPENDED, suspended_for=ApiKey.SuspendedFor.PERSON_INACTIVE, **active
    ).order_by("id").only("id", "prefix", "last4", "expires_at")
    for key in list(back):
        # A key whose expiry passed while its owner was away comes back expired, not live.
        expired = key.expires_at is not None and key.expires_at <= now
        moved = _move_key(
            key, frm=Status.SUSPENDED, actor=by, ip=ip,
            action=Action.KEY_EXPIRED if expired else Action.KEY_RESTORED,
            detail="owner reactivated" + ("; expired meanwhile" if expired else ""),
            where={**active, "suspended_for": ApiKey.SuspendedFor.PERSON_INACTIVE},
            status=Status.EXPIRED if expired else Status.ACTIVE,
            suspended_for="", suspended_until=None,
        )
        if expired:
            report.expired += moved
        else:
            report.restored += moved
    return report


# --- upstream health, remembered for the staff dashboard ---------------------------------------


def upstream_health_remember(*, found: list[tuple[Upstream, Health]], now: datetime) -> None:
    """Stores each upstream's answer as its last known health (pool.selectors.health_known).
    Two processes storing at once may each drop the other's newest answer for a minute: an
    acceptable race for a status display, which a lock would not be worth."""
    from pool.selectors import HEALTH_CACHE_KEY, HEALTH_KEEP

    if not found:
        return
    stored = dict(cache.get(HEALTH_CACHE_KEY) or {})
    for upstream, health in found:
        stored[upstream.pk] = {"ok": health.ok, "detail": health.detail[:300],
                               "at": now.isoformat()}
    cache.set(HEALTH_CACHE_KEY, stored, HEALTH_KEEP)


def upstream_health_refresh(*, rows: list[Upstream], budget: float, now: datetime) -> bool:
    """Asks every upstream in `rows` for its health, all at once, waiting at most `budget`
    seconds, and remembers the answers; an upstream that has not answered by then is
    remembered as not answering (its question finishes in the background and is dropped).
    At most once per HEALTH_EVERY seconds across processes (a cache add() is the lock, and
    it is never released early): a relay that is down costs one page at most `budget` a
    minute, never every page. Returns whether this call asked."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from pool.selectors import HEALTH_EVERY, HEALTH_REFRESH_LOCK, _health_of

    if not rows or not cache.add(HEALTH_REFRESH_LOCK, now.isoformat(), HEALTH_EVERY):
        return False
    executor = ThreadPoolExecutor(max_workers=min(len(rows), 8), thread_name_prefix="health")
    futures = [executor.submit(_health_of, u) for u in rows]
    executor.shutdown(wait=False)  # the threads end with their question
    wait(futures, timeout=budget)
    slow = Health(False, _("It did not answer within %(s)g seconds.") % {"s": budget})
    upstream_health_remember(
        found=[(u, f.result() if f.done() else slow) for u, f in zip(rows, futures, strict=True)],
        now=now,
    )
    return True
