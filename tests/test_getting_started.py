"""The admin index's getting-started checklist (usage.selectors.getting_started), each step
both ways; the buttons it offers (fill the pool, sync now: ok, busy, failed); the public URL
of an environment upstream set in the admin."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone, translation

from accounts.models import User
from keyportal.locks import lease_acquire, lease_release
from pool.models import ApiKey, Upstream
from pool.selectors import PROBE_CACHE_KEY, upstream_probes_forget
from pool.services import pool_keys_create
from pool.upstreams.registry import cliproxyapi, endpoint, environment_sync, public_url
from tests.fakes.crs import PASSWORD, USERNAME, FakeCrs
from tests.usage.conftest import issue
from usage.models import SyncRun
from usage.selectors import Checklist, getting_started
from usage.services import SYNC_LEASE

pytestmark = pytest.mark.django_db

PUBLIC = "https://relay.example.com"


@pytest.fixture(autouse=True)
def _in_english() -> Iterator[None]:
    # The sentences are asserted in English, whatever an earlier test left active.
    with translation.override("en"):
        yield


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", "a-long-password-1")


@pytest.fixture
def crs(settings) -> Iterator[FakeCrs]:
    fake = FakeCrs().start()
    settings.CRS_URL = fake.url
    settings.CRS_ADMIN_USERNAME = USERNAME
    settings.CRS_ADMIN_PASSWORD = PASSWORD
    yield fake
    fake.stop()


def steps(checklist: Checklist) -> dict[str, bool]:
    return {item.name: item.done for item in checklist.items}


def step(checklist: Checklist, name: str):
    return next(item for item in checklist.items if item.name == name)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_ready(count: int = 2) -> None:
    keys = pool_keys_create(count=count)
    ApiKey.objects.filter(pk__in=[k.pk for k in keys]).update(
        proxy_state=ApiKey.ProxyState.PUSHED)


def synced(ok: bool = True, message: str = "") -> SyncRun:
    now = timezone.now()
    return SyncRun.objects.create(started_at=now - timedelta(seconds=5), finished_at=now, ok=ok,
                                  message=message)


# --- the steps, each both ways ----------------------------------------------------------------


def test_a_fresh_cliproxyapi_portal_has_everything_but_staff_and_the_proxy_to_do(
    fake_proxy, boss
):
    fake_proxy.statistics_enabled = False
    checklist = getting_started(user=boss)
    assert steps(checklist) == {"staff": True, "upstream": True, "pool": False,
                                "statistics": False, "sync": False, "public_url": False}
    assert not checklist.done and checklist.remaining == 4
    assert "boss@example.com" in step(checklist, "staff").lines[0]
    pool = step(checklist, "pool")
    assert pool.action_post and pool.action_url.startswith(reverse("admin:pool_apikey_reconcile"))
    assert step(checklist, "statistics").action_url == reverse("staff-proxy-settings")
    sync = step(checklist, "sync")
    assert sync.action_post and sync.action_url.startswith(reverse("admin:usage_syncrun_sync"))
    public = step(checklist, "public_url")
    assert "no public URL is set" in public.lines[0] and fake_proxy.url in public.lines[0]
    assert public.action_url == reverse("admin:pool_upstream_change", args=[cliproxyapi().pk])


def test_every_step_done_leaves_one_line_on_the_index(fake_proxy, boss, settings, client):
    settings.CLIPROXY_PUBLIC_URL = PUBLIC
    pool_ready()
    synced()
    checklist = getting_started(user=boss)
    assert checklist.done, steps(checklist)
    assert f"people are given {PUBLIC}" in step(checklist, "public_url").lines[0]
    client.force_login(boss)
    page = client.get("/admin/").content.decode()
    assert 'id="getting-started" data-done="true"' in page
    assert "every step is done" in page and "data-step=" not in page


def test_a_pool_whose_keys_are_all_handed_out_is_not_done_and_offers_the_button(fake_proxy, boss):
    issue(1, ["ann@example.com"])  # the pool's one key, handed out: none left for the next
    pool = step(getting_started(user=boss), "pool")
    assert not pool.done and "All 1 keys are handed out" in pool.lines[0]
    assert pool.action_post and pool.action_url.startswith(reverse("admin:pool_apikey_reconcile"))
    pool_ready()
    upstream_probes_forget()
    assert steps(getting_started(user=boss))["pool"] is True


def test_unpushed_pool_keys_are_not_a_pool_yet(fake_proxy, boss):
    pool_keys_create(count=3)  # made, never pushed to the proxy
    assert steps(getting_started(user=boss))["pool"] is False


def test_a_refused_management_key_is_named(fake_proxy, boss, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"
    checklist = getting_started(user=boss)
    upstream = step(checklist, "upstream")
    assert not upstream.done
    assert "refused the portal's management key" in upstream.lines[0]
    assert "CLIPROXY_MANAGEMENT_KEY" in upstream.lines[-1]
    assert "wrong-key" not in str(checklist)
    # The statistics cannot be known through a refused key: not done, and said so.
    assert not step(checklist, "statistics").done
    assert "Not known" in step(checklist, "statistics").lines[0]


def test_a_missing_management_key_is_named_not_taken_for_a_silent_proxy(fake_proxy, boss,
                                                                       settings):
    settings.CLIPROXY_MANAGEMENT_KEY = ""
    upstream = step(getting_started(user=boss), "upstream")
    assert not upstream.done and "does not answer" not in " ".join(upstream.lines)
    assert "CLIPROXY_MANAGEMENT_KEY is not set" in upstream.lines[0]
    assert "remote-management secret-key" in upstream.lines[-1]
    assert fake_proxy.management_requests == []


def test_an_unreachable_proxy_is_said_and_links_to_its_status(boss, settings):
    settings.CLIPROXY_URL = f"http://127.0.0.1:{closed_port()}"
    settings.CLIPROXY_MANAGEMENT_KEY = "k"
    upstream = step(getting_started(user=boss), "upstream")
    assert not upstream.done and "does not answer" in upstream.lines[0]
    assert upstream.action_url == reverse("staff-proxy")


def test_a_stalled_proxy_does_not_hold_the_index(fake_proxy, boss, client, settings):
    hold = threading.Event()
    fake_proxy.inject("/usage-statistics-enabled", hold=hold, times=5)
    try:
        client.force_login(boss)
        response = client.get("/admin/")
        assert response.status_code == 200
        page = response.content.decode()
        assert 'data-step="upstream" data-done="false"' in page
    finally:
        hold.set()


def test_the_proxy_is_asked_once_a_minute_and_again_after_a_change(fake_proxy, boss):
    getting_started(user=boss)
    getting_started(user=boss)
    assert fake_proxy.requests_to("/usage-statistics-enabled") == 1
    fake_proxy.statistics_enabled = False
    assert steps(getting_started(user=boss))["statistics"] is True  # the cached answer
    upstream_probes_forget()
    assert steps(getting_started(user=boss))["statistics"] is False
    assert fake_proxy.requests_to("/usage-statistics-enabled") == 2


def test_each_language_keeps_its_own_answer_and_a_change_forgets_them_all(fake_proxy, boss,
                                                                          settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"
    english = step(getting_started(user=boss), "upstream").lines
    with translation.override("zh-hans"):
        chinese = step(getting_started(user=boss), "upstream").lines
    assert english[1] != chinese[1] and "管理密钥" in chinese[0]
    assert cache.get(f"{PROBE_CACHE_KEY}:en") and cache.get(f"{PROBE_CACHE_KEY}:zh-hans")
    upstream_probes_forget()
    assert cache.get(f"{PROBE_CACHE_KEY}:en") is None
    assert cache.get(f"{PROBE_CACHE_KEY}:zh-hans") is None


def test_no_upstream_at_all_asks_for_one(boss):
    checklist = getting_started(user=boss)
    upstream = step(checklist, "upstream")
    assert not upstream.done and upstream.action_url == reverse("admin:pool_upstream_add")
    assert not step(checklist, "public_url").done
    # A CLIProxyAPI portal waiting for its address: the pool and statistics steps wait too,
    # with no button that could only fail.
    for name in ("pool", "statistics"):
        assert not step(checklist, name).done and step(checklist, name).action_url == ""
        assert "comes first" in step(checklist, name).lines[0]


def test_a_failed_sync_is_quoted_and_a_good_one_is_done(fake_proxy, boss):
    synced(ok=False, message="the proxy at http://x did not answer")
    sync = step(getting_started(user=boss), "sync")
    assert not sync.done and "did not answer" in sync.lines[0]
    synced(ok=True)
    synced(ok=False, message="a later failure")  # a good run happened: the step holds
    sync = step(getting_started(user=boss), "sync")
    assert sync.done and "sync_usage --follow" in sync.lines[0]


def test_a_relay_only_portal_shows_only_the_steps_that_apply(crs, boss, settings):
    checklist = getting_started(user=boss)
    assert set(steps(checklist)) == {"staff", "upstream", "sync", "public_url"}
    assert step(checklist, "upstream").done, step(checklist, "upstream").lines
    assert not step(checklist, "public_url").done  # the fake's loopback address
    settings.CRS_PUBLIC_URL = "https://crs.example.com"
    public = step(getting_started(user=boss), "public_url")
    assert public.done and "https://crs.example.com" in public.lines[0]


def test_a_relays_public_url_set_in_the_admin_is_the_one_people_get(crs, boss, client):
    environment_sync()
    row = Upstream.objects.get(kind=Upstream.Kind.CRS)
    client.force_login(boss)
    response = client.post(change_url(row), env_form(row, public_url="https://crs.example.com"))
    assert response.status_code == 302
    row.refresh_from_db()
    assert endpoint(row).public_url == "https://crs.example.com"
    assert endpoint(row).management_url == crs.url
    assert step(getting_started(user=boss), "public_url").done


def test_a_relay_that_does_not_answer_is_named(crs, boss):
    crs.stop()
    upstream = step(getting_started(user=boss), "upstream")
    assert not upstream.done and "claude-relay-service" in upstream.lines[0]


def test_the_public_url_step_judges_the_value_in_use(fake_proxy, boss, settings):
    environment_sync()
    row = cliproxyapi()
    row.public_url = PUBLIC
    row.save()
    assert step(getting_started(user=boss), "public_url").done
    row.public_url = "http://localhost:8317"
    row.save()
    public = step(getting_started(user=boss), "public_url")
    assert not public.done and "loopback" in public.lines[0]
    assert public.action_url == reverse("admin:pool_upstream_change", args=[row.pk])
    # Set in the environment, loopback: the environment wins and the step says where.
    settings.CLIPROXY_PUBLIC_URL = "http://127.0.0.1:8317"
    public = step(getting_started(user=boss), "public_url")
    assert not public.done and "CLIPROXY_PUBLIC_URL" in " ".join(public.lines)
    assert public.action_url == ""


def test_the_checklist_is_staff_only(client, fake_proxy):
    person = User.objects.create_user("ann@example.com")
    client.force_login(person)
    response = client.get("/admin/")
    assert response.status_code == 302 and b"getting-started" not in response.content


# --- the buttons ------------------------------------------------------------------------------


def sync_now(client, **query: str):
    url = reverse("admin:usage_syncrun_sync")
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return client.post(url, follow=True)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_sync_now_runs_one_sync_and_returns_to_the_index(fake_proxy, boss, client):
    client.force_login(boss)
    response = sync_now(client, next="/admin/")
    assert response.redirect_chain[-1][0] == "/admin/"
    assert SyncRun.objects.filter(ok=True).count() == 1
    assert any("usage records" in m for m in messages_of(response))
    assert 'data-step="sync" data-done="true"' in response.content.decode()


def test_sync_now_while_another_runs_says_so_and_starts_nothing(fake_proxy, boss, client):
    holder = lease_acquire(name=SYNC_LEASE)
    assert holder
    try:
        client.force_login(boss)
        response = sync_now(client, next="/admin/")
    finally:
        lease_release(name=SYNC_LEASE, holder=holder)
    assert response.redirect_chain[-1][0] == "/admin/"
    assert any("Another usage sync is running" in m for m in messages_of(response))
    assert not SyncRun.objects.exists()
    assert fake_proxy.requests_to("/usage-queue") == 0


def test_sync_now_that_fails_says_why(fake_proxy, boss, client, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"
    client.force_login(boss)
    response = sync_now(client, next="/admin/")
    assert response.redirect_chain[-1][0] == "/admin/"
    failure = [m for m in messages_of(response) if m.startswith("The usage sync failed:")]
    assert failure and "wrong-key" not in failure[0]
    assert SyncRun.objects.get().ok is False


def test_sync_now_never_returns_off_site_and_get_runs_nothing(fake_proxy, boss, client):
    client.force_login(boss)
    response = client.post(reverse("admin:usage_syncrun_sync") + "?next=https://evil.example/")
    assert response["Location"] == reverse("admin:usage_syncrun_changelist")
    SyncRun.objects.all().delete()
    response = client.get(reverse("admin:usage_syncrun_sync") + "?next=/admin/")
    assert response.status_code == 302 and not SyncRun.objects.exists()


def test_sync_now_is_staff_only(fake_proxy, client):
    client.force_login(User.objects.create_user("ann@example.com"))
    response = client.post(reverse("admin:usage_syncrun_sync") + "?next=/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not SyncRun.objects.exists()


def test_the_pool_button_fills_the_pool_and_returns_to_the_index(fake_proxy, boss, client,
                                                                 settings):
    settings.PORTAL_POOL_MIN, settings.PORTAL_POOL_TARGET = 3, 6
    client.force_login(boss)
    response = client.post(reverse("admin:pool_apikey_reconcile") + "?next=/admin/", follow=True)
    assert response.redirect_chain[-1][0] == "/admin/"
    assert ApiKey.objects.filter(status=ApiKey.Status.POOL,
                                 proxy_state=ApiKey.ProxyState.PUSHED).count() == 6
    assert len(fake_proxy.api_keys) == 6
    assert 'data-step="pool" data-done="true"' in response.content.decode()


# --- the public URL of an environment upstream, set in the admin ------------------------------


def change_url(row: Upstream) -> str:
    return reverse("admin:pool_upstream_change", args=[row.pk])


def env_form(row: Upstream, **fields: str) -> dict[str, str]:
    return {"name": row.name, "open_to_everyone": "on", "enabled": "on", **fields}


def test_staff_set_the_public_url_of_an_environment_upstream(fake_proxy, boss, client):
    environment_sync()
    row = cliproxyapi()
    client.force_login(boss)
    page = client.get(change_url(row)).content.decode()
    assert 'name="public_url"' in page and "CLIPROXY_PUBLIC_URL is not set" in page
    response = client.post(change_url(row), env_form(row, public_url=PUBLIC + "/"))
    assert response.status_code == 302, response.content.decode()[:2000]
    row.refresh_from_db()
    assert row.public_url == PUBLIC
    assert row.management_url == fake_proxy.url  # the rest still from the environment
    key = pool_keys_create(count=1)[0]
    assert public_url(key) == PUBLIC


def test_the_settings_default_public_url_counts_as_unset(fake_proxy, boss, client, settings):
    # keyportal.settings fills an unset CLIPROXY_PUBLIC_URL with CLIPROXY_URL.
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    environment_sync()
    row = cliproxyapi()
    assert not step(getting_started(user=boss), "public_url").done
    client.force_login(boss)
    assert 'name="public_url"' in client.get(change_url(row)).content.decode()
    client.post(change_url(row), env_form(row, public_url=PUBLIC))
    assert public_url(pool_keys_create(count=1)[0]) == PUBLIC
    assert step(getting_started(user=boss), "public_url").done


def test_a_public_url_that_is_not_http_is_refused(fake_proxy, boss, client):
    environment_sync()
    row = cliproxyapi()
    client.force_login(boss)
    response = client.post(change_url(row), env_form(row, public_url="ftp://relay.example.com"))
    assert response.status_code == 200 and "Give an http:// or https:// address." in (
        response.content.decode())
    row.refresh_from_db()
    assert row.public_url == ""


def test_the_environments_public_url_wins_and_the_page_says_so(fake_proxy, boss, client,
                                                                settings):
    settings.CLIPROXY_PUBLIC_URL = PUBLIC
    environment_sync()
    row = cliproxyapi()
    client.force_login(boss)
    page = client.get(change_url(row)).content.decode()
    assert 'name="public_url"' not in page
    assert f"{PUBLIC} (set by CLIPROXY_PUBLIC_URL in the environment, which wins)" in page
    client.post(change_url(row), env_form(row, public_url="https://other.example.com"))
    row.refresh_from_db()
    assert row.public_url == ""
    assert public_url(pool_keys_create(count=1)[0]) == PUBLIC


def test_saving_an_upstream_forgets_the_checklists_cached_look(fake_proxy, boss, client):
    environment_sync()
    row = cliproxyapi()
    getting_started(user=boss)
    client.force_login(boss)
    client.post(change_url(row), env_form(row, public_url=PUBLIC))
    before = fake_proxy.requests_to("/usage-statistics-enabled")
    getting_started(user=boss)
    assert fake_proxy.requests_to("/usage-statistics-enabled") == before + 1


def test_a_command_in_a_step_is_shown_as_code_and_the_rest_escaped():
    from usage.templatetags.usage_tags import commands

    assert commands("Run `manage.py sync_usage` <now>") == (
        "Run <code>manage.py sync_usage</code> &lt;now&gt;")
    assert commands("a `<b>` c") == "a <code>&lt;b&gt;</code> c"
    assert commands("odd ` one") == "odd ` one"
