"""Keys at the relays that make their own (claude-relay-service, Claude Code Hub): issue, and
the reconcile that brings each relay in line with the portal.

The portal stays the source of truth, as with CLIProxyAPI: a page or the admin changes a key's
status in the database first (revoke, suspend, resume, a limit, an expiry), then the relay is
told by `relays_reconcile` — at once on the page within its budget, else at the next sync or
`reconcile_keys`. What was last pushed for each key (`ApiKey.pushed`: on/off and limits) and
person (`UpstreamAccount.pushed`) is kept, so a reconcile pushes only what differs and running
it twice changes nothing the second time.

Limits. A relay is asked to refuse by itself what it can express (see each driver); the
portal's suspension after each sync stays for the rest. A key's own limit and its owner's are
both applied to the key: where the relay has no people (claude-relay-service), the key's limit
at the relay is the smaller of the two, so one key alone never goes past the person's limit,
and what a person's several keys use together is enforced by suspension. Claude Code Hub has
people (their limits are pushed to the person's account there) and refuses a key limit above
its person's, so there too a key's limit is the smaller of the two (`folds_person_limits`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.models import User
from keyportal.audit import Action, audit_record
from pool.models import ApiKey, Upstream, UpstreamAccount, key_digest
from pool.upstream import UpstreamError
from pool.upstreams.base import NewKey, RelayLimits
from pool.upstreams.registry import driver_for, relays

log = logging.getLogger(__name__)

Status = ApiKey.Status
State = ApiKey.ProxyState
PREFIX_SHOWN = 6  # the masked form: first characters...
LAST_SHOWN = 4  # ...and last ones


def _smaller(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def key_limits(key: ApiKey, *, owner: User | None = None, with_person: bool = True) -> RelayLimits:
    """What the relay should enforce for `key`: its own limits, and (`with_person`) its
    owner's folded in (the smaller of each pair)."""
    person = owner if owner is not None else key.owner
    take = (lambda name: _smaller(getattr(key, name), getattr(person, name))) if (
        with_person and person is not None) else (lambda name: getattr(key, name))
    return RelayLimits(
        cost_day=take("limit_cost_day"), cost_month=take("limit_cost_month"),
        tokens_day=take("limit_tokens_day"), tokens_month=take("limit_tokens_month"),
        expires_at=key.expires_at,
    )


def _folds(driver: Any) -> bool:
    """Whether a key's limits at the driver's relay include its owner's."""
    return not driver.has_people or driver.folds_person_limits


def person_limits(person: User) -> RelayLimits:
    return RelayLimits(
        cost_day=person.limit_cost_day, cost_month=person.limit_cost_month,
        tokens_day=person.limit_tokens_day, tokens_month=person.limit_tokens_month,
    )


def _wanted(key: ApiKey, limits: RelayLimits) -> dict[str, Any]:
    """The state the relay should hold for `key` (what `pushed` is compared with)."""
    if key.status == Status.REVOKED:
        return {"deleted": True}
    return {"active": key.status == Status.ACTIVE, "limits": limits.as_json()}


# --- issuing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayIssued:
    key: ApiKey
    value: str


def relay_key_issue(*, upstream: Upstream, user: User, label: str, expires: datetime | None,
                    by: User | None = None, ip: str | None = None) -> RelayIssued:
    """Makes a key for `user` at `upstream` (working at once) and files it. The caller has
    checked that the person may have one (pool.services.key_assign). Raises UpstreamError
    when the relay does not make it; nothing is filed then. When the portal cannot file a key
    the relay made, the key is removed there again."""
    now = timezone.now()
    driver = driver_for(upstream)
    try:
        draft = ApiKey(owner=user, label=label, expires_at=expires, upstream=upstream)
        limits = key_limits(draft, owner=user, with_person=_folds(driver))
        account = None
        if driver.has_people:
            account = _person_account(driver, upstream, user)
        made: NewKey = driver.key_issue(person=user, label=label, limits=limits,
                                        account=account)
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(
                    owner=user, label=label, status=Status.ACTIVE, proxy_state=State.PUSHED,
                    upstream=upstream, remote_id=made.remote_id,
                    key_hash=key_digest(made.value), prefix=made.value[:PREFIX_SHOWN],
                    last4=made.value[-LAST_SHOWN:], issued_at=now, expires_at=expires,
                    pushed={"active": True, "limits": limits.as_json()},
                )
                audit_record(action=Action.KEY_ISSUED, actor=by or user, target=key, ip=ip,
                             after={"owner": user.email, "label": label,
                                    "upstream": upstream.name})
        except Exception:
            _undo(driver, made, upstream)
            raise
        return RelayIssued(key=key, value=made.value)
    finally:
        driver.close()


def _undo(driver: Any, made: NewKey, upstream: Upstream) -> None:
    """A key the relay made but the portal could not file must not stay working there."""
    try:
        driver.key_revoke(key=ApiKey(remote_id=made.remote_id, upstream=upstream))
    except UpstreamError as exc:
        log.error("A key made at %s could not be filed nor removed there (id %s): %s",
                  upstream.name, made.remote_id, exc)


def _person_account(driver: Any, upstream: Upstream, user: User) -> str:
    """The person's account id at a relay with people, made on their first key there."""
    found = UpstreamAccount.objects.filter(upstream=upstream, person=user).values_list(
        "remote_id", flat=True).first()
    if found:
        return found
    limits = person_limits(user)
    remote_id = driver.person_create(person=user, limits=limits)
    try:
        UpstreamAccount.objects.create(upstream=upstream, person=user, remote_id=remote_id,
                                       pushed=limits.as_json())
    except IntegrityError:
        # Two first keys at once: the other request's account stands.
        return UpstreamAccount.objects.get(upstream=upstream, person=user).remote_id
    return remote_id


# --- reconcile ----------------------------------------------------------------------------------


@dataclass
class RelayReport:
    upstream: str
    revoked: int = 0
    switched_off: int = 0
    switched_on: int = 0
    limits_pushed: int = 0
    people_pushed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.revoked or self.switched_off or self.switched_on or self.limits_pushed
                    or self.people_pushed)

    def lines(self) -> list[str]:
        head = _("%(name)s: %(revoked)d keys removed, %(off)d switched off, %(on)d switched "
                 "on, %(limits)d keys' and %(people)d people's limits pushed.") % {
            "name": self.upstream, "revoked": self.revoked, "off": self.switched_off,
            "on": self.switched_on, "limits": self.limits_pushed, "people": self.people_pushed,
        }
        return [head, *self.errors]


def relays_reconcile(*, upstream: Upstream | None = None, keys: list[int] | None = None,
                     dry_run: bool = False) -> list[RelayReport]:
    """Brings each relay (or only `upstream`, only `keys`) in line with the portal. A relay
    that does not answer is reported and left for the next run; the others go on."""
    from pool.services import keys_lifecycle  # noqa: PLC0415 (services imports this module)

    targets = [upstream] if upstream is not None else relays()
    if targets and not dry_run:
        keys_lifecycle(now=timezone.now())  # an expiry due now switches its key off here too
    reports = []
    for each in targets:
        reports.append(_reconcile_one(each, keys=keys, dry_run=dry_run))
    return reports


def _reconcile_one(upstream: Upstream, *, keys: list[int] | None, dry_run: bool) -> RelayReport:
    report = RelayReport(upstream=upstream.name)
    driver = driver_for(upstream)
    try:
        if driver.has_people:
            _people_push(driver, upstream, report, dry_run)
        rows = ApiKey.objects.filter(upstream=upstream).exclude(
            status=Status.REVOKED, proxy_state=State.REMOVED
        ).select_related("owner").order_by("id")
        if keys is not None:
            rows = rows.filter(id__in=keys)
        for key in rows:
            if not key.remote_id:
                continue
            wanted = _wanted(key, key_limits(key, with_person=_folds(driver)))
            if key.pushed == wanted:
                continue
            try:
                _push(driver, key, wanted, report, dry_run)
            except UpstreamError as exc:
                report.errors.append(_("Key %(key)s: %(why)s") % {"key": key.masked, "why": exc})
                if _unreachable(exc):
                    break  # the relay is away: the rest waits for the next run
    finally:
        driver.close()
    return report


def _unreachable(exc: UpstreamError) -> bool:
    from pool.upstream import UpstreamNotConfigured, UpstreamRefused, UpstreamUnreachable

    return isinstance(exc, UpstreamUnreachable | UpstreamRefused | UpstreamNotConfigured)


def _push(driver: Any, key: ApiKey, wanted: dict[str, Any], report: RelayReport,
          dry_run: bool) -> None:
    from pool.upstream import UpstreamNotFound

    was = key.pushed or {}
    if wanted.get("deleted"):
        report.revoked += 1
        if dry_run:
            return
        try:
            driver.key_revoke(key=key)
        except UpstreamNotFound:
            pass  # gone already: that is what was wanted
        _file(key, wanted, State.REMOVED, status=Status.REVOKED)
        return
    if wanted["limits"] != was.get("limits"):
        report.limits_pushed += 1
        if not dry_run:
            driver.key_limits_push(key=key, limits=_limits_of(wanted["limits"]))
    if wanted["active"] != was.get("active"):
        if wanted["active"]:
            report.switched_on += 1
        else:
            report.switched_off += 1
        if not dry_run:
            driver.key_set_active(key=key, active=wanted["active"])
    if not dry_run:
        _file(key, wanted, State.PUSHED if wanted["active"] else State.REMOVED,
              status=key.status)


def _file(key: ApiKey, wanted: dict[str, Any], state: str, *, status: str) -> None:
    """Records what the relay now holds, only if the key's status is still the one pushed
    (a change meanwhile is pushed by the next run)."""
    ApiKey.objects.filter(id=key.id, status=status).update(pushed=wanted, proxy_state=state)


def _limits_of(data: dict[str, Any]) -> RelayLimits:
    def money(v: Any) -> Decimal | None:
        return None if v is None else Decimal(v)

    return RelayLimits(
        cost_day=money(data["cost_day"]), cost_month=money(data["cost_month"]),
        tokens_day=data["tokens_day"], tokens_month=data["tokens_month"],
        expires_at=None if data["expires_at"] is None else datetime.fromisoformat(
            data["expires_at"]),
    )


def _people_push(driver: Any, upstream: Upstream, report: RelayReport, dry_run: bool) -> None:
    for account in UpstreamAccount.objects.filter(upstream=upstream).select_related("person"):
        wanted = person_limits(account.person).as_json()
        if account.pushed == wanted:
            continue
        report.people_pushed += 1
        if dry_run:
            continue
        try:
            driver.person_limits_push(account=account.remote_id, limits=_limits_of(wanted))
        except UpstreamError as exc:
            report.errors.append(_("%(person)s: %(why)s") % {"person": account.person.email,
                                                             "why": exc})
            if _unreachable(exc):
                return
            continue
        UpstreamAccount.objects.filter(id=account.id).update(pushed=wanted)
