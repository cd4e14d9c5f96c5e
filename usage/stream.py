"""The live usage stream: `sync_usage --follow` on proxies that speak RESP (7.x).

Why a stream, not only the queue: while any client (a dashboard, the proxy's own "home"
mode) is subscribed to `usage` on the proxy's RESP port, every record goes to the subscribers
and `/usage-queue` stays empty; every subscriber gets its own copy. So the portal subscribes
too, and then nobody can take its records away. It also counts within a second instead of a
poll, so limits act within seconds.

The order, each time the subscription is (re)made (pool.resp has the protocol):
1. SUBSCRIBE usage: from here on every record comes to us.
2. Drain `/usage-queue` (the poll path's pass: pending batches, the queue, limits): what
   queued while nobody listened. Subscribing first means nothing slips in between; records
   pushed meanwhile wait in the socket (the proxy drops a subscriber 256 messages behind:
   then we reconnect and go round again).
3. Read pushes; commit what arrived when the stream goes quiet for QUIET seconds, and at
   least every USAGE_STREAM_COMMIT_SECONDS under steady traffic, through
   `usage_queue_body_ingest` (stored sealed, then counted, exactly as a pop), and enforce
   limits after each commit that stored something.
A dropped connection is committed and re-made at once (then with a growing pause, up to 5 s,
while the proxy is away). A stop request (`stop`) is seen within 0.5 s: what is buffered is
committed, then the function returns. A lost lease stops the stream without committing the
buffer: the new holder subscribed already and gets copies of the same records, so counting
them here could count them twice.

Progress for staff: one SyncRun (mode "stream") per USAGE_STREAM_RUN_SECONDS with the
records of that period, written even when nothing came (staff see the stream is alive),
plus the drain's own SyncRun at each (re)subscribe.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from keyportal.locks import Held, LeaseLost
from pool.resp import UsageSubscriber
from pool.upstream import (
    ProxyClient, UpstreamError, UpstreamRefused, UpstreamUnexpected, UpstreamUnreachable,
)
from usage.limits import LimitsReport, limits_enforce
from usage.models import SyncRun
from usage.services import (
    KEEP_SYNC_RUNS, Books, IngestResult, SyncFailed, SyncReport, _notify_unissued,
    usage_queue_body_ingest, usage_spool_catch_up, usage_sync_pass,
)

STREAM_MODE = "stream"
STOP_CHECK = 0.5  # seconds: the longest a read waits before the loop looks at `stop`
QUIET = 0.05  # seconds without a push after which the buffer is committed
# Under steady traffic the stream never goes quiet: it then commits what arrived during the
# last commit and this gap after it. A kill -9 loses what was received and not committed,
# so the gap bounds that (about rate x (gap + one commit)) while keeping commits few.
BUSY_COMMIT_GAP = 0.2
RECONNECT_MAX_PAUSE = 5.0


_CUT_IN_HANDSHAKE = gettext_lazy(
    "The connection to the proxy's usage stream at %(where)s was cut while subscribing."
)


class StreamUnavailable(SyncFailed):
    """The proxy offers no usage stream to this portal (it does not speak RESP, or refused
    the management key there): poll instead. str() is one sentence, never the key."""


def usage_stream_offered(*, mode: str | None = None) -> bool:
    """Whether to try the stream: the configured mode allows it and the proxy has the queue
    generation (7.x). Asked over HTTP first, through the client's refusal latch, so a wrong
    management key is found there (and paused) before any AUTH is sent on the RESP port."""
    mode = mode or settings.CLIPROXY_USAGE_MODE
    if not settings.USAGE_STREAM or mode == "snapshot":
        return False
    with ProxyClient.from_settings() as client:
        if mode == "queue":
            client.usage_statistics_enabled()  # passes the latch: the key works over HTTP
            return True
        return client.usage_mode() == ProxyClient.USAGE_MODE_QUEUE


@dataclass
class _Period:
    """What the stream did since the last SyncRun it wrote."""

    started: datetime = field(default_factory=timezone.now)
    clock: float = field(default_factory=time.monotonic)
    result: IngestResult = field(default_factory=IngestResult)
    commits: int = 0
    errors: list[str] = field(default_factory=list)
    limits: LimitsReport | None = None


class UsageStream:
    """One follower's stream. `run()` until `stop` is set or the lease is lost."""

    def __init__(
        self, *, held: Held, stop: threading.Event,
        report: Callable[[SyncReport], None] | None = None,
        warn: Callable[[str], None] | None = None,
        subscriber: Callable[[], UsageSubscriber] = UsageSubscriber.from_settings,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.held, self.stop = held, stop
        # Called about every USAGE_FOLLOW_INTERVAL while the stream runs: the relays that
        # make their own keys are read then (they have no stream).
        self._tick = tick
        self._tick_at = 0.0
        self._report = report or (lambda r: None)
        self._warn = warn or (lambda s: None)
        self._subscriber = subscriber
        self._retry_at = 0.0  # after a database error, no commit is tried before this
        self._last_note = ""
        self.commit_every = settings.USAGE_STREAM_COMMIT_SECONDS
        self.run_every = settings.USAGE_STREAM_RUN_SECONDS
        self.max_buffer = settings.USAGE_QUEUE_BATCH
        self._buffer: list[bytes] = []
        self._behind = False  # a commit went to the spool only: catch up after the next one
        self._oldest = 0.0  # monotonic time the oldest buffered record arrived
        self._last_push = 0.0  # and the newest
        self._last_commit = time.monotonic()  # when the last commit ended (or the start)
        self._period = _Period()
        self.subscriptions = 0  # how many times a subscription was made (tests, reports)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Raises StreamUnavailable when the proxy has no stream for us (the caller polls)."""
        failures = 0
        try:
            while not self._done():
                sub = self._subscriber()
                try:
                    try:
                        sub.connect()
                    except UpstreamUnexpected:
                        if not self.subscriptions:
                            raise
                        # It spoke RESP a moment ago: a connection cut in the handshake (a
                        # partition ending, a balancer) is a network fault, not a 6.x proxy.
                        raise UpstreamUnreachable(str(_CUT_IN_HANDSHAKE) % {"where": sub.where})
                except (UpstreamRefused, UpstreamUnexpected) as exc:
                    raise StreamUnavailable(str(exc)) from None
                except UpstreamUnreachable as exc:
                    # The proxy is restarting, or something between cuts the RESP side only:
                    # keep trying, and drain the queue over HTTP meanwhile (records go there
                    # while nobody is subscribed), so nothing waits longer than a pause.
                    failures += 1
                    pause = min(STOP_CHECK * 2 ** (failures - 1), RECONNECT_MAX_PAUSE)
                    self._note(_("%(error)s Trying again in %(s)g s.")
                               % {"error": exc, "s": pause})
                    if failures > 1:
                        self._drain()
                    self.stop.wait(pause)
                    continue
                failures = 0
                self.subscriptions += 1
                reader = _Reader(sub)
                reader.start()
                try:
                    self._drain()
                    self._listen(reader)
                except (UpstreamUnreachable, UpstreamUnexpected) as exc:
                    self._note(_("%(error)s Reconnecting.") % {"error": exc})
                finally:
                    reader.halt.set()
                    reader.join(timeout=STOP_CHECK * 10)
                    sub.close()
                    self._take(reader, wait=0, final=True)  # what it read before it halted
                    if not self.held.lost.is_set():
                        self._commit(final=True)
        finally:
            if self.held.lost.is_set() and self._buffer:
                self._warn(_(
                    "Another usage sync took over the lease: %(n)d record(s) received here "
                    "were left to it (it receives the same records)."
                ) % {"n": len(self._buffer)})
                self._buffer.clear()
            self._write_period(force=True)

    def _done(self) -> bool:
        return self.stop.is_set() or self.held.lost.is_set()

    def _drain(self) -> None:
        """What queued at the proxy while nobody was subscribed (the poll path's pass)."""
        try:
            self._report(usage_sync_pass(mode="queue", held=self.held))
        except SyncFailed as exc:
            self._note(str(exc))
        except DatabaseError as exc:
            # The queue keeps what it holds (nothing was popped, or the pop is a stored
            # batch): the next drain takes it. The stream goes on meanwhile.
            self._note(_("The database is not available (%(error)s); the queue is drained "
                         "again at the next subscription.") % {"error": type(exc).__name__})

    def _listen(self, reader: _Reader) -> None:
        """Buffers pushes; commits when the stream goes quiet for QUIET seconds (light
        traffic is counted at once), or BUSY_COMMIT_GAP after the last commit (steady
        traffic), and at the latest USAGE_STREAM_COMMIT_SECONDS after the oldest buffered
        record arrived."""
        while not self._done():
            now = time.monotonic()
            wait = STOP_CHECK
            if self._buffer:
                wait = min(STOP_CHECK, QUIET, max(self._oldest + self.commit_every - now, 0.0),
                           max(self._last_commit + BUSY_COMMIT_GAP - now, 0.0))
            self._take(reader, wait=wait)
            now = time.monotonic()
            if self._buffer and (now - self._last_push >= QUIET
                                 or now - self._last_commit >= BUSY_COMMIT_GAP
                                 or now - self._oldest >= self.commit_every
                                 or len(self._buffer) >= self.max_buffer):
                self._commit()
                self._last_commit = time.monotonic()
            self._write_period()
            if self._tick is not None and now >= self._tick_at:
                self._tick_at = now + settings.USAGE_FOLLOW_INTERVAL
                self._tick()

    def _take(self, reader: _Reader, *, wait: float, final: bool = False) -> None:
        """Moves what the reader received into the buffer: waits up to `wait` for the first
        push, then takes every one already there. Re-raises the reader's failure, unless
        `final` (after the reader was halted: the connection is being closed anyway)."""
        try:
            item = reader.pushes.get(timeout=wait) if wait > 0 else reader.pushes.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, BaseException):
                if not final:
                    raise item
            else:
                now = time.monotonic()
                if not self._buffer:
                    self._oldest = now
                self._buffer.append(item)
                self._last_push = now
            try:
                item = reader.pushes.get_nowait()
            except queue.Empty:
                return

    # -- committing ----------------------------------------------------------------------

    def _commit(self, *, final: bool = False) -> None:
        """Stores and counts the buffer as one batch, like a pop; limits follow. After a
        database error the buffer is kept and tried again a second later (or at the end)."""
        if not self._buffer or (not final and time.monotonic() < self._retry_at):
            return
        try:
            with transaction.atomic():
                self.held.fence()  # a follower whose lease passed on commits nothing more
        except LeaseLost:
            return
        except DatabaseError as exc:
            self._database_error(exc)
            return
        body = json.dumps([_record_of(p) for p in self._buffer]).encode()
        period = self._period
        try:
            books = Books.load()
            result = usage_queue_body_ingest(body=body, now=timezone.now(), books=books,
                                             stop=self.stop)
            if self._behind:
                # Bodies saved to the spool while the database was away: counted now, not at
                # the next reconnect.
                result.add(usage_spool_catch_up(now=timezone.now(), books=books))
                self._behind = False
        except SyncFailed as exc:
            # In the spool (or stored) but not counted yet: counted after the next commit
            # that gets through, or by the next drain.
            self._buffer.clear()
            self._behind = True
            self._note(str(exc))
            return
        except DatabaseError as exc:
            # Not stored: keep the buffer, try again a little later.
            self._database_error(exc)
            return
        self._buffer.clear()
        period.commits += 1
        period.result.add(result)
        if result.stored:
            try:
                period.limits = limits_enforce(now=timezone.now())
            except (DatabaseError, UpstreamError) as exc:
                self._note(_("Limits could not be checked after a stream commit (%(error)s); "
                             "the next commit checks them.") % {"error": type(exc).__name__})

    def _database_error(self, exc: DatabaseError) -> None:
        self._retry_at = time.monotonic() + max(self.commit_every, 1.0)
        self._note(_("The database is not available (%(error)s); the stream keeps what it "
                     "received and tries again.") % {"error": type(exc).__name__})

    def _note(self, message: str) -> None:
        if message != self._last_note:  # a database locked for a minute is one line, not 60
            self._warn(message)
            self._last_note = message
        if message not in self._period.errors:
            self._period.errors.append(message)

    def _write_period(self, *, force: bool = False) -> None:
        """One SyncRun per period, with what the stream counted in it (even nothing)."""
        period = self._period
        duration = time.monotonic() - period.clock
        if not force and duration < self.run_every:
            return
        self._period = _Period()
        ok = not period.errors
        message = " ".join(period.errors)[:2000]
        result = period.result
        report = SyncReport(STREAM_MODE, ok, message, result, duration, period.limits)
        try:
            run = SyncRun.objects.create(
                started_at=period.started, finished_at=timezone.now(), ok=ok, mode=STREAM_MODE,
                message=message, records_read=result.read, records_stored=result.stored,
                records_foreign=result.foreign, records_unissued=result.unissued,
                records_quarantined=result.quarantined, people=len(result.people),
                duration_ms=int(duration * 1000),
            )
            SyncRun.objects.filter(pk__lte=run.pk - KEEP_SYNC_RUNS).delete()
            if result.flagged:
                _notify_unissued()
        except DatabaseError as exc:
            self._warn(_("The stream's progress could not be recorded (%(error)s).")
                       % {"error": type(exc).__name__})
        self._report(report)


class _Reader(threading.Thread):
    """Reads pushes off the socket all the time, into `pushes`, so that a commit, a drain or
    a slow database never leaves the proxy 256 messages ahead of us (it would drop the
    subscription, and with another subscriber present, records published until we are back
    would go to that one only). A failure is put in `pushes` too, and ends the thread.
    It touches no database: Django's connections stay with the stream's thread."""

    def __init__(self, sub: UsageSubscriber) -> None:
        super().__init__(name="usage-stream-reader", daemon=True)
        self.sub = sub
        self.pushes: queue.Queue[bytes | BaseException] = queue.Queue()
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                payload = self.sub.read(timeout=STOP_CHECK)
                if payload is not None:
                    self.pushes.put(payload)
        except Exception as exc:
            self.pushes.put(exc)


def _record_of(payload: bytes) -> Any:
    """A pushed record as JSON. A push that is not JSON is kept as its text, so that the
    batch's reader sets it aside (quarantine) rather than losing the whole batch."""
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace")


def usage_stream_follow(
    *, held: Held, stop: threading.Event,
    report: Callable[[SyncReport], None] | None = None,
    warn: Callable[[str], None] | None = None,
    tick: Callable[[], None] | None = None,
) -> None:
    """Follows the proxy's usage stream until `stop` is set or the lease is lost. Raises
    StreamUnavailable when the proxy has no stream for this portal (then poll). `tick`: see
    UsageStream."""
    UsageStream(held=held, stop=stop, report=report, warn=warn, tick=tick).run()
