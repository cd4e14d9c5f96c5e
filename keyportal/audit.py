"""`audit_record()`: the one way services write the audit log."""

from __future__ import annotations

from typing import Any

from django.db import models, transaction
from django.http import HttpRequest

from keyportal.models import AuditEvent

Action = AuditEvent.Action
ActorKind = AuditEvent.ActorKind


def client_ip(request: HttpRequest | None) -> str | None:
    """The caller's address as the portal's own server saw it. X-Forwarded-For is not
    trusted: anyone can send it, and an audit trail must not be writable by its subjects."""
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


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
