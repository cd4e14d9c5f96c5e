"""Encryption of the values of keys that are off the proxy for a while (suspended, expired),
so that they can come back on their own without the portal keeping any key in clear.

The encryption key comes from PORTAL_ESCROW_KEY (a Fernet key), or is derived from
SECRET_KEY; it is never in the database, so a copy of the database alone reveals no key.
Rotating it makes escrowed keys unrecoverable: they are then reported missing and their
owners replace them, as with any key the proxy lost."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class EscrowUnreadable(Exception):
    """The escrow was written with another key (PORTAL_ESCROW_KEY or SECRET_KEY changed)."""


def _fernet() -> Fernet:
    configured = getattr(settings, "PORTAL_ESCROW_KEY", "")
    if configured:
        return Fernet(configured.encode())
    derived = hashlib.sha256(b"keyportal-escrow\0" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


def escrow_seal(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def escrow_open(sealed: str) -> str:
    try:
        return _fernet().decrypt(sealed.encode()).decode()
    except (InvalidToken, ValueError):
        raise EscrowUnreadable from None
