"""/staff/proxy: reachable or why not, usage mode, statistics, key drift, pool level, last
sync; never the management key; renders without a proxy configured."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey
from tests.conftest import MANAGEMENT_KEY
from usage.models import SyncRun

pytestmark = pytest.mark.django_db
URL = "/staff/proxy"


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("boss@example.com", password="x-long-pass-1", is_staff=True)


def row(page: str, heading: str) -> str:
    return page.split(heading, 1)[1].split("</tr>", 1)[0]


def test_only_staff_may_look(client, ann):
    assert client.get(URL)["Location"].startswith("/admin/login/")
    client.force_login(ann)
    assert client.get(URL)["Location"].startswith("/admin/login/")


def test_without_a_proxy_the_page_says_so_and_still_renders(client, staff, settings):
    settings.CLIPROXY_URL = ""
    SyncRun.objects.create(started_at=timezone.now() - timedelta(minutes=5),
                           finished_at=timezone.now(), ok=False, mode="",
                           message="No proxy is configured: set CLIPROXY_URL.")
    client.force_login(staff)
    response = client.get(URL)
    page = response.content.decode()
    assert response.status_code == 200
    assert "No proxy is configured" in page
    assert "failed" in row(page, "Result") and "set CLIPROXY_URL" in row(page, "Result")
    assert "Unused keys" in page


def test_a_reachable_proxy_shows_mode_statistics_and_key_drift(client, staff, live_key, fake_proxy):
    key, value = live_key
    pool_key = ApiKey.objects.get(status=ApiKey.Status.POOL)
    # Drift: the proxy lost the pool key, kept a key the portal revoked, and has two keys
    # the portal does not own.
    fake_proxy.api_keys = ["operator-own-key", "someone-elses", value]
    fake_proxy.restart()
    ApiKey.objects.filter(pk=key.pk).update(status=ApiKey.Status.REVOKED)
    states = list(ApiKey.objects.order_by("pk").values_list("status", "proxy_state"))
    SyncRun.objects.create(started_at=timezone.now(), finished_at=timezone.now(), ok=True,
                           mode="queue", records_read=12, records_stored=10, records_foreign=2)
    client.force_login(staff)

    page = client.get(URL).content.decode()

    assert '<span class="ok">yes</span>' in row(page, "Reachable")
    assert "queue" in row(page, "Usage mode") and ">on<" in row(page, "Usage statistics")
    assert "<td>1</td>" in row(page, "the proxy lacks")  # the pool key
    assert "<td>1</td>" in row(page, "should be gone")  # the revoked key
    assert "<td>2</td>" in row(page, "(foreign)")
    assert "<td>1</td>" in row(page, "Unused keys") and pool_key.masked not in page
    assert "12 / 10 / 2" in page and "ok" in row(page, "Result")
    # A dry run: neither the proxy's list nor the portal's keys changed.
    assert fake_proxy.api_keys == ["operator-own-key", "someone-elses", value]
    assert list(ApiKey.objects.order_by("pk").values_list("status", "proxy_state")) == states
    assert value not in page and MANAGEMENT_KEY not in page


def test_a_key_list_reconcile_would_refuse_is_reported_instead_of_drift(client, staff, fake_proxy):
    fake_proxy.api_keys = ["operator-own-key"]
    call_command("generate_keys", "--count", "4", stdout=StringIO())
    fake_proxy.api_keys = []  # the proxy's config was reset
    client.force_login(staff)

    page = client.get(URL).content.decode()

    assert '<span class="ok">yes</span>' in row(page, "Reachable")
    refused = row(page, "Key list")
    assert '<span class="bad">refused</span>' in refused
    assert "0 of the 4 keys" in refused and "reconcile_keys --force" in refused
    assert "the proxy lacks" not in page
    assert fake_proxy.api_keys == [] and mail.outbox == []  # a dry run: no write, no alert


def test_statistics_off_and_the_snapshot_generation_are_shown(client, staff, snapshot_proxy):
    snapshot_proxy.statistics_enabled = False
    client.force_login(staff)
    page = client.get(URL).content.decode()
    assert "snapshot" in row(page, "Usage mode")
    assert ">off<" in row(page, "Usage statistics") and "usage-statistics-enabled" in page


def test_an_unreachable_proxy_is_named_with_the_reason_never_the_key(client, staff, settings):
    settings.CLIPROXY_URL, settings.CLIPROXY_MANAGEMENT_KEY = "http://127.0.0.1:9", "sekrit-mgmt"
    settings.CLIPROXY_TIMEOUT = 2
    client.force_login(staff)
    response = client.get(URL)
    page = response.content.decode()
    assert response.status_code == 200
    reachable = row(page, "Reachable")
    assert '<span class="bad">no</span>' in reachable and "127.0.0.1:9" in reachable
    assert "sekrit-mgmt" not in page and "Usage mode" not in page


def test_a_refused_management_key_is_said_never_shown(client, staff, fake_proxy, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key-value"
    client.force_login(staff)
    page = client.get(URL).content.decode()
    reachable = row(page, "Reachable")
    assert '<span class="bad">no</span>' in reachable and "CLIPROXY_MANAGEMENT_KEY" in reachable
    assert "wrong-key-value" not in page and MANAGEMENT_KEY not in page
    assert len(fake_proxy.management_requests) == 1  # stops at the first refusal


def test_the_admin_index_links_the_staff_pages(client, staff):
    client.force_login(staff)
    page = client.get("/admin/").content.decode()
    assert 'href="/staff/leaderboard"' in page and 'href="/staff/proxy"' in page
    assert 'href="/staff/export"' in page


def test_quarantined_records_and_pending_pops_are_counted_and_listed(client, staff, settings):
    from usage.models import QuarantinedRecord, UsageBatch

    settings.CLIPROXY_URL = ""
    old = QuarantinedRecord.objects.create(source="queue", reason="timestamp is not RFC 3339",
                                           record='{"api_key": "sk-kp-…abcd"}')
    QuarantinedRecord.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - timedelta(days=9))
    QuarantinedRecord.objects.create(source="snapshot", reason="model contains a NUL character")
    UsageBatch.objects.create(raw=b"sealed", size=6)
    client.force_login(staff)

    page = client.get(URL).content.decode()

    assert "2 in all, 1 in the last 7 days" in row(page, "Quarantined usage records")
    assert "1" in row(page, "Stored pops not counted yet")
    staff.is_superuser = True  # the admin lists need the model permissions
    staff.save()
    listed = client.get("/admin/usage/quarantinedrecord/").content.decode()
    assert "timestamp is not RFC 3339" in listed and "model contains a NUL character" in listed
    batches = client.get("/admin/usage/usagebatch/")
    assert batches.status_code == 200 and b"sealed" not in batches.content
