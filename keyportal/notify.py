"""Telling people things: staff alerts (email to every active staff member, and the staff
webhooks: team chats and PORTAL_STAFF_WEBHOOK_URL), a person's limit notices (email and their
own webhook), and emails to one person.

Webhooks never hold up the caller. An alert writes one outbox row (keyportal.models.Delivery)
per webhook, in the caller's transaction, and a worker sends them outside the caller's path:
a short-lived thread started when that transaction commits, the thread `sync_usage` runs
beside its passes, and `manage.py send_notifications` (cron). Rows are claimed before they are
sent, so several portal processes sharing the database never send one twice; failures are
retried with backoff a bounded number of times, then kept as "failed" for staff to see.

A failing mail server or webhook never undoes the change that caused the alert. Logs name a
webhook and its host, never its URL or secret (the URL of a chat robot is its credential)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import OperationalError, connection, transaction
from django.db.models import Max, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from keyportal.models import Delivery, Webhook
from keyportal.webhooks import DeliveryError, Message, build, post

log = logging.getLogger(__name__)

# The staff alerts a webhook can be limited to (Webhook.events; empty takes them all).
STAFF_EVENTS: dict[str, Any] = {
    "pool_empty": _("The key pool is empty"),
    "unissued_key_used": _("Usage on keys nobody was given"),
    "implausible_key_list": _("The proxy's key list looks reset"),
    "sync_failed": _("The usage sync fails (or works again)"),
    "records_quarantined": _("Usage records set aside"),
}
PERSON_EVENT = "limit"
TEST_EVENT = "test"
# Seconds before retry n (1-based): 30 s, 2 min, 8 min, 32 min, then at most 6 h.
BACKOFF_BASE, BACKOFF_FACTOR, BACKOFF_MAX = 30, 4, 6 * 3600


# --- raising ------------------------------------------------------------------------------------


def staff_alert(*, event: str, subject: str, body: str, data: dict[str, Any] | None = None) -> bool:
    """Emails staff and queues the alert for every enabled staff webhook that takes `event`.
    `event` is a stable machine name (`pool_empty`, `unissued_key_used`, ...); `data` must hold
    no secret. True when at least one channel took the alert (an email sent, or a webhook
    delivery queued: the outbox retries it)."""
    delivered = False
    staff = list(
        get_user_model().objects.filter(is_staff=True, is_active=True).values_list("email", flat=True)
    )
    if staff:
        try:
            send_mail(subject, body, None, staff)
            delivered = True
        except Exception as exc:  # noqa: BLE001 - any mail failure must not undo the change
            log.warning("Staff alert %s not emailed: %s", event, type(exc).__name__)
    hooks = [
        hook for hook in Webhook.objects.filter(owner__isnull=True, enabled=True)
        # A list in a JSONField: filtered here, as SQLite has no JSON containment lookup.
        if not hook.events or event in hook.events
    ]
    targets: list[Webhook | None] = list(hooks)
    if settings.PORTAL_STAFF_WEBHOOK_URL:
        targets.append(None)  # the generic JSON webhook from the environment
    if targets and _enqueue(targets=targets, event=event, subject=subject, body=body,
                            data=data or {}):
        delivered = True
    return delivered


def person_notify(*, user: Any, subject: str, body: str, event: str = PERSON_EVENT) -> bool:
    """A person's notice (limits): by email, and to their own webhook when they set one. True
    when at least one channel took it."""
    delivered = person_email(to=user.email, subject=subject, body=body)
    hooks = list(Webhook.objects.filter(owner=user, enabled=True))
    if hooks and _enqueue(targets=hooks, event=event, subject=subject, body=body, data={}):
        delivered = True
    return delivered


def person_email(*, to: str, subject: str, body: str) -> bool:
    try:
        send_mail(subject, body, None, [to])
    except Exception as exc:  # noqa: BLE001 - see staff_alert
        log.warning("Email to a person not sent: %s", type(exc).__name__)
        return False
    return True


def webhook_test(*, webhook: Webhook) -> Delivery:
    """Queues a test message to one webhook (enabled or not: staff check it before turning
    it on), sent at once by the background worker."""
    [delivery] = _enqueue(
        targets=[webhook], event=TEST_EVENT,
        subject=str(_("Key Portal: test message")),
        body=str(_("If you read this, alerts from Key Portal reach this chat.")),
        data={}, force=True,
    )
    return delivery


def _enqueue(*, targets: list[Webhook | None], event: str, subject: str, body: str,
             data: dict[str, Any], force: bool = False) -> list[Delivery]:
    try:
        with transaction.atomic():
            now = timezone.now()
            rows = Delivery.objects.bulk_create([
                Delivery(webhook=hook, event=event, subject=subject[:255], body=body,
                         data=data, next_try_at=now, created_at=now)
                for hook in targets
            ])
            # After the caller's transaction commits (at once outside one): the rows are then
            # visible to the worker's own connection, and a rolled-back change sends nothing.
            transaction.on_commit(kick)
    except Exception as exc:  # noqa: BLE001 - an alert never undoes the change that raised it
        if force:
            raise
        log.warning("Alert %s not queued for webhooks: %s", event, type(exc).__name__)
        return []
    return rows


# --- delivering ---------------------------------------------------------------------------------


@dataclass
class DeliveryRun:
    sent: int = 0
    retrying: int = 0
    failed: int = 0

    @property
    def tried(self) -> int:
        return self.sent + self.retrying + self.failed


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF_BASE * BACKOFF_FACTOR ** max(attempts - 1, 0),
                                 BACKOFF_MAX))


def deliver_due(*, limit: int = 100) -> DeliveryRun:
    """Sends the deliveries that are due (new, or their retry time has come, or claimed by a
    worker that died), one at a time, each bounded by PORTAL_WEBHOOK_TIMEOUT."""
    run = DeliveryRun()
    for _ in range(limit):
        pk = _claim_next()
        if pk is None:
            break
        outcome = _deliver(pk)
        if outcome == Delivery.Status.SENT:
            run.sent += 1
        elif outcome == Delivery.Status.FAILED:
            run.failed += 1
        elif outcome == Delivery.Status.PENDING:
            run.retrying += 1
    return run


def _due(now: datetime) -> Q:
    return (Q(status=Delivery.Status.PENDING, next_try_at__lte=now)
            | Q(status=Delivery.Status.SENDING, claimed_until__lt=now))


def _claim_next() -> int | None:
    """Claims one due row for this worker. One at a time, just before it is sent: a claim
    lasts one send, so a batch claimed up front could lapse behind a slow receiver and be
    sent again by another worker; and several workers share the rows between them."""
    now = timezone.now()
    due = _due(now)
    # Long enough for one send; a worker killed mid-send frees its row when this lapses.
    claim = {"status": Delivery.Status.SENDING,
             "claimed_until": now + timedelta(seconds=settings.PORTAL_WEBHOOK_TIMEOUT + 60)}
    order = ("next_try_at", "pk")
    if connection.vendor == "postgresql":
        # A row another worker has locked is skipped, not waited for.
        with transaction.atomic():
            pk = (Delivery.objects.select_for_update(skip_locked=True).filter(due)
                  .order_by(*order).values_list("pk", flat=True).first())
            if pk is not None:
                Delivery.objects.filter(pk=pk).update(**claim)
        return pk
    # SQLite: a conditional UPDATE whose row count says who won the row (the WHERE is
    # evaluated again under the write lock: of two workers, one gets 1 and the other 0).
    for pk in Delivery.objects.filter(due).order_by(*order).values_list("pk", flat=True)[:10]:
        if Delivery.objects.filter(due, pk=pk).update(**claim):
            return pk
    return None


def _target(delivery: Delivery) -> tuple[str, str, str, str]:
    """kind, url, secret, and a name for logs and lists."""
    hook = delivery.webhook
    if hook is None:
        return "json", settings.PORTAL_STAFF_WEBHOOK_URL, "", "PORTAL_STAFF_WEBHOOK_URL"
    return hook.kind, hook.url or "", hook.secret or "", f"{hook.name} ({hook.host})"


def _deliver(pk: int) -> str | None:
    delivery = Delivery.objects.select_related("webhook").filter(
        pk=pk, status=Delivery.Status.SENDING).first()
    if delivery is None:
        return None
    kind, url, secret, name = _target(delivery)
    message = Message(event=delivery.event, subject=delivery.subject, body=delivery.body,
                      data=delivery.data, at=delivery.created_at.isoformat())
    error = ""
    final = False
    if not url:
        # The environment's URL was removed, or the sealed one cannot be opened any more
        # (PORTAL_ESCROW_KEY or SECRET_KEY changed): no retry can help.
        error, final = "no URL to send to (unset, or sealed under another secret)", True
    elif delivery.webhook is not None and not delivery.webhook.enabled \
            and delivery.event != TEST_EVENT:
        error, final = "the webhook is disabled", True
    else:
        _in_delivery.active = True
        try:
            post(build(kind=kind, url=url, secret=secret, message=message), kind=kind)
        except DeliveryError as exc:
            error = _scrub(str(exc), url, secret)
        except Exception as exc:  # noqa: BLE001 - a URL requests cannot even parse, ...
            # Its text may quote the URL: the type only. The row must not stay SENDING.
            error = f"the request could not be made ({type(exc).__name__})"
        finally:
            _in_delivery.active = False
    return _record(delivery, name=name, error=error, final=final)


def _record(delivery: Delivery, *, name: str, error: str, final: bool) -> str:
    now = timezone.now()
    attempts = delivery.attempts + 1
    if not error:
        status, fields = Delivery.Status.SENT, {"sent_at": now, "last_error": ""}
    elif final or attempts >= settings.PORTAL_WEBHOOK_ATTEMPTS:
        status, fields = Delivery.Status.FAILED, {"last_error": error[:300]}
    else:
        status = Delivery.Status.PENDING
        fields = {"last_error": error[:300], "next_try_at": now + backoff(attempts)}
    # Retried on a busy database: the message is out, and a row left SENDING would be sent
    # again once its claim lapsed.
    _patiently(lambda: Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING)
               .update(status=status, attempts=attempts, tried_at=now, claimed_until=None,
                       **fields))
    if error:
        log.warning("Webhook %s: %s %s not delivered (attempt %d, %s): %s", name,
                    delivery.event, delivery.pk, attempts,
                    "given up" if status == Delivery.Status.FAILED else "will retry", error)
    return status


def _patiently(write: Callable[[], Any], tries: int = 6) -> Any:
    """A write tried again a few times when the database is busy (SQLite's lock outlasting
    its busy timeout): every write here is conditional, so trying again is harmless."""
    for attempt in range(tries):
        try:
            return write()
        except OperationalError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)
    return None


def _scrub(text: str, url: str, secret: str) -> str:
    """The platform's own words may quote what it was sent; never pass the URL on."""
    for value in (url, secret, url.split("?", 1)[-1], url.split("//", 1)[-1].split("/", 1)[-1]):
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return text


# urllib3 logs each request line (path and query: a Slack webhook's secret path, a DingTalk
# access_token) at DEBUG. While a webhook is being sent, those lines are dropped.
_in_delivery = threading.local()


class _HideWebhookRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_in_delivery, "active", False)


logging.getLogger("urllib3.connectionpool").addFilter(_HideWebhookRequests())


# --- the workers --------------------------------------------------------------------------------

_kick_lock = threading.Lock()
_kick_state: dict[str, Any] = {"thread": None, "again": False}


def kick() -> None:
    """Sends what is due in a short-lived background thread (one per process at a time; a
    kick while it runs makes it look again before it ends). Called after a commit that queued
    deliveries, so the page or sync that raised the alert never waits for a receiver."""
    if not settings.PORTAL_WEBHOOK_BACKGROUND:
        return
    with _kick_lock:
        thread = _kick_state["thread"]
        if thread is not None and thread.is_alive():
            _kick_state["again"] = True
            return
        _kick_state["again"] = False
        thread = threading.Thread(target=_kick_run, name="keyportal-webhooks", daemon=True)
        _kick_state["thread"] = thread
        thread.start()


def _kick_run() -> None:
    try:
        while True:
            _patiently(deliver_due)
            with _kick_lock:
                if not _kick_state["again"]:
                    _kick_state["thread"] = None
                    return
                _kick_state["again"] = False
    except Exception as exc:  # noqa: BLE001 - the rows stay due; the next worker sends them
        log.warning("Webhook deliveries stopped: %s", type(exc).__name__)
        with _kick_lock:
            _kick_state["thread"] = None
    finally:
        connection.close()  # this thread's own connection


def deliveries_prune(*, keep_days: int | None = None) -> int:
    """Deletes finished deliveries (sent or given up) older than PORTAL_WEBHOOK_KEEP_DAYS."""
    keep = settings.PORTAL_WEBHOOK_KEEP_DAYS if keep_days is None else keep_days
    deleted, _rows = Delivery.objects.filter(
        status__in=[Delivery.Status.SENT, Delivery.Status.FAILED],
        created_at__lt=timezone.now() - timedelta(days=keep),
    ).delete()
    return deleted


def deliveries_due() -> bool:
    return Delivery.objects.filter(_due(timezone.now())).exists()


def courier(*, stop: threading.Event, every: float | None, now: bool = True
            ) -> threading.Thread:
    """A background thread that sends what is due (at once when `now`) and then every `every`
    seconds until `stop` is set (`every` None: once). `sync_usage` runs one beside its passes,
    so retries go out wherever the sync runs, without holding up a pass."""

    def run() -> None:
        try:
            if not now and (every is None or stop.wait(every)):
                return
            while True:
                try:
                    _patiently(deliver_due)
                except Exception as exc:  # noqa: BLE001 - a database hiccup: next round
                    log.warning("Webhook deliveries failed: %s", type(exc).__name__)
                if every is None or stop.wait(every):
                    return
        finally:
            connection.close()

    thread = threading.Thread(target=run, name="keyportal-webhook-courier", daemon=True)
    thread.start()
    return thread


# --- what staff see -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FailingWebhooks:
    count: int
    names: list[str] = field(default_factory=list)


def failing_webhooks() -> FailingWebhooks:
    """Staff webhooks whose latest attempt failed (retrying or given up), for the dashboard's
    alerts. A later success clears a webhook. Two queries, whatever the outbox holds."""
    staff = Q(webhook__isnull=True) | Q(webhook__owner__isnull=True, webhook__enabled=True)
    last_ok = dict(
        Delivery.objects.filter(staff, status=Delivery.Status.SENT)
        .values("webhook_id").annotate(at=Max("tried_at")).values_list("webhook_id", "at")
    )
    bad = (Delivery.objects.filter(staff)
           .filter(Q(status=Delivery.Status.FAILED)
                   | Q(status=Delivery.Status.PENDING, attempts__gt=0))
           .values("webhook_id", "webhook__name", "webhook__host")
           .annotate(at=Max("tried_at")).order_by("webhook__name"))
    names = []
    for row in bad:
        ok_at: datetime | None = last_ok.get(row["webhook_id"])
        if ok_at is not None and row["at"] is not None and row["at"] <= ok_at:
            continue
        names.append(f"{row['webhook__name']} ({row['webhook__host']})" if row["webhook_id"]
                     else "PORTAL_STAFF_WEBHOOK_URL")
    return FailingWebhooks(count=len(names), names=names)
