"""Webhooks in the admin and on a person's page, and delivery outside the path of the page or
the sync that raised the alert (a receiver that hangs or is down delays neither)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from django.urls import reverse

from keyportal.models import Delivery, Webhook
from keyportal.notify import deliver_due, failing_webhooks
from keyportal.services import webhook_save
from pool.services import pool_keys_create
from tests.fakes.chat import ChatReceiver, receivers  # noqa: F401 - a fixture
from tests.usage.conftest import sync

SECRET = "SECpage-secret-0123456789"
HIDDEN = ("dt-token-0123456789", "slack-secret-0123456789", SECRET)


@pytest.fixture(autouse=True)
def _settings(settings):
    settings.PORTAL_WEBHOOK_TIMEOUT = 1.0
    settings.PORTAL_STAFF_WEBHOOK_URL = ""
    settings.PORTAL_PERSON_WEBHOOK_HOSTS = ["127.0.0.1"]


def wait_for(state: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    """Waits for a state (never a fixed time), failing after a generous bound."""
    end = time.monotonic() + deadline
    while not state():
        if time.monotonic() > end:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.02)


def hook_for(r: ChatReceiver, **extra) -> Webhook:
    return webhook_save(webhook=Webhook(name=extra.pop("name", "team"), kind=r.kind, **extra),
                        url=r.url, secret=extra.pop("secret", ""))


# --- the admin ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_staff_add_a_webhook_whose_url_and_secret_are_never_shown_back(admin_client, receivers):
    r = receivers("dingtalk", secret=SECRET)
    response = admin_client.post("/admin/keyportal/webhook/add/", {
        "name": "ops chat", "kind": "dingtalk", "new_url": r.url, "new_secret": SECRET,
        "enabled": "on", "events": ["pool_empty"],
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    hook = Webhook.objects.get()
    assert (hook.url, hook.secret, hook.host, hook.events) == (r.url, SECRET, "127.0.0.1",
                                                               ["pool_empty"])
    pages = [admin_client.get(u).content.decode() for u in (
        "/admin/keyportal/webhook/", f"/admin/keyportal/webhook/{hook.pk}/change/",
        "/admin/keyportal/delivery/")]
    assert "127.0.0.1" in pages[0] and "ops chat" in pages[0]
    for page in pages:
        assert all(s not in page for s in HIDDEN)
    # Saved again with the fields left empty: both kept.
    admin_client.post(f"/admin/keyportal/webhook/{hook.pk}/change/", {
        "name": "ops", "kind": "dingtalk", "new_url": "", "new_secret": "", "enabled": "on"})
    hook.refresh_from_db()
    assert (hook.name, hook.url, hook.secret, hook.events) == ("ops", r.url, SECRET, [])


@pytest.mark.django_db
def test_a_refused_form_does_not_echo_the_secret(admin_client):
    response = admin_client.post("/admin/keyportal/webhook/add/", {
        "name": "", "kind": "slack", "new_url": "https://hooks.slack.com/services/T/B/zzsecretzz",
        "new_secret": "zzothersecretzz", "enabled": "on"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "zzsecretzz" not in page and "zzothersecretzz" not in page


@pytest.mark.django_db
def test_send_a_test_message_and_see_the_failure_in_deliveries(admin_client, receivers):
    ok = receivers("slack")
    down = receivers("wecom", mode="refuse")
    good, bad = hook_for(ok), hook_for(down, name="broken")
    response = admin_client.post("/admin/keyportal/webhook/", {
        "action": "send_test", "_selected_action": [good.pk, bad.pk]})
    assert response.status_code == 302
    assert Delivery.objects.filter(event="test").count() == 2
    deliver_due()
    assert ok.received[0].json == {
        "text": "Key Portal: test message\n\nIf you read this, alerts from Key Portal reach this chat."}
    page = admin_client.get("/admin/keyportal/delivery/", {"status__exact": "pending"}
                            ).content.decode()
    assert "broken (127.0.0.1)" in page and "code 93000 invalid webhook url" in page
    assert all(s not in page for s in ("wc-key-0123456789", "slack-secret-0123456789"))
    assert failing_webhooks().names == ["broken (127.0.0.1)"]
    # Staff try it again now, once the robot is fixed: the failure clears.
    down.mode = "ok"
    failed = Delivery.objects.get(webhook=bad)
    admin_client.post("/admin/keyportal/delivery/", {
        "action": "retry_now", "_selected_action": [failed.pk]})
    deliver_due()
    assert Delivery.objects.get(pk=failed.pk).status == Delivery.Status.SENT
    assert failing_webhooks().count == 0


@pytest.mark.django_db
@pytest.mark.parametrize("rows", [2, 20])
def test_delivery_and_webhook_lists_query_counts_do_not_grow(admin_client, receivers,
                                                             django_assert_num_queries, rows):
    r = receivers("slack")
    for i in range(rows):
        hook = hook_for(r, name=f"hook {i}")
        Delivery.objects.create(webhook=hook, event="pool_empty", subject="s", body="b",
                                status="failed", attempts=6, last_error="HTTP 500")
    with django_assert_num_queries(5):
        assert admin_client.get("/admin/keyportal/delivery/").status_code == 200
    with django_assert_num_queries(5):
        assert admin_client.get("/admin/keyportal/webhook/").status_code == 200


# --- a person's page ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_visitors_are_sent_to_sign_in(client):
    response = client.get(reverse("my-notifications"))
    assert response.status_code == 302 and "/login" in response["Location"]


@pytest.mark.django_db
def test_a_person_sets_tests_and_removes_their_webhook(client, ann, bob, receivers):
    r = receivers("feishu", secret=SECRET)
    client.force_login(ann)
    page = client.get(reverse("my-notifications"))
    assert page.status_code == 200 and b"Chat notifications" in page.content
    response = client.post(reverse("my-notifications"), {
        "action": "save", "kind": "feishu", "new_url": r.url, "new_secret": SECRET})
    assert response.status_code == 303
    hook = Webhook.objects.get(owner=ann)
    assert (hook.kind, hook.url, hook.secret) == ("feishu", r.url, SECRET)
    page = client.get(reverse("my-notifications")).content.decode()
    assert "127.0.0.1" in page and r.url not in page and SECRET not in page
    client.post(reverse("my-notifications"), {"action": "test"})
    assert deliver_due().sent == 1 and r.received[0].json["content"]["text"].startswith(
        "Key Portal: test message")
    assert "sent" in client.get(reverse("my-notifications")).content.decode()
    # Bob sees his own (empty) page, and cannot remove Ann's webhook.
    client.force_login(bob)
    assert r.url not in client.get(reverse("my-notifications")).content.decode()
    client.post(reverse("my-notifications"), {"action": "delete"})
    assert Webhook.objects.filter(owner=ann).exists()
    client.force_login(ann)
    client.post(reverse("my-notifications"), {"action": "delete"})
    assert not Webhook.objects.filter(owner=ann).exists()


@pytest.mark.django_db
def test_a_persons_webhook_must_point_at_a_chat_platform(client, ann, settings):
    settings.PORTAL_PERSON_WEBHOOK_HOSTS = ["hooks.slack.com"]
    client.force_login(ann)
    response = client.post(reverse("my-notifications"), {
        "action": "save", "kind": "slack", "new_url": "http://127.0.0.1:8317/v0/management/x"})
    assert response.status_code == 400 and b"hooks.slack.com" in response.content
    assert b"8317" not in response.content and not Webhook.objects.exists()


@pytest.mark.django_db
def test_my_keys_links_to_the_notifications_page(client, ann):
    client.force_login(ann)
    assert reverse("my-notifications").encode() in client.get("/my-keys").content


# --- the caller never waits for a receiver -----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_hanging_receiver_does_not_hold_the_page_that_raised_the_alert(client, ann, receivers,
                                                                        settings):
    settings.PORTAL_WEBHOOK_TIMEOUT = 60.0  # the receiver, not the timeout, decides here
    r = receivers("slack", mode="hang")
    hook_for(r)
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci"})  # the pool is empty: staff alert
    assert response.status_code == 503
    # The page has answered; the delivery reaches the receiver, which holds it unanswered.
    assert r.arrived.wait(20)
    assert Delivery.objects.get().status == Delivery.Status.SENDING
    r.release.set()
    wait_for(lambda: Delivery.objects.get().status == Delivery.Status.SENT, "the delivery")


@pytest.mark.django_db(transaction=True)
def test_a_hanging_receiver_does_not_hold_sync_usage(fake_proxy, receivers, settings):
    settings.PORTAL_WEBHOOK_TIMEOUT = 60.0
    r = receivers("dingtalk", mode="hang")
    hook_for(r)
    [pool_key] = pool_keys_create(count=1)
    fake_proxy.add_usage(pool_key.value)
    sync()  # finds usage on a key nobody was given: a staff alert
    assert r.arrived.wait(20)
    assert Delivery.objects.get().status == Delivery.Status.SENDING
    assert pool_key.value not in r.received[0].body.decode()
    r.release.set()
    wait_for(lambda: Delivery.objects.get().status == Delivery.Status.SENT, "the delivery")


@pytest.mark.django_db(transaction=True)
def test_a_down_receiver_does_not_hold_sync_usage_and_the_next_run_retries(fake_proxy, receivers):
    r = receivers("wecom", mode="error")
    hook_for(r)
    [pool_key] = pool_keys_create(count=1)
    fake_proxy.add_usage(pool_key.value)
    sync()
    wait_for(lambda: Delivery.objects.get().attempts == 1, "the first attempt")
    assert Delivery.objects.get().status == Delivery.Status.PENDING
    assert failing_webhooks().count == 1
    r.mode = "ok"
    Delivery.objects.update(next_try_at=Delivery.objects.get().created_at)  # due now
    sync()  # the next run picks the retry up in its background thread
    wait_for(lambda: Delivery.objects.get().status == Delivery.Status.SENT, "the retry")
    assert failing_webhooks().count == 0


@pytest.mark.django_db
def test_error_reports_hide_the_url_and_secret_fields(rf, admin_user):
    from django.contrib.admin.sites import site
    from django.views.debug import SafeExceptionReporterFilter

    from keyportal.person_views import my_notifications

    post = {"new_url": "https://hooks.slack.com/services/zzsecretzz", "new_secret": "zzs",
            "name": "n"}
    request = rf.post("/admin/keyportal/webhook/add/", post)
    request.user = admin_user
    admin = site._registry[Webhook]
    try:
        admin.changeform_view(request)  # no session or CSRF here: it may refuse; the marking
    except Exception:  # noqa: BLE001 - is what this test is about
        pass
    request2 = rf.post("/my-keys/notifications", post)
    request2.user = admin_user
    try:
        my_notifications(request2)
    except Exception:  # noqa: BLE001
        pass
    for r in (request, request2):
        cleaned = SafeExceptionReporterFilter().get_post_parameters(r)
        assert cleaned["new_url"] != post["new_url"] and cleaned["new_secret"] != "zzs"
        assert cleaned["name"] == "n"
