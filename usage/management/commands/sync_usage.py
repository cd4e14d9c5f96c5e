"""`manage.py sync_usage [--follow]`: file what the proxy served under keys, models and hours.

Exit codes (one-shot runs; cron and systemd see them):
  0    done.
  1    failed (the proxy unreachable or refusing, another sync running, ...): one sentence.
  75   the database stayed locked, full or away (EX_TEMPFAIL): whatever was popped is in the
       spool (USAGE_SPOOL_DIR) and the next run counts it.
  130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM (128 + the signal, as a shell
       reports it): the pop in hand was finished or spooled first, nothing is lost.
`--follow` runs until SIGTERM or SIGINT, then finishes the pop in hand and exits 0.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.utils.translation import gettext as _

from keyportal.locks import Held
from keyportal.notify import courier, deliveries_due
from pool.upstream import UpstreamError
from pool.upstreams.registry import cliproxyapi_endpoint
from usage.services import (
    EXIT_DB_UNAVAILABLE, DatabaseUnavailable, PopSizing, SyncBusy, SyncFailed, SyncReport,
    database_unavailable, sync_lease, usage_relays_pass, usage_sync, usage_sync_pass,
)
from usage.stream import StreamUnavailable, usage_stream_follow, usage_stream_offered

RETENTION_DEFAULT = 60  # the proxy's redis-usage-queue-retention-seconds, unless raised
REPORT_AGAIN_AFTER = 60.0  # seconds before the same kind of database failure is told again
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
WEBHOOKS_EVERY = 30.0  # seconds between looks at the webhook outbox with --follow


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
        if interval is not None and interval <= 0:
            raise CommandError(_("--interval must be a positive number of seconds."))
        stop = threading.Event()
        caught: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            # Only a flag: the pop in hand finishes (or is spooled) and the loops look at
            # the flag between pops and while they wait.
            caught.append(signum)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in SIGNAL_NAMES}
        # Webhook deliveries (keyportal.notify) go out in a thread beside the sync, never in
        # its path: retries whenever they are due with --follow, what is due now otherwise.
        mail_stop = threading.Event()
        if settings.PORTAL_WEBHOOK_BACKGROUND:
            due = self._deliveries_due()  # looked at here, so an empty outbox costs no thread
            if follow or due:
                courier(stop=mail_stop, every=WEBHOOKS_EVERY if follow else None, now=due)
        try:
            if follow:
                self._follow(mode, interval if interval is not None
                             else settings.USAGE_FOLLOW_INTERVAL, stop)
            else:
                self._once(mode, stop, caught)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            # Never waited for: a receiver that hangs must not hold the run's exit. A send cut
            # short by the exit is claimed again when its claim lapses, by the next run.
            mail_stop.set()

    def _deliveries_due(self) -> bool:
        try:
            return deliveries_due()
        except DatabaseError:
            return False  # the sync itself reports the database in its own words

    def _once(self, mode: str | None, stop: threading.Event, caught: list[int]) -> None:
        try:
            report = usage_sync(mode=mode, stop=stop)
        except DatabaseUnavailable as exc:
            self._stopped(caught)
            raise CommandError(str(exc), returncode=EXIT_DB_UNAVAILABLE) from None
        except SyncFailed as exc:
            self._stopped(caught)
            raise CommandError(str(exc)) from None
        self._write(report)
        self._stopped(caught)
        if not report.ok:
            raise CommandError(report.message)
        if report.message:  # records set aside: counted around, worth a look
            self.stderr.write(report.message)

    def _stopped(self, caught: list[int]) -> None:
        if not caught:
            return
        signum = caught[0]
        raise CommandError(
            _("Stopped by %(signal)s: everything popped from the proxy is counted or saved in "
              "the spool, and the next run counts the rest.") % {"signal": SIGNAL_NAMES[signum]},
            returncode=128 + signum,
        )

    def _follow(self, mode: str | None, interval: float, stop: threading.Event) -> None:
        if interval >= RETENTION_DEFAULT:
            self.stderr.write(_(
                "Warning: an interval of %(s)g s is not shorter than the proxy's default queue "
                "retention (60 s); raise redis-usage-queue-retention-seconds or records expire "
                "unread."
            ) % {"s": interval})
        self.stdout.write(_("Following the proxy every %(s)g s; stop with SIGTERM or Ctrl-C.")
                          % {"s": interval})
        self._told: dict[str, float] = {}
        sizing = PopSizing()
        waiting = False
        while not stop.is_set():
            try:
                with sync_lease() as held:
                    waiting = False
                    self._passes(held, mode, interval, stop, sizing)
            except SyncBusy:
                # A standby: another sync holds the lease. When it dies, its lease is free
                # at once on this machine (its process is gone) or after the lease's time
                # to live elsewhere, and this loop takes over.
                if not waiting:
                    self.stderr.write(_("Another usage sync is running; waiting to take over "
                                        "when it stops."))
                    waiting = True
                stop.wait(interval)
            except DatabaseUnavailable as exc:
                self._tell_database(exc)
                stop.wait(interval)
            except DatabaseError as exc:
                self._tell_database(database_unavailable(exc))
                stop.wait(interval)
        self.stdout.write(_("Stopped."))

    def _relays(self, held: Held, stop: threading.Event) -> None:
        """The relays' usage while the stream runs (they have no stream): a failure is
        reported and the stream goes on."""
        try:
            report = usage_relays_pass(held=held, stop=stop)
        except (SyncFailed, DatabaseError) as exc:
            self.stderr.write(str(exc))
            return
        if report is not None:
            self._report(report)

    def _passes(self, held: Held, mode: str | None, interval: float,
                stop: threading.Event, sizing: PopSizing) -> None:
        """The live stream where the proxy has one (usage.stream), otherwise passes every
        `interval` seconds, while this process holds the lease. Failures are reported and the
        loop goes on: a refused management key is retried only when the client's refusal
        latch lets a probe through (see pool.upstream), never faster; a proxy that refused
        the stream is polled for USAGE_STREAM_RETRY_SECONDS before the stream is tried again;
        a database that fails is told once per kind a minute while pops go on into the
        spool."""
        stream_after = 0.0  # monotonic time before which the stream is not tried
        while not stop.is_set() and not held.lost.is_set():
            if time.monotonic() >= stream_after and not cliproxyapi_endpoint().management_url:
                stream_after = math.inf  # no CLIProxyAPI: the relays are polled
            if time.monotonic() >= stream_after:
                try:
                    if usage_stream_offered(mode=mode):
                        self.stdout.write(_("Following the proxy's live usage stream."))
                        usage_stream_follow(held=held, stop=stop, report=self._report,
                                            warn=self.stderr.write,
                                            tick=lambda: self._relays(held, stop))
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
                except DatabaseError as exc:  # the refusal latch lives in the database cache
                    self._tell_database(database_unavailable(exc))
            try:
                report = usage_sync_pass(mode=mode, held=held, stop=stop, sizing=sizing)
                self._report(report)
                if self._told:
                    self.stdout.write(_("The database is writable again; the spool is counted."))
                    self._told.clear()
            except DatabaseUnavailable as exc:
                self._tell_database(exc)
            except SyncFailed as exc:
                self.stderr.write(str(exc))
            except DatabaseError as exc:
                # Anywhere else the database fails (the lease, the cache): told like the rest,
                # and the loop goes on.
                self._tell_database(database_unavailable(exc))
            stop.wait(interval)

    def _tell_database(self, exc: DatabaseUnavailable) -> None:
        now = time.monotonic()
        if now - self._told.get(exc.kind, -REPORT_AGAIN_AFTER) >= REPORT_AGAIN_AFTER:
            self.stderr.write(str(exc))
            self._told[exc.kind] = now

    def _report(self, report: SyncReport) -> None:
        self._write(report)
        if report.message:
            self.stderr.write(report.message)

    def _write(self, report: SyncReport) -> None:
        r = report.result
        line = _(
            "%(mode)s: read %(read)d, stored %(stored)d, foreign %(foreign)d, on unissued keys "
            "%(unissued)d, quarantined %(quarantined)d, incomplete %(incomplete)d, people touched "
            "%(people)d, in %(secs).2f s."
        ) % {
            "mode": report.mode, "read": r.read, "stored": r.stored, "foreign": r.foreign,
            "unissued": r.unissued, "quarantined": r.quarantined, "incomplete": r.incomplete,
            "people": len(r.people), "secs": report.duration,
        }
        self.stdout.write(line)
        for note in report.notes:
            self.stdout.write(note)
        if r.flagged:
            self.stdout.write(_("%(n)d pool key(s) nobody was given have usage; staff are "
                                "told by email.") % {"n": len(r.flagged)})
        if report.limits is not None:
            for limit_line in report.limits.lines():
                self.stdout.write(limit_line)
