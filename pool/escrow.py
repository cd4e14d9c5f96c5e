"""Encryption of the values of keys that are off the proxy for a while (suspended, expired),
so that they can come back on their own without the portal keeping any key in clear.

The encryption key comes from PORTAL_ESCROW_KEY (a Fernet key), or is derived from
SECRET_KEY; it is never in the database, so a copy of the database alone reveals no key.
Rotating it makes escrowed keys unrecoverable: they are then reported missing and their
owners replace them, as with any key the proxy lost."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import zlib

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
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


# --- popped usage bodies ----------------------------------------------------------------------
# A `/usage-queue` answer holds plaintext client keys and is the only copy of what it counts
# once the proxy has popped it, so it is written to the database the moment it arrives,
# sealed with the same secret as the escrow. zlib first (JSON shrinks 5-30x, so the write is
# small) at level 1, then AES-256-GCM: both together cost about a seventh of `json.loads` of
# the same bytes, where Fernet (AES-CBC, HMAC and base64 in Python) costs over half.

_SEALED_MAGIC = b"KP1"


def _material() -> bytes:
    """The secret the AES-GCM keys below are derived from: PORTAL_ESCROW_KEY, else SECRET_KEY."""
    configured = getattr(settings, "PORTAL_ESCROW_KEY", "")
    return configured.encode() if configured else settings.SECRET_KEY.encode()


@functools.lru_cache(maxsize=8)
def _cipher(purpose: bytes, material: bytes) -> AESGCM:
    return AESGCM(hashlib.sha256(purpose + b"\0" + material).digest())


def _body_cipher() -> AESGCM:
    return _cipher(b"keyportal-usage-body", _material())


def body_seal(data: bytes) -> bytes:
    nonce = os.urandom(12)
    return _SEALED_MAGIC + nonce + _body_cipher().encrypt(nonce, zlib.compress(data, 1), None)


def body_open(sealed: bytes) -> bytes:
    sealed = bytes(sealed)  # PostgreSQL hands back a memoryview
    if not sealed.startswith(_SEALED_MAGIC):
        raise EscrowUnreadable
    nonce, ciphertext = sealed[3:15], sealed[15:]
    try:
        return zlib.decompress(_body_cipher().decrypt(nonce, ciphertext, None))
    except (InvalidTag, zlib.error, ValueError):
        raise EscrowUnreadable from None


# --- spooled usage bodies, frame by frame ------------------------------------------------------
# usage/spool.py writes a popped body to disk as it arrives, so it is sealed in frames (each
# compressed and AES-GCM sealed on its own) and never has to be whole in memory. `aad` binds a
# frame to its file and position, so frames cannot be reordered or moved between files.


def _spool_cipher() -> AESGCM:
    return _cipher(b"keyportal-usage-spool", _material())


def frame_seal(data: bytes, *, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + _spool_cipher().encrypt(nonce, zlib.compress(data, 1), aad)


def frame_open(sealed: bytes, *, aad: bytes) -> bytes:
    try:
        return zlib.decompress(_spool_cipher().decrypt(sealed[:12], sealed[12:], aad))
    except (InvalidTag, zlib.error, ValueError):
        raise EscrowUnreadable from None


# --- unissued pool keys -----------------------------------------------------------------------
# A pool key is handed to a person later, so a copy of the database (a backup, a stolen file)
# must not reveal it. Its value is stored sealed with AES-256-GCM under a key derived from the
# same secret; the key's SHA-256 (key_hash) stays in clear for matching usage.

POOL_VALUE_MARK = "kpv1:"


def _pool_cipher() -> AESGCM:
    return _cipher(b"keyportal-pool-value", _material())


def pool_value_seal(value: str) -> str:
    nonce = os.urandom(12)
    sealed = nonce + _pool_cipher().encrypt(nonce, value.encode(), None)
    return POOL_VALUE_MARK + base64.urlsafe_b64encode(sealed).decode()


def pool_value_open(stored: str) -> str:
    """The key's value; EscrowUnreadable when it was sealed under another secret. A value
    written before sealing existed (no mark) is read as it is: the migration that introduced
    sealing seals those, and this keeps a half-upgraded database readable."""
    if not stored.startswith(POOL_VALUE_MARK):
        return stored
    try:
        sealed = base64.urlsafe_b64decode(stored[len(POOL_VALUE_MARK):])
        return _pool_cipher().decrypt(sealed[:12], sealed[12:], None).decode()
    except (InvalidTag, ValueError):
        raise EscrowUnreadable from None
