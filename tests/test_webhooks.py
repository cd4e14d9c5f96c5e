"""Team chat webhooks against local receivers (tests/fakes/chat.py): each platform's exact
JSON and signature, checked by the receiver and again here; retries, failures staff can see,
and delivery outside the caller's path."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from datetime import timedelta
from urllib.parse import quote_plus

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from keyportal.models import Delivery, Webhook
from keyportal.notify import backoff, deliver_due, failing_webhooks, person_notify, staff_alert
from keyportal.services import webhook_save
from tests.fakes.chat import (  # noqa: F401 - receivers is a fixture
    ChatReceiver,
    dingtalk_expected,
    feishu_expected,
    json_expected,
    receivers,
)

pytestmark = pytest.mark.django_db
SECRET = "SECtest-signing-secret-0123456789"


@pytest.fixture(autouse=True)
def _quick(settings):
    settings.PORTAL_WEBHOOK_TIMEOUT = 1.0
    # Sent by the tests' own deliver_due(), not by background threads (those have their
    # tests in test_webhooks_pages.py, on a committed database).
    settings.PORTAL_WEBHOOK_BACKGROUND = False
    settings.PORTAL_STAFF_WEBHOOK_URL = ""


def hook_for(receiver: ChatReceiver, *, secret: str = "", name: str = "team", **extra) -> Webhook:
    return webhook_save(webhook=Webhook(name=name, kind=receiver.kind, **extra),
                        url=receiver.url, secret=secret)


def alert(event: str = "pool_empty", subject: str = "Pool empty", body: str = "Refill it.") -> bool:
    return staff_alert(event=event, subject=subject, body=body, data={"unused": 0})


TEXT = "Pool empty\n\nRefill it."


# --- each platform's documented message and signature --------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_dingtalk_gets_its_text_message_and_a_signed_url(receivers, signed):
    r = receivers("dingtalk", secret=SECRET if signed else "")
    hook_for(r, secret=SECRET if signed else "")
    assert alert()
    assert deliver_due().sent == 1
    [got] = r.received
    assert got.json == {"msgtype": "text", "text": {"content": TEXT}}
    assert got.query["access_token"] == "dt-token-0123456789"
    if signed:
        # The sign the docs define, computed here from the timestamp the receiver got.
        assert got.query["sign"] == dingtalk_expected(SECRET, got.query["timestamp"])
        assert len(got.query["timestamp"]) == 13  # milliseconds
    else:
        assert "sign" not in got.query and "timestamp" not in got.query
    assert Delivery.objects.get().status == Delivery.Status.SENT


def test_dingtalk_sign_is_url_encoded_in_the_query(receivers):
    from keyportal.webhooks import Message, build

    message = Message(event="e", subject="s", body="", data={}, at="")
    # A timestamp whose signature holds "+" or "/": they must arrive encoded.
    for ts in range(1700000000000, 1700000000200):
        raw = dingtalk_expected(SECRET, str(ts))
        if "+" in raw or "/" in raw:
            break
    request = build(kind="dingtalk", url="https://oapi.dingtalk.com/robot/send?access_token=t",
                    secret=SECRET, message=message, now=ts / 1000)
    assert request.url.endswith(f"&timestamp={ts}&sign={quote_plus(raw)}")


@pytest.mark.parametrize("signed", [False, True])
def test_feishu_gets_its_text_message_with_timestamp_and_sign_in_the_body(receivers, signed):
    r = receivers("feishu", secret=SECRET if signed else "")
    hook_for(r, secret=SECRET if signed else "")
    alert()
    assert deliver_due().sent == 1
    [got] = r.received
    body = got.json
    if signed:
        ts = body.pop("timestamp")
        assert isinstance(ts, str) and len(ts) == 10  # seconds, as a string
        assert body.pop("sign") == feishu_expected(SECRET, ts)
    assert body == {"msg_type": "text", "content": {"text": TEXT}}


def test_feishu_legacy_status_code_answer_counts(receivers):
    r = receivers("feishu", secret=SECRET, legacy=True)
    hook_for(r, secret=SECRET)
    alert()
    assert deliver_due().sent == 1


def test_wecom_gets_its_text_message_cut_to_2048_bytes(receivers):
    r = receivers("wecom")
    hook_for(r)
    alert(body="告警" * 2000)  # 12,000 bytes of UTF-8
    assert deliver_due().sent == 1
    [got] = r.received
    assert set(got.json) == {"msgtype", "text"} and got.json["msgtype"] == "text"
    content = got.json["text"]["content"]
    assert len(content.encode()) <= 2048 and content.startswith("Pool empty\n\n告警")
    assert got.query == {"key": "wc-key-0123456789"}


def test_slack_gets_its_text_message(receivers):
    r = receivers("slack")
    hook_for(r)
    alert()
    assert deliver_due().sent == 1
    assert r.received[0].json == {"text": TEXT}


def test_generic_json_keeps_the_portal_shape_and_signs_the_body(receivers):
    r = receivers("json", secret=SECRET)
    hook_for(r, secret=SECRET)
    alert()
    assert deliver_due().sent == 1
    [got] = r.received
    assert got.headers["X-Portal-Signature"] == json_expected(SECRET, got.body)
    body = got.json
    assert body.pop("at")
    assert body == {"event": "pool_empty", "subject": "Pool empty", "text": "Refill it.",
                    "data": {"unused": 0}}


def test_the_environment_webhook_is_a_generic_one(receivers, settings):
    r = receivers("json")
    settings.PORTAL_STAFF_WEBHOOK_URL = r.url
    alert()
    delivery = Delivery.objects.get()
    assert delivery.webhook is None  # the URL stays in the environment
    assert deliver_due().sent == 1
    assert r.received[0].json["event"] == "pool_empty"


def test_a_webhook_takes_only_the_alerts_it_was_given(receivers):
    r = receivers("slack")
    hook_for(r, events=["unissued_key_used"])
    assert not alert(event="pool_empty")  # no staff to email, no webhook for this event
    alert(event="unissued_key_used")
    assert list(Delivery.objects.values_list("event", flat=True)) == ["unissued_key_used"]


def test_disabled_and_personal_webhooks_take_no_staff_alerts(receivers, django_user_model):
    r = receivers("slack")
    hook_for(r, enabled=False)
    person = django_user_model.objects.create_user(email="p@example.com")
    hook_for(r, name="mine", owner=person)
    assert not alert()
    assert not Delivery.objects.exists()


# --- refusals, retries, what staff see ---------------------------------------------------------


def test_a_wrong_secret_is_refused_on_http_200_and_retried(receivers):
    r = receivers("dingtalk", secret=SECRET)
    hook = hook_for(r, secret="SECwrong")
    alert()
    run = deliver_due()
    assert (run.sent, run.retrying) == (0, 1)
    d = Delivery.objects.get()
    assert d.status == Delivery.Status.PENDING and d.attempts == 1
    assert "310000" in d.last_error and "sign not match" in d.last_error
    assert timedelta(seconds=25) < d.next_try_at - timezone.now() <= backoff(1)
    assert deliver_due().tried == 0  # not due yet
    assert failing_webhooks().names == [f"team ({hook.host})"]


def test_slack_refusal_is_a_failure(receivers):
    r = receivers("slack", mode="refuse")
    hook_for(r)
    alert()
    assert deliver_due().retrying == 1
    assert Delivery.objects.get().last_error == "HTTP 400: invalid_payload"


def test_retries_are_bounded_then_kept_as_failed(receivers, settings):
    settings.PORTAL_WEBHOOK_ATTEMPTS = 3
    r = receivers("wecom", mode="error")
    hook_for(r)
    alert()
    for _ in range(3):
        Delivery.objects.update(next_try_at=timezone.now())
        deliver_due()
    d = Delivery.objects.get()
    assert (d.status, d.attempts, d.last_error) == (Delivery.Status.FAILED, 3, "HTTP 500")
    assert len(r.received) == 3
    Delivery.objects.update(next_try_at=timezone.now())
    assert deliver_due().tried == 0  # given up: no more tries
    assert failing_webhooks().count == 1


def test_a_later_success_clears_the_failure(receivers):
    r = receivers("slack", mode="error")
    hook_for(r)
    alert()
    deliver_due()
    assert failing_webhooks().count == 1
    r.mode = "ok"
    Delivery.objects.update(next_try_at=timezone.now())
    assert deliver_due().sent == 1
    assert failing_webhooks().count == 0


def test_a_failing_webhook_is_an_alert_on_the_admin_dashboard_until_it_works(
        receivers, client, django_user_model):
    boss = django_user_model.objects.create_superuser("boss@example.com", "a-long-password-1")
    client.force_login(boss)
    r = receivers("slack", mode="error")
    hook_for(r, name="ops room")
    alert()
    deliver_due()
    page = client.get("/admin/").content.decode()
    said = page.split('data-alert="webhooks-failing">', 1)[1].split("</td>", 1)[0]
    assert "ops room (127.0.0.1)" in said and "/admin/keyportal/delivery/" in said
    assert r.url not in page  # the host only: the URL's path is the secret
    r.mode = "ok"
    Delivery.objects.update(next_try_at=timezone.now())
    deliver_due()
    assert 'data-alert="webhooks-failing"' not in client.get("/admin/").content.decode()


def test_a_down_receiver_is_a_failure_in_words(receivers, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens
    url = f"http://127.0.0.1:{port}/services/T0/B0/down-secret-path"
    webhook_save(webhook=Webhook(name="down", kind="slack"), url=url)
    alert()
    with caplog.at_level(logging.DEBUG):
        deliver_due()
    d = Delivery.objects.get()
    assert d.last_error == "connection refused"
    assert "down-secret-path" not in caplog.text


def test_a_slow_receiver_costs_at_most_the_timeout(receivers):
    r = receivers("slack", mode="hang")
    hook_for(r)
    alert()
    deliver_due()
    assert Delivery.objects.get().last_error == "no complete answer within 1 s"
    r.release.set()


def test_a_dripping_receiver_is_cut_at_the_deadline(receivers):
    r = receivers("wecom", mode="drip")
    hook_for(r)
    alert()
    deliver_due()
    assert Delivery.objects.get().last_error == "no complete answer within 1 s"


def test_url_and_secret_never_reach_the_logs(receivers, caplog):
    ok = receivers("dingtalk", secret=SECRET)
    bad = receivers("slack", mode="refuse")
    hook_for(ok, secret=SECRET)
    hook_for(bad, name="other")
    alert()
    # urllib3 at DEBUG too (the settings keep it at WARNING): its request lines carry paths.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="urllib3"):
        run = deliver_due()
    assert (run.sent, run.retrying) == (1, 1)
    assert "other (127.0.0.1)" in caplog.text  # the failure is logged, by name and host
    for secret in ("dt-token-0123456789", "slack-secret-0123456789", SECRET, ok.url, bad.url):
        assert secret not in caplog.text


def test_the_webhook_url_and_secret_are_sealed_in_the_database(receivers):
    r = receivers("dingtalk")
    hook = hook_for(r, secret=SECRET)
    with connection.cursor() as cursor:
        cursor.execute("SELECT url, secret, host FROM keyportal_webhook WHERE id = %s", [hook.pk])
        url, secret, host = cursor.fetchone()
    assert "dt-token" not in url and SECRET not in secret and host == "127.0.0.1"
    fresh = Webhook.objects.get(pk=hook.pk)
    assert (fresh.url, fresh.secret) == (r.url, SECRET)


def test_send_notifications_command_sends_and_fails_loudly(receivers, settings):
    settings.PORTAL_WEBHOOK_ATTEMPTS = 1
    good, bad = receivers("slack"), receivers("slack", mode="error")
    hook_for(good)
    hook_for(bad, name="bad")
    alert()
    with pytest.raises(CommandError, match="1 webhook deliveries failed"):
        call_command("send_notifications", stdout=open("/dev/null", "w"))
    assert len(good.received) == 1 and len(bad.received) == 1
    call_command("send_notifications", stdout=open("/dev/null", "w"))  # nothing due: fine
    assert len(good.received) == 1


# --- a person's own webhook --------------------------------------------------------------------


def test_a_persons_notice_goes_by_email_and_to_their_webhook(receivers, django_user_model):
    r = receivers("feishu", secret=SECRET)
    person = django_user_model.objects.create_user(email="ann@example.com")
    other = django_user_model.objects.create_user(email="bob@example.com")
    hook_for(r, secret=SECRET, name="ann", owner=person)
    assert person_notify(user=person, subject="80 % of your daily limit", body="Used 8 of 10.")
    assert person_notify(user=other, subject="x", body="y")  # email only
    assert [m.to for m in mail.outbox] == [["ann@example.com"], ["bob@example.com"]]
    assert deliver_due().sent == 1
    [got] = r.received
    assert got.json["content"] == {"text": "80 % of your daily limit\n\nUsed 8 of 10."}


# --- two workers never send one row twice ------------------------------------------------------

OUTBOX_SCRIPT = """
from keyportal.models import Delivery, Webhook
from keyportal.services import webhook_save
hook = webhook_save(webhook=Webhook(name="team", kind="slack"), url="URL")
Delivery.objects.bulk_create([Delivery(webhook=hook, event="pool_empty", subject=f"alert {i}",
                                       body="") for i in range(COUNT)])
"""
STATUS_SCRIPT = """
from keyportal.models import Delivery
print(sorted(set(Delivery.objects.values_list("status", flat=True))))
"""


@pytest.mark.django_db(transaction=True)
def test_two_processes_never_deliver_one_row_twice(receivers, sync_bench):
    """Two `send_notifications` at once on one SQLite file: each row goes out once."""
    r = receivers("slack", gate=2)  # answers once both are sending at the same time
    bench = sync_bench(keys=0, busy_timeout=20)
    bench.env["PORTAL_WEBHOOK_BACKGROUND"] = "false"
    bench.manage("shell", "-c", OUTBOX_SCRIPT.replace("URL", r.url).replace("COUNT", "60"))
    workers = [bench.start("send_notifications") for _ in range(2)]
    outs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    sent = [int(re.search(r"(\d+) sent", out).group(1)) for out, _err in outs]
    assert sum(sent) == 60 and min(sent) > 0  # both took part
    texts = sorted(json.loads(x.body)["text"] for x in r.received)
    assert texts == sorted(f"alert {i}" for i in range(60))  # each once, none twice
    assert bench.manage("shell", "-c", STATUS_SCRIPT).splitlines()[-1] == "['sent']"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_threads_never_deliver_one_row_twice_on_postgres(receivers, settings):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    settings.PORTAL_WEBHOOK_BACKGROUND = False  # only the two workers below send
    r = receivers("slack")
    hook_for(r)
    for i in range(40):
        staff_alert(event="pool_empty", subject=f"alert {i}", body="")
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait(10)
            deliver_due()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    texts = sorted(json.loads(x.body)["text"] for x in r.received)
    assert texts == sorted(f"alert {i}" for i in range(40))


# --- the sync's own alerts: failing, back again, records set aside ----------------------------


def test_a_failing_sync_is_told_once_per_half_hour_and_its_recovery_too(receivers, fake_proxy,
                                                                       settings):
    from tests.usage.conftest import sync

    r = receivers("slack")
    hook_for(r, events=["sync_failed"])
    working = settings.CLIPROXY_URL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.CLIPROXY_URL = f"http://127.0.0.1:{s.getsockname()[1]}"  # nobody listens
    for _ in range(3):
        with pytest.raises(CommandError):
            sync()
    assert deliver_due().sent == 1  # three failed runs, one message
    assert r.received[0].json["text"].startswith("Key Portal: the usage sync is failing\n\n"
                                                 "The last usage sync did not finish:")
    settings.CLIPROXY_URL = working
    sync()
    sync()
    assert deliver_due().sent == 1  # it works again: said once
    assert r.received[1].json == {"text": "Key Portal: the usage sync works again\n\n"
                                          "The last usage sync finished without error."}


def test_old_finished_deliveries_are_pruned_and_pending_ones_kept(settings):
    from keyportal.notify import deliveries_prune

    old = timezone.now() - timedelta(days=31)
    for status in ("sent", "failed", "pending"):
        Delivery.objects.create(event="e", subject="s", body="b", status=status, created_at=old)
    Delivery.objects.create(event="e", subject="s", body="b", status="sent")
    assert deliveries_prune() == 2
    assert sorted(Delivery.objects.values_list("status", flat=True)) == ["pending", "sent"]


def test_a_url_requests_cannot_use_is_a_failure_in_words_not_a_stuck_row(settings):
    webhook_save(webhook=Webhook(name="odd", kind="slack"), url="http://127.0.0.1:99999/zzsecretzz")
    alert()
    assert deliver_due().retrying == 1
    d = Delivery.objects.get()
    assert d.status == Delivery.Status.PENDING and d.attempts == 1
    assert d.last_error.startswith("the request") and "zzsecretzz" not in d.last_error
