"""What the key commands share: a client from settings, and upstream errors as CommandError."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management.base import CommandError

from pool.upstream import ProxyClient, UpstreamError


@contextmanager
def proxy_client() -> Iterator[ProxyClient]:
    """Yields a client; any upstream failure ends the command with its one-sentence reason
    and a non-zero exit, so cron sees it."""
    try:
        with ProxyClient.from_settings() as client:
            yield client
    except UpstreamError as exc:
        raise CommandError(str(exc)) from None
