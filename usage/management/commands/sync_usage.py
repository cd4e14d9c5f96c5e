"""`manage.py sync_usage [--follow]`: file what the proxy served under keys, models and hours."""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _

from keyportal.locks import Held
from pool.upstream import UpstreamError
from usage.services import (
    SyncBusy, SyncFailed, SyncReport, sync_lease, usage_sync, usage_sync_pass,
)
from usage.stream import StreamUnavailable, usage_stream_follow, usage_stream_offered

RETENTION_DEFAULT = 60  # the proxy's redis-usage-queue-retention-seconds, unless raised


class Command(BaseCommand):
    help = _(
        "Reads usage from the proxy (queue or snapshot generation) into the portal. Run it "
        "from cron, or once with --follow. When draining the queue from cron, raise the "
        "proxy's redis-usage-queue-retention-seconds to 3600 so records wait for the next run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--mode", choices=["auto", "queue", "snapshot"], default=None,
            help=_("Force a usage generation (default: CLIPROXY_USAGE_MODE, normally auto)."),
        )
        parser.add_argument(
            "--follow", action="store_true",
            help=_("Keep syncing until SIGTERM or Ctrl-C: from the proxy's live usage stream "
                   "where it has one (7.x), otherwise every --interval seconds."),
        )
        parser.add_argument(
            "--interval", type=float, default=None,
            help=_("Seconds between passes with --follow (default: USAGE_FOLLOW_INTERVAL)."),
        )

    def handle(self, *args: Any, mode: str | None, follow: bool, interval: float | None,
               **options: Any) -> None:
        if not follow:
            try:
                report = usage_sync(mode=mode)
            except SyncFailed as exc:
                raise CommandError(str(exc)) from None
            self._write(report)
            if not report.ok:
                raise CommandError(report.message)
            if report.message:  # records set aside: counted around, worth a look
                self.stderr.write(report.message)
            return
        self._follow(mode, interval if interval is not None else settings.USAGE_FOLLOW_INTERVAL)

    def _follow(self, mode: str | None, interval: float) -> None:
        if interval <= 0:
            raise CommandError(_("--interval must be a positive number of seconds."))
        if interval >= RETENTION_DEFAULT:
            self.stderr.write(_(
                "Warning: an interval of %(s)g s is not shorter than the proxy's default queue "
                "retention (60 s); raise redis-usage-queue-retention-seconds or records expire "
                "unread."
            ) % {"s": interval})
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()  # finish the pass in progress (its batch commits), then leave

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.stdout.write(_("Following the proxy every %(s)g s; stop with SIGTERM or Ctrl-C.")
                          % {"s": interval})
        waiting = False
        try:
            while not stop.is_set():
                try:
                    with sync_lease() as held:
                        waiting = False
                        self._passes(held, mode, interval, stop)
                except SyncBusy:
                    # A standby: another sync holds the lease. When it dies, its lease is free
                    # at once on this machine (its process is gone) or after the lease's time
                    # to live elsewhere, and this loop takes over.
                    if not waiting:
                        self.stderr.write(_("Another usage sync is running; waiting to take over "
                                            "when it stops."))
                        waiting = True
                    stop.wait(interval)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.stdout.write(_("Stopped."))

    def _passes(self, held: Held, mode: str | None, interval: float,
                stop: threading.Event) -> None:
        """The live stream where the proxy has one (usage.stream), otherwise passes every
        `interval` seconds, while this process holds the lease. Failures are reported and the
        loop goes on: a refused management key is retried only when the client's refusal
        latch lets a probe through (see pool.upstream), never faster; a proxy that refused
        the stream is polled for USAGE_STREAM_RETRY_SECONDS before the stream is tried again."""
        stream_after = 0.0  # monotonic time before which the stream is not tried
        while not stop.is_set() and not held.lost.is_set():
            if time.monotonic() >= stream_after:
                try:
                    if usage_stream_offered(mode=mode):
                        self.stdout.write(_("Following the proxy's live usage stream."))
                        usage_stream_follow(held=held, stop=stop, report=self._report,
                                            warn=self.stderr.write)
                        continue  # stopped, or the lease was lost: the loop's test decides
                    stream_after = math.inf  # this proxy has no stream (6.x): poll
                except StreamUnavailable as exc:
                    stream_after = time.monotonic() + settings.USAGE_STREAM_RETRY_SECONDS
                    self.stderr.write(_(
                        "%(error)s Polling every %(s)g s instead; the stream is tried again in "
                        "%(m)d minutes."
                    ) % {"error": exc, "s": interval,
                         "m": max(1, round(settings.USAGE_STREAM_RETRY_SECONDS / 60))})
                except (UpstreamError, SyncFailed) as exc:
                    self.stderr.write(str(exc))  # the pass below reports too, and waits
            try:
                self._report(usage_sync_pass(mode=mode, held=held))
            except SyncFailed as exc:
                self.stderr.write(str(exc))
            stop.wait(interval)

    def _report(self, report: SyncReport) -> None:
        self._write(report)
        if report.message:
            self.stderr.write(report.message)

    def _write(self, report: SyncReport) -> None:
        r = report.result
        line = _(
            "%(mode)s: read %(read)d, stored %(stored)d, foreign %(foreign)d, on unissued keys "
            "%(unissued)d, quarantined %(quarantined)d, people touched %(people)d, in %(secs).2f s."
        ) % {
            "mode": report.mode, "read": r.read, "stored": r.stored, "foreign": r.foreign,
            "unissued": r.unissued, "quarantined": r.quarantined, "people": len(r.people), "secs": report.duration,
        }
        self.stdout.write(line)
        if r.flagged:
            self.stdout.write(_("%(n)d pool key(s) nobody was given have usage; staff are "
                                "told by email.") % {"n": len(r.flagged)})
        if report.limits is not None:
            for limit_line in report.limits.lines():
                self.stdout.write(limit_line)
