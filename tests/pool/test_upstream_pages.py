"""Pages and the admin with several upstreams: the Upstream admin (write-only secret,
environment rows read-only, one CLIProxyAPI), the upstream picker on /my-keys and the
registration link, each key's upstream shown, snippets and the key test at the key's own
upstream, and a relay-only portal's staff pages (no pool, no CLIProxyAPI pages)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.test import RequestFactory

from accounts.models import User
from pool.models import ApiKey, Upstream, UpstreamAccount, key_digest
from pool.services import IssuedKey
from pool.upstreams.crs import CrsClient
from pool.views import key_shown
from tests.accounts.mailbox import emailed_path
from tests.fakes.crs import MODEL, PASSWORD, USERNAME, FakeCrs

pytestmark = pytest.mark.django_db
Kind = Upstream.Kind
Status = ApiKey.Status


@pytest.fixture
def crs() -> Iterator[FakeCrs]:
    fake = FakeCrs().start()
    yield fake
    fake.stop()


@pytest.fixture
def boss(client) -> User:
    boss = User.objects.create_superuser("boss@example.com", "a-long-password-1")
    client.force_login(boss)
    return boss


def crs_row(url: str, **extra) -> Upstream:
    return Upstream.objects.create(
        name=extra.pop("name", "team CRS"), kind=Kind.CRS, management_url=url,
        public_url=extra.pop("public_url", "https://crs.example.com"), username=USERNAME,
        secret=PASSWORD, **extra)


def relay_key(owner: User, upstream: Upstream, value: str = "cr_" + "ab" * 32,
              remote_id: str = "kid-1") -> ApiKey:
    return ApiKey.objects.create(
        owner=owner, label="laptop", status=Status.ACTIVE, proxy_state=ApiKey.ProxyState.PUSHED,
        upstream=upstream, remote_id=remote_id, key_hash=key_digest(value), prefix=value[:6],
        last4=value[-4:])


def radios(page: str) -> list[str]:
    """The upstream picker's choices, as labelled."""
    return re.findall(r'<input type="radio" name="upstream" value="\d+"[^>]*>\s*([^<]+)</label>',
                      page)


# --- the admin ----------------------------------------------------------------------------------


def add_form(**fields) -> dict:
    return {"name": "team CRS", "kind": "crs", "management_url": "http://127.0.0.1:9",
            "public_url": "https://crs.example.com", "username": USERNAME,
            "secret_new": PASSWORD, "open_to_everyone": "on", "enabled": "on", **fields}


def test_staff_add_a_relay_with_a_write_only_secret(client, boss, crs):
    response = client.post("/admin/pool/upstream/add/", add_form(management_url=crs.url + "/"),
                           follow=True)
    page = response.content.decode()
    assert response.status_code == 200 and PASSWORD not in page
    upstream = Upstream.objects.get()
    assert (upstream.kind, upstream.management_url, upstream.secret) == (
        Kind.CRS, crs.url, PASSWORD)
    # Saving says how the relay answers (never blocking the save), whatever it said.
    said = page.lower()  # the admin capitalises its messages
    assert "team crs answers" in said or "team crs does not answer as expected" in said
    change = client.get(f"/admin/pool/upstream/{upstream.pk}/change/").content.decode()
    assert PASSWORD not in change and "stored (sealed)" in change
    assert 'name="secret_new"' in change and 'type="password"' in change

    kept = client.post(f"/admin/pool/upstream/{upstream.pk}/change/",
                       add_form(management_url=crs.url, secret_new="", name="renamed"))
    assert kept.status_code == 302
    upstream.refresh_from_db()
    assert upstream.name == "renamed" and upstream.secret == PASSWORD  # blank: kept
    listed = client.get("/admin/pool/upstream/").content.decode()
    assert "renamed" in listed and "everyone" in listed and PASSWORD not in listed


@pytest.mark.parametrize("fields, error", [
    ({"management_url": "ftp://127.0.0.1/x"}, "Give an http:// or https:// address."),
    ({"public_url": "ftp://crs.example.com"}, "Give an http:// or https:// address."),
    ({"secret_new": ""}, "Give the secret"),
    ({"username": ""}, "claude-relay-service needs the admin username"),
])
def test_an_upstream_form_refuses_what_cannot_work(client, boss, fields, error):
    response = client.post("/admin/pool/upstream/add/", add_form(**fields))
    assert response.status_code == 200 and error in response.content.decode()
    assert not Upstream.objects.exists()


def test_a_second_cliproxyapi_is_refused_in_plain_words(client, boss, settings):
    Upstream.objects.create(name="the proxy", kind=Kind.CLIPROXYAPI,
                            management_url="http://127.0.0.1:8317", secret="k")
    response = client.post("/admin/pool/upstream/add/", add_form(kind="cliproxyapi",
                                                                 name="another", username=""))
    page = response.content.decode()
    assert response.status_code == 200 and "at most one" in page and "the proxy" in page
    assert Upstream.objects.count() == 1
    Upstream.objects.all().delete()
    settings.CLIPROXY_URL = "http://127.0.0.1:8317"  # the environment's counts too
    response = client.post("/admin/pool/upstream/add/", add_form(kind="cliproxyapi",
                                                                 name="another", username=""))
    assert "at most one" in response.content.decode() and "CLIPROXY_URL" in response.content.decode()


def test_a_cliproxyapi_added_in_the_admin_is_health_checked_on_save(client, boss, fake_proxy,
                                                                      settings):
    settings.CLIPROXY_URL = ""  # the proxy is added in the admin, not the environment
    response = client.post("/admin/pool/upstream/add/", add_form(
        kind="cliproxyapi", name="proxy", management_url=fake_proxy.url, username="",
        secret_new=fake_proxy.management_key), follow=True)
    assert "proxy answers: it answers with the management key." in response.content.decode().lower()
    response = client.post(f"/admin/pool/upstream/{Upstream.objects.get().pk}/change/",
                           add_form(name="proxy", management_url="http://127.0.0.1:9",
                                    username="", secret_new=""), follow=True)
    assert "does not answer as expected" in response.content.decode()  # saved all the same
    assert Upstream.objects.get().management_url == "http://127.0.0.1:9"


def test_environment_upstreams_are_listed_with_their_address_read_only(client, boss, settings):
    settings.CRS_URL = "http://127.0.0.1:3999"
    settings.CRS_ADMIN_USERNAME = "envadmin"
    settings.CRS_ADMIN_PASSWORD = "env-secret-password"
    listed = client.get("/admin/pool/upstream/").content.decode()
    upstream = Upstream.objects.get()
    assert upstream.from_environment and "http://127.0.0.1:3999" in listed
    change = client.get(f"/admin/pool/upstream/{upstream.pk}/change/").content.decode()
    assert "come from the environment" in change and "CRS_ADMIN_PASSWORD" in change
    assert 'name="management_url"' not in change and 'name="secret_new"' not in change
    assert "env-secret-password" not in change and "envadmin" in change
    response = client.post(f"/admin/pool/upstream/{upstream.pk}/change/",
                           {"name": "our CRS", "enabled": "on"})
    assert response.status_code == 302
    upstream.refresh_from_db()
    assert upstream.name == "our CRS" and not upstream.open_to_everyone
    assert upstream.management_url == "http://127.0.0.1:3999" and upstream.secret is None
    delete = client.get(f"/admin/pool/upstream/{upstream.pk}/delete/")
    assert delete.status_code == 403  # it would come back from the environment


def test_key_and_person_admin_show_the_upstream(client, boss, ann):
    upstream = crs_row("http://127.0.0.1:9")
    relay_key(ann, upstream)
    UpstreamAccount.objects.create(upstream=upstream, person=ann, remote_id="42")
    listed = client.get("/admin/pool/apikey/").content.decode()
    assert "team CRS" in listed and f"upstream__id__exact={upstream.pk}" in listed
    only = client.get("/admin/pool/apikey/", {"upstream__id__exact": upstream.pk})
    assert only.content.decode().count('class="field-masked"') == 1
    person = client.get(f"/admin/accounts/user/{ann.pk}/change/").content.decode()
    assert "accounts at upstreams" in person.lower() and "team CRS (id 42)" in person


# --- people's pages -----------------------------------------------------------------------------


def test_with_one_upstream_there_is_nothing_to_pick(client, ann, fake_proxy, ready_keys):
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    assert 'name="upstream"' not in page


def test_with_several_open_upstreams_the_person_picks(client, ann, fake_proxy, ready_keys):
    crs_row("http://127.0.0.1:9")
    closed = crs_row("http://127.0.0.1:9", name="closed CRS", open_to_everyone=False)
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    assert [c.strip() for c in radios(page)] == [
        "team CRS (claude-relay-service)", "CLIProxyAPI (CLIProxyAPI)"] or [
        c.strip() for c in radios(page)] == [
        "CLIProxyAPI (CLIProxyAPI)", "team CRS (claude-relay-service)"]
    assert "closed CRS" not in page

    refused = client.post("/my-keys/add", {"label": "x", "upstream": closed.pk})
    assert refused.status_code == 400 and not ApiKey.objects.filter(owner=ann).exists()

    proxy_row = Upstream.objects.get(kind=Kind.CLIPROXYAPI)
    shown = client.post("/my-keys/add", {"label": "laptop", "upstream": proxy_row.pk}, follow=True)
    assert shown.status_code == 200
    key = ApiKey.objects.get(owner=ann)
    assert key.upstream_id is None and key.status == Status.ACTIVE  # a pool key
    assert "This key works at CLIProxyAPI" in shown.content.decode()

    closed.open_to.add(ann)  # opened to her by staff: now hers to pick
    assert "closed CRS" in client.get("/my-keys").content.decode()


def test_the_registration_link_offers_the_upstreams_open_to_everyone(
    client, fake_proxy, ready_keys
):
    crs_row("http://127.0.0.1:9")
    crs_row("http://127.0.0.1:9", name="closed CRS", open_to_everyone=False)
    client.post("/register", {"email": "new@example.com", "name": "New", "label": "laptop"})
    path = emailed_path()
    page = client.get(path).content.decode()
    assert len(radios(page)) == 2 and "closed CRS" not in page
    closed = Upstream.objects.get(name="closed CRS")
    assert client.post(path, {"upstream": closed.pk}).status_code == 400
    assert not User.objects.filter(email="new@example.com").exists()
    proxy_row = Upstream.objects.get(kind=Kind.CLIPROXYAPI)
    response = client.post(path, {"upstream": proxy_row.pk}, follow=True)
    assert response.status_code == 200 and 'id="key-value"' in response.content.decode()
    assert ApiKey.objects.get(owner__email="new@example.com").upstream_id is None


def test_each_key_shows_its_upstream(client, ann, live_key):
    upstream = crs_row("http://127.0.0.1:9")
    mine = relay_key(ann, upstream)
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    cells = re.findall(r'<td class="upstream" data-label="Upstream">([^<]*)</td>', page)
    assert sorted(cells) == ["CLIProxyAPI", "team CRS"]
    detail = client.get(f"/my-keys/{mine.pk}").content.decode()
    assert "at team CRS" in detail
    response = client.post("/api/my-keys", content_type="application/json", data={})
    assert sorted(k["upstream"] for k in response.json()["keys"]) == ["CLIProxyAPI", "team CRS"]


def snippets_for(key: ApiKey, value: str) -> str:
    request = RequestFactory().get("/")
    request.user = key.owner
    request.htmx = False
    return key_shown(request, IssuedKey(key=key, value=value), "pool/key_shown.html").content.decode()


def test_a_crs_key_gets_its_relays_addresses_and_paths(ann):
    key = relay_key(ann, crs_row("http://127.0.0.1:9", public_url="https://crs.example.com/"))
    page = snippets_for(key, "cr_" + "ab" * 32)
    assert "export ANTHROPIC_BASE_URL=https://crs.example.com/api\n" in page
    assert '"ANTHROPIC_BASE_URL": "https://crs.example.com/api"' in page
    assert 'base_url = "https://crs.example.com/openai"' in page  # Codex: /openai/responses
    assert 'base_url = "https://crs.example.com/openai/v1"' in page  # OpenAI-style chat
    assert "GOOGLE_GEMINI_BASE_URL=https://crs.example.com/gemini" in page
    assert "curl https://crs.example.com/api/v1/models" in page
    assert '<code id="snippet-chat-host">https://crs.example.com/openai</code>' in page
    assert "This key works at team CRS" in page and "Asks team CRS which models" in page
    detail_urls = re.findall(r"<dd><code>([^<]+)</code></dd>", page)
    assert detail_urls == []  # the addresses list belongs to the key page, not this one


def test_a_cch_key_gets_its_paths(client, ann):
    cch = Upstream.objects.create(name="hub", kind=Kind.CCH, management_url="http://127.0.0.1:9",
                                  public_url="https://hub.example.com", secret="t")
    key = relay_key(ann, cch, value="sk-" + "cd" * 24)
    page = snippets_for(key, "sk-" + "cd" * 24)
    assert "export ANTHROPIC_BASE_URL=https://hub.example.com\n" in page
    assert 'base_url = "https://hub.example.com/v1"' in page
    assert "GOOGLE_GEMINI_BASE_URL=https://hub.example.com\n" in page  # it serves /v1beta
    assert "curl https://hub.example.com/v1/models" in page
    client.force_login(ann)
    detail = client.get(f"/my-keys/{key.pk}").content.decode()
    assert "<dd><code>https://hub.example.com</code></dd>" in detail
    assert "<dd><code>https://hub.example.com/v1</code></dd>" in detail
    assert "Gemini CLI" in detail


def test_an_upstream_without_a_tool_leaves_its_snippet_out(ann, monkeypatch):
    from pool import views

    paths = {**views._PATHS, Upstream.Kind.CCH: {**views._PATHS[Upstream.Kind.CCH],
                                                 "gemini": None}}
    monkeypatch.setattr(views, "_PATHS", paths)
    cch = Upstream.objects.create(name="hub", kind=Kind.CCH, management_url="http://127.0.0.1:9",
                                  public_url="https://hub.example.com", secret="t")
    page = snippets_for(relay_key(ann, cch, value="sk-" + "cd" * 24), "sk-" + "cd" * 24)
    assert "GOOGLE_GEMINI_BASE_URL" not in page and "Codex CLI" in page


def test_the_key_page_of_a_pool_key_keeps_the_proxys_addresses(client, live_key, settings):
    key, _ = live_key
    settings.CLIPROXY_PUBLIC_URL = "https://proxy.example.com"
    client.force_login(key.owner)
    detail = client.get(f"/my-keys/{key.pk}").content.decode()
    assert "at CLIProxyAPI" in detail
    for url in ("https://proxy.example.com", "https://proxy.example.com/v1"):
        assert f"<dd><code>{url}</code></dd>" in detail


def test_a_relay_key_is_tested_at_its_own_relay(client, ann, crs, settings):
    settings.CLIPROXY_URL = ""  # no CLIProxyAPI at all: the test must not need one
    upstream = crs_row(crs.url)
    admin = CrsClient(crs.url, USERNAME, PASSWORD, timeout=5)
    try:
        made = admin.create_key(name="ann laptop")
    finally:
        admin.session.close()
    key = relay_key(ann, upstream, value=made.value, remote_id=made.id)
    client.force_login(ann)
    body = client.post("/my-keys/test-key", {"key": made.value}).content.decode()
    assert f"<code>{MODEL}</code>" in body and made.value not in body
    crs.keys[made.id]["isActive"] = False  # switched off at the relay
    body = client.post("/my-keys/test-key", {"key": made.value}).content.decode()
    assert "know this key" in body and key.masked in body


# --- a portal with claude-relay-service only ---------------------------------------------------


@pytest.fixture
def relay_only(settings, crs) -> FakeCrs:
    settings.CLIPROXY_URL = ""
    settings.CRS_URL = crs.url
    settings.CRS_ADMIN_USERNAME = USERNAME
    settings.CRS_ADMIN_PASSWORD = PASSWORD
    settings.CRS_PUBLIC_URL = "https://crs.example.com"
    return crs


def test_a_relay_only_portal_has_no_pool_alerts_nor_proxy_pages(client, boss, relay_only,
                                                                settings):
    settings.PORTAL_POOL_MIN = 5  # an empty pool would be "below the low-water mark"
    index = client.get("/admin/").content.decode()
    assert 'data-dash="pool"' not in index and 'data-alert="pool-low"' not in index
    assert "/staff/proxy/settings" not in index and "/admin/pool/upstream/" in index
    for path in ("/staff/proxy/settings", "/staff/proxy/upstreams", "/staff/proxy/auth-files"):
        page = client.get(path).content.decode()
        assert 'id="no-cliproxyapi"' in page and "has none" in page
    status = client.get("/staff/proxy").content.decode()
    assert 'id="no-cliproxyapi"' in status and "The key pool" not in status
    row = status.split('data-upstream="claude-relay-service"', 1)[1].split("</tr>", 1)[0]
    assert "claude-relay-service" in row and "https://crs.example.com" in row
    assert PASSWORD not in status


def test_a_portal_with_nothing_declared_keeps_its_proxy_pages(client, boss, settings):
    settings.PORTAL_POOL_MIN = 5
    index = client.get("/admin/").content.decode()
    assert 'data-alert="pool-low"' in index and "/staff/proxy/settings" in index
    assert "No proxy is configured" in client.get("/staff/proxy").content.decode()


def test_register_key_names_an_upstream_open_to_the_person(client, ann, fake_proxy, ready_keys):
    crs_row("http://127.0.0.1:9", name="closed CRS", open_to_everyone=False)
    client.force_login(ann)
    refused = client.post("/api/register-key", content_type="application/json",
                          data={"label": "ci", "upstream": "closed CRS"})
    assert refused.status_code == 400 and "No upstream of that name" in refused.json()["error"]
    made = client.post("/api/register-key", content_type="application/json",
                       data={"label": "ci", "upstream": "CLIProxyAPI"})
    assert made.status_code == 201 and made.json()["upstream"] == "CLIProxyAPI"
    assert made.json()["openai_base_url"].endswith("/v1")


def test_the_export_names_each_keys_upstream(client, boss, ann, live_key):
    from datetime import datetime, timezone as tz

    from usage.models import UsageSnapshot

    key, _ = live_key
    relay = relay_key(ann, crs_row("http://127.0.0.1:9"))
    for each in (key, relay):
        UsageSnapshot.objects.create(api_key=each, model="m", hour=datetime(2026, 3, 1, 2,
                                     tzinfo=tz.utc), requests=1, input_tokens=1, total_tokens=1)
    body = b"".join(client.get("/staff/export", {"from": "2026-03-01", "to": "2026-03-01"})
                    .streaming_content).decode()
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(body.lstrip("\ufeff"))))
    assert sorted(r["upstream"] for r in rows) == ["CLIProxyAPI", "team CRS"]


def test_on_a_relay_only_portal_a_person_with_no_upstream_open_is_told_so(client, ann,
                                                                        relay_only):
    from django.core import mail

    from pool.upstreams.registry import upstreams

    upstreams().update(open_to_everyone=False)  # the environment's CRS, closed to Ann
    client.force_login(ann)
    page = client.get("/my-keys").content.decode()
    assert 'name="upstream"' not in page
    refused = client.post("/my-keys/add", {"label": "x"})
    assert refused.status_code == 403 and "No upstream is open to you" in refused.content.decode()
    api = client.post("/api/register-key", content_type="application/json", data={"label": "x"})
    assert api.status_code == 403 and "No upstream is open to you" in api.json()["error"]
    assert not ApiKey.objects.exists() and not mail.outbox  # no "pool empty" alert to staff
    assert relay_only.admin_requests == []  # nothing asked of the relay


def test_the_upstream_list_counts_keys_held_and_people_opened_to(client, boss, ann, bob,
                                                              django_assert_num_queries):
    upstream = crs_row("http://127.0.0.1:9", open_to_everyone=False)
    upstream.open_to.add(ann, bob)
    relay_key(ann, upstream)
    relay_key(bob, upstream, value="cr_" + "ef" * 32, remote_id="kid-2")
    gone = relay_key(ann, upstream, value="cr_" + "01" * 32, remote_id="kid-3")
    ApiKey.objects.filter(pk=gone.pk).update(status=Status.REVOKED)
    # session, user, the count, the rows with their two counts, the filters' choices; the
    # environment declares nothing (no query for it)
    with django_assert_num_queries(5):
        page = client.get("/admin/pool/upstream/").content.decode()
    row = page.split('class="field-kind"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="field-open_to_whom">2 people</td>' in row
    assert '<td class="field-key_count">2</td>' in row


def test_the_key_list_of_a_relay_only_portal_reconciles_the_relays_and_offers_no_pool(
    client, boss, relay_only
):
    page = client.get("/admin/pool/apikey/").content.decode()
    assert "Generate pool keys" not in page and "Pool:" not in page and "Reconcile now" in page
    pytest.importorskip("pool.upstreams.crs_driver", reason="the CRS driver (branch crsw)")
    response = client.post("/admin/pool/apikey/reconcile/", follow=True)
    said = response.content.decode().lower()  # the admin capitalises its messages
    # The relay's report line, never the CLIProxyAPI's "not configured".
    assert "claude-relay-service: 0 keys removed" in said and "cliproxy_url" not in said


def test_the_proxy_page_waits_for_a_slow_relay_only_within_its_budget(client, boss, settings,
                                                                     monkeypatch):
    """A relay whose health question never ends (until the test lets it) is shown as slow:
    the page does not wait for it past PORTAL_REQUEST_PROXY_BUDGET, and the others are shown
    with their own answer."""
    import threading

    from pool import selectors
    from pool.upstreams.base import Health

    released = threading.Event()
    asked = threading.Event()

    class Stuck:
        def __init__(self, upstream):
            self.upstream = upstream

        def health(self):
            if self.upstream.name == "slow":
                asked.set()
                released.wait(30)
                return Health(True, "late")
            return Health(True, "It answers with the admin username and password.")

        def close(self):
            pass

    monkeypatch.setattr(selectors, "driver_for", Stuck)
    settings.PORTAL_REQUEST_PROXY_BUDGET = 0.5
    crs_row("http://127.0.0.1:9", name="slow")
    crs_row("http://127.0.0.1:9", name="quick")
    try:
        page = client.get("/staff/proxy").content.decode()
    finally:
        released.set()
    assert asked.is_set()
    slow = page.split('data-upstream="slow"', 1)[1].split("</tr>", 1)[0]
    quick = page.split('data-upstream="quick"', 1)[1].split("</tr>", 1)[0]
    assert "did not answer within 0.5 seconds" in slow and "late" not in slow
    assert '<span class="ok">yes</span>' in quick and "admin username and password" in quick
