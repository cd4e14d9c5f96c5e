"""Telling people things: staff alerts (email to every active staff member, and a JSON POST
to PORTAL_STAFF_WEBHOOK_URL when set) and emails to one person.

A failing mail server or webhook never undoes the change that caused the alert: both are
tried, failures are logged (without secrets) and reported to the caller."""

from __future__ import annotations

import logging
from typing import Any

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.utils import timezone

log = logging.getLogger(__name__)


def staff_alert(*, event: str, subject: str, body: str, data: dict[str, Any] | None = None) -> bool:
    """Emails staff and posts to the webhook. `event` is a stable machine name
    (`pool_empty`, `unissued_key_used`, ...); `data` must hold no secret. True when at least
    one channel took the alert."""
    delivered = False
    staff = list(
        get_user_model().objects.filter(is_staff=True, is_active=True).values_list("email", flat=True)
    )
    if staff:
        try:
            send_mail(subject, body, None, staff)
            delivered = True
        except Exception as exc:  # noqa: BLE001 - any mail failure must not undo the change
            log.warning("Staff alert %s not emailed: %s", event, type(exc).__name__)
    url = settings.PORTAL_STAFF_WEBHOOK_URL
    if url:
        payload = {
            "event": event, "subject": subject, "text": body, "data": data or {},
            "at": timezone.now().isoformat(),
        }
        try:
            answer = requests.post(url, json=payload, timeout=settings.PORTAL_WEBHOOK_TIMEOUT)
            answer.raise_for_status()
            delivered = True
        except requests.RequestException as exc:
            log.warning("Staff alert %s not posted to the webhook: %s", event, type(exc).__name__)
    return delivered


def person_email(*, to: str, subject: str, body: str) -> bool:
    try:
        send_mail(subject, body, None, [to])
    except Exception as exc:  # noqa: BLE001 - see staff_alert
        log.warning("Email to a person not sent: %s", type(exc).__name__)
        return False
    return True
