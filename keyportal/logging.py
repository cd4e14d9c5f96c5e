"""Keeps secrets out of log output, whatever a log line was given."""

from __future__ import annotations

import logging
import re

from django.conf import settings


class RedactSecretsFilter(logging.Filter):
    """Masks the management key and anything shaped like a portal key in every record.

    Code never logs keys on purpose; this is the net under that rule, for messages that
    carry text from elsewhere (an upstream error body, a third-party library)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact(text: str) -> str:
    secret = getattr(settings, "CLIPROXY_MANAGEMENT_KEY", "")
    if secret:
        text = text.replace(secret, "[management key]")
    prefix = getattr(settings, "PORTAL_KEY_PREFIX", "")
    if prefix:
        text = re.sub(re.escape(prefix) + r"[A-Za-z0-9_\-]{8,}", prefix + "[redacted]", text)
    return text
