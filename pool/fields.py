"""A model field whose value is encrypted in the database and plain in Python."""

from __future__ import annotations

from typing import Any

from django.db import models

from pool.escrow import EscrowUnreadable, pool_value_open, pool_value_seal


class SealedValueField(models.TextField):
    """An unissued key's value: sealed on the way into the database (pool.escrow), opened on
    the way out. A value sealed under another secret (PORTAL_ESCROW_KEY or SECRET_KEY was
    changed) reads as None: the key cannot be handed out or pushed, and reconcile retires it
    (pool.services). Lookups on the value itself cannot work (each seal is different); the
    portal matches keys by key_hash."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> str | None:
        if value is None:
            return None
        try:
            return pool_value_open(value)
        except EscrowUnreadable:
            return None  # reported where it is acted on (pool.services)

    def get_prep_value(self, value: Any) -> str | None:
        value = super().get_prep_value(value)
        if value is None:
            return None
        return pool_value_seal(value)
