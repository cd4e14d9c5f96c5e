"""Writes owned by keyportal: the webhooks alerts go to (keyportal.notify sends them)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from keyportal.models import Webhook
from keyportal.webhooks import host_of


def webhook_save(*, webhook: Webhook, url: str = "", secret: str = "",
                 clear_secret: bool = False) -> Webhook:
    """Saves a webhook. `url` and `secret` replace the sealed ones only when given (the forms
    never show them back, so an empty field means "keep"); `clear_secret` removes the secret."""
    if url:
        webhook.url = url
        webhook.host = host_of(url)
    if secret:
        webhook.secret = secret
    elif clear_secret:
        webhook.secret = ""
    with transaction.atomic():
        webhook.save()
    return webhook


def person_webhook_set(*, user: Any, kind: str, url: str = "", secret: str = "",
                       clear_secret: bool = False) -> Webhook:
    """A person's own webhook for their limit notices (one per person), created or changed."""
    with transaction.atomic():
        hook = Webhook.objects.select_for_update().filter(owner=user).first()
        if hook is None:
            hook = Webhook(owner=user, name=user.email[:100])
        hook.kind = kind
        hook.enabled = True
        return webhook_save(webhook=hook, url=url, secret=secret, clear_secret=clear_secret)


def person_webhook_delete(*, user: Any) -> bool:
    with transaction.atomic():
        deleted, _ = Webhook.objects.filter(owner=user).delete()
    return bool(deleted)
