"""Reading the portal's emails in tests (the locmem backend's outbox)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from django.core import mail

LINK = re.compile(r"https?://\S+/(?:login|register)/[\w-]+")


def emailed_link(index: int = -1) -> str:
    """The absolute one-time link in an email the portal sent."""
    found = LINK.findall(mail.outbox[index].body)
    assert len(found) == 1, mail.outbox[index].body
    return found[0]


def emailed_path(index: int = -1) -> str:
    return urlsplit(emailed_link(index)).path
