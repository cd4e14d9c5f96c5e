"""`audit_record()`: the one way services write the audit log."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.http import HttpRequest

from keyportal.models import AuditEvent

Action = AuditEvent.Action
ActorKind = AuditEvent.ActorKind


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_ip(request: HttpRequest | None) -> str | None:
    """The caller's address. X-Forwarded-For is believed only when the request came from a
    proxy listed in PORTAL_TRUSTED_PROXIES, and only as far back as the chain of trusted
    proxies goes: each appends the address it saw, so the right-most entry that is not a
    trusted proxy is the client. Anything left of it was written by the client, who could have
    written anything (and an audit trail must not be writable by its subjects)."""
    if request is None:
        return None
    remote = request.META.get("REMOTE_ADDR") or None
    networks = _networks(tuple(settings.PORTAL_TRUSTED_PROXIES))
    if remote is None or not networks or not _trusted(remote, networks):
        return remote
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    client = remote
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage from a proxy's left: the last proxy we trust is all we know
        client = hop
        if not _trusted(hop, networks):
            break
    return client


def audit_record(
    *,
    action: str,
    actor: Any = None,
    target: models.Model | None = None,
    target_label: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    ip: str | None = None,
    detail: str = "",
) -> AuditEvent:
    """Writes one audit row. `actor` is the person or staff member who acted (None: the
    system — cron, a command, the sync). Call it inside the transaction of the change it
    records, so that the row commits with the change or not at all."""
    if actor is not None and getattr(actor, "is_authenticated", False):
        kind = ActorKind.STAFF if actor.is_staff else ActorKind.PERSON
        label = actor.get_username()
    else:
        actor, kind, label = None, ActorKind.SYSTEM, "system"
    with transaction.atomic():
        return AuditEvent.objects.create(
            action=action,
            actor_kind=kind,
            actor=actor,
            actor_label=label,
            target_type=target._meta.model_name if target is not None else "",
            target_id=str(target.pk) if target is not None else "",
            target_label=target_label or (str(target) if target is not None else ""),
            before=before,
            after=after,
            ip=ip,
            detail=detail[:2000],
        )


def audit_form_changes(
    *, request: HttpRequest, obj: models.Model, form: Any, fields: tuple[str, ...],
    action: str = Action.LIMITS_CHANGED,
) -> AuditEvent | None:
    """One audit row for a staff edit in the admin that changed any of `fields`, with the
    old and new values; nothing when none of them changed. The admin saves in a transaction,
    so the row commits with the edit."""
    changed = [name for name in fields if name in form.changed_data]
    if not changed:
        return None
    return audit_record(
        action=action, actor=request.user, target=obj, ip=client_ip(request),
        before={name: _plain(form.initial.get(name)) for name in changed},
        after={name: _plain(form.cleaned_data.get(name)) for name in changed},
    )


def _plain(value: Any) -> Any:
    """JSON-friendly: decimals and dates as text, numbers and None as they are."""
    return value if value is None or isinstance(value, (int, str, bool)) else str(value)
