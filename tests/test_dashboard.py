"""The admin index dashboard: today against yesterday, the 30-day trend, top people and
models, cache-hit share, the pool against its low-water mark, the last sync, its lag and
backlog, each upstream's last known health (never asked on every load), unpriced models
seen, alerts; in a constant number of queries."""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.utils import timezone

from accounts.models import User
from pool.models import ApiKey, Upstream
from pool.services import IMPLAUSIBLE_NOTIFIED, pool_keys_create
from pool.upstream import ProxyClient
from tests.usage.conftest import issue, served
from usage.models import ModelPrice, QuarantinedRecord, SyncRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def boss(db) -> User:
    return User.objects.create_superuser("boss@example.com", "a-long-password-1")


def dashboard_of(page: str) -> str:
    return page.split('id="dashboard"', 1)[1].split('id="staff-pages"', 1)[0]


def cell(part: str, name: str) -> str:
    """The content of the element marked data-dash=name (a card's figure or a table cell)."""
    rest = part.split(f'data-dash="{name}">', 1)[1]
    return min(rest.split("</td>", 1)[0], rest.split("</strong>", 1)[0], key=len)


def test_todays_numbers_pool_and_last_sync(client, boss, settings):
    settings.PORTAL_POOL_MIN = 5
    ann, bob = issue(2, ["ann@example.com", "bob@example.com"])
    pool_keys_create(count=3)  # unissued
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    now = timezone.now()
    served(ann.key, at=now, requests=2, input_tokens=1_000_000, output_tokens=0)
    served(bob.key, at=now, model="internal-llm-7b", requests=3, input_tokens=10,
           output_tokens=0)
    served(bob.key, at=now - timedelta(days=2), requests=7)  # not today
    SyncRun.objects.create(started_at=now - timedelta(minutes=3), finished_at=now, ok=False,
                           message="proxy unreachable")
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())

    assert cell(part, "requests") == "5"
    assert cell(part, "tokens") == "2,000,030"
    assert "≥ $2.00" in cell(part, "cost")  # internal-llm-7b has no price
    assert cell(part, "pool").startswith("3 (") and "low-water mark 5" in cell(part, "pool")
    assert "below the low-water mark" in part and 'data-alert="pool-low"' in part
    assert "failed" in cell(part, "sync") and "proxy unreachable" in cell(part, "sync")
    assert 'data-alert="sync-failed"' in part
    unpriced = part.split('data-alert="unpriced">', 1)[1].split("</td>", 1)[0]
    assert "<code>internal-llm-7b</code>" in unpriced and "mock-gpt" not in unpriced
    assert "/admin/usage/modelprice/add/?model=internal-llm-7b" in unpriced  # one click


def test_a_model_priced_since_is_no_longer_called_unpriced(client, boss):
    (ann,) = issue(1, ["ann@example.com"])
    served(ann.key, at=timezone.now(), model="new-model", requests=1)
    client.force_login(boss)
    assert "<code>new-model</code>" in dashboard_of(client.get("/admin/").content.decode())
    ModelPrice.objects.create(model="new-*", input=Decimal("1"), output=Decimal("1"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    part = dashboard_of(client.get("/admin/").content.decode())
    assert 'data-alert="unpriced"' not in part
    assert 'data-model="new-model"' in part  # still among the top models, of course


def test_a_quiet_day_says_nothing_needs_attention(client, boss, settings):
    settings.PORTAL_POOL_MIN = 0
    SyncRun.objects.create(started_at=timezone.now(), finished_at=timezone.now(), ok=True)
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert "Nothing needs attention." in part and "data-alert" not in part
    assert cell(part, "requests") == "0" and "ok" in cell(part, "sync")


def test_quarantine_the_401_latch_and_a_refused_key_list_raise_alerts(client, boss, settings):
    settings.CLIPROXY_URL = "http://127.0.0.1:9"
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong"
    QuarantinedRecord.objects.create(source="queue", reason="negative tokens")
    with ProxyClient.from_settings() as proxy:
        cache.set(proxy.refusal_cache_key, {"status": 401, "message": "refused"}, 600)
    cache.set(IMPLAUSIBLE_NOTIFIED, True, 600)
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert 'data-alert="quarantined"' in part and "1 usage record set aside" in part
    assert 'data-alert="proxy-refused"' in part
    assert 'data-alert="key-list-refused"' in part


def test_a_person_or_a_link_session_never_sees_the_dashboard(client):
    person = User.objects.create_user("ann@example.com")
    client.force_login(person)
    response = client.get("/admin/")
    assert response.status_code == 302 and b"dashboard" not in response.content


@pytest.mark.parametrize("people", [1, 12])
def test_the_index_costs_the_same_queries_however_much_usage(
    client, boss, django_assert_num_queries, people
):
    for n, held in enumerate(issue(people, [f"p{i}@example.com" for i in range(people)])):
        served(held.key, at=timezone.now(), model=f"model-{n}", requests=n + 1)
    ApiKey.objects.update(limit_tokens_day=None)
    client.force_login(boss)
    client.get("/admin/")  # the checklist's look at the upstreams, cached for a minute
    # session, user, the model × day rollup (today, yesterday, trend, top models, cache
    # share), pool counts, the upstreams, the cache (flags and last known health, one read),
    # the sync backlog (two), the last good sync, the last sync, unpriced models, the price
    # book, top people (with their emails), and the admin's own "recent actions" (a
    # superuser needs no permission reads); the getting-started checklist: the upstreams,
    # the cached probe, pool counts, the last sync
    with django_assert_num_queries(18):
        response = client.get("/admin/")
    assert response.status_code == 200


def test_seed_demo_fills_an_empty_database_once(client, settings):
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.PORTAL_POOL_MIN = 20
    out = StringIO()
    call_command("seed_demo", "--staff-password", "a-long-password-1", "--days", "3",
                 stdout=out)
    assert "4 people, 8 keys" in out.getvalue()
    with pytest.raises(CommandError, match="only fills an empty database"):
        call_command("seed_demo", "--staff-password", "x", stdout=StringIO())
    client.force_login(User.objects.get(email="staff@example.com"))
    part = dashboard_of(client.get("/admin/").content.decode())
    assert "<code>internal-llm-7b</code>" in part and 'data-alert="pool-low"' in part


# --- the figures, by hand ---------------------------------------------------------------------


def price(model: str, *, input: str, output: str) -> None:
    ModelPrice.objects.create(model=model, input=Decimal(input), output=Decimal(output),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))


def local_noon(days_ago: int) -> datetime:
    day = timezone.localdate() - timedelta(days=days_ago)
    return datetime.combine(day, time(12), tzinfo=timezone.get_default_timezone())


@pytest.fixture
def month_of_usage(db):
    """Ann, Bob and Carol over 40 days; the figures below are worked out from these rows.

    today        Ann  mock-gpt  6 requests × (100,000 in + 50,000 out)  = 900,000 tokens, $1.20
    yesterday    Bob  cheap     4 requests × (100,000 in + 50,000 out)  = 600,000 tokens, $0.40
    3 days ago   Ann  free-llm  1 request  × 5,000,000 in               = 5,000,000, no price
    5 days ago   Bob  mock-gpt  1 request  × 1,000,000 in               = 1,000,000 tokens, $1.00
    40 days ago  Carol mock-gpt 100 requests (outside every 30-day figure)
    """
    price("mock-gpt", input="1", output="2")
    price("cheap", input="0.5", output="1")
    ann, bob, carol = issue(3, ["ann@example.com", "bob@example.com", "carol@example.com"])
    served(ann.key, at=timezone.now(), requests=6, input_tokens=100_000, output_tokens=50_000)
    served(bob.key, at=local_noon(1), model="cheap", requests=4, input_tokens=100_000,
           output_tokens=50_000)
    served(ann.key, at=local_noon(3), model="free-llm", requests=1, input_tokens=5_000_000,
           output_tokens=0)
    served(bob.key, at=local_noon(5), requests=1, input_tokens=1_000_000, output_tokens=0)
    served(carol.key, at=local_noon(40), requests=100, input_tokens=1_000_000, output_tokens=0)
    return ann.key.owner, bob.key.owner, carol.key.owner


def change(part: str, name: str) -> str:
    return part.split(f'data-change="{name}">', 1)[1].split("</span>", 1)[0]


def test_today_against_yesterday_in_words(client, boss, month_of_usage):
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert cell(part, "requests") == "6" and change(part, "requests") == "+50 % vs yesterday"
    assert cell(part, "tokens") == "900,000" and change(part, "tokens") == "+50 % vs yesterday"
    assert cell(part, "cost") == "$1.20" and change(part, "cost") == "+200 % vs yesterday"
    assert "$0.40" in cell(part, "cost-yesterday")


def test_less_than_yesterday_and_nothing_yesterday(client, boss):
    price("mock-gpt", input="1", output="0")
    (ann,) = issue(1, ["ann@example.com"])
    served(ann.key, at=local_noon(1), requests=4, input_tokens=10, output_tokens=0)
    served(ann.key, at=timezone.now(), requests=1, input_tokens=10, output_tokens=0)
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    assert change(part, "requests") == "−75 % vs yesterday"
    ann.key.usage.all().delete()
    from usage.models import UsageModelDay

    UsageModelDay.objects.filter(day=timezone.localdate() - timedelta(days=1)).delete()
    part = dashboard_of(client.get("/admin/").content.decode())
    assert change(part, "requests") == "none yesterday"


def test_the_trend_chart_covers_30_days_with_three_measures(client, boss, month_of_usage):
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    chart = part.split('id="dashboard-trend"', 1)[1].split("</section>", 1)[0]
    assert [m for m in ("requests", "tokens", "cost") if f'data-measure="{m}"' in chart] == [
        "requests", "tokens", "cost"]
    total = chart.split('class="chart-total"', 1)[1]
    assert '<td class="num">12</td>' in total  # 6 + 4 + 1 + 1: Carol's 100 are 40 days old
    assert 'data-total="tokens">7,500,000<' in total
    # Every model of the month in the legend, each once.
    for model in ("mock-gpt", "cheap", "free-llm"):
        assert chart.count(f'<li data-series="{model}">') == 1
    # The person pages' period picker works here too.
    week = dashboard_of(client.get("/admin/?days=7").content.decode())
    assert 'data-total="tokens">7,500,000<' in week  # all of it is within the week
    assert "Since " + (timezone.localdate() - timedelta(days=6)).isoformat() in week


def test_top_people_and_models_by_cost_then_tokens(client, boss, month_of_usage):
    ann, bob, carol = month_of_usage
    client.force_login(boss)
    part = dashboard_of(client.get("/admin/").content.decode())
    people = part.split('id="dash-top-people"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'data-person="(\d+)"', people) == [str(bob.pk), str(ann.pk)]
    bob_row = people.split(f'data-person="{bob.pk}">', 1)[1].split("</tr>", 1)[0]
    assert f'href="/staff/people/{bob.pk}"' in bob_row and "bob@example.com" in bob_row
    assert "1,600,000" in bob_row and "$1.40" in bob_row
    ann_row = people.split(f'data-person="{ann.pk}">', 1)[1].split("</tr>", 1)[0]
    assert "5,900,000" in ann_row and "≥ $1.20" in ann_row  # free-llm has no price
    models = part.split('id="dash-top-models"', 1)[1].split("</table>", 1)[0]
    # free-llm has the most tokens but no known cost: cost ranks first.
    assert re.findall(r'data-model="([^"]+)"', models) == ["mock-gpt", "cheap", "free-llm"]
    mock = models.split('data-model="mock-gpt">', 1)[1].split("</tr>", 1)[0]
    assert ">7<" in mock and "1,900,000" in mock and "$2.20" in mock
    assert "unknown" in models.split('data-model="free-llm">', 1)[1].split("</tr>", 1)[0]


def test_costs_are_shown_in_the_display_currency(client, boss, month_of_usage):
    from usage.currency import USD, Currency, remember
    from usage.models import DisplayCurrency

    DisplayCurrency.objects.create(id=1, code="CNY", rate=Decimal("7"))
    remember(Currency("CNY", Decimal("7")))
    try:
        client.force_login(boss)
        part = dashboard_of(client.get("/admin/").content.decode())
    finally:
        remember(USD)
    assert "¥8.40" in cell(part, "cost")  # $1.20 × 7
    models = part.split('id="dash-top-models"', 1)[1].split("</table>", 1)[0]
    shown = re.sub(r'title="[^"]*"', "", models)  # the dollars stay in the tooltips
    assert "¥15.40" in shown and "$" not in shown  # $2.20 × 7


def ingest_cached(key: ApiKey, *, at: datetime, uncached: int, read: int, write: int) -> None:
    from usage.services import usage_ingest

    utc = at.astimezone(dt_timezone.utc)
    usage_ingest(rows=[[key.key_hash, "mock-gpt", utc.strftime("%Y-%m-%dT%H"), 0, uncached, 10,
                        0, read, write, uncached + 10 + read + write,
                        utc.strftime("%Y-%m-%dT%H:%M:%S.%f000Z"), 0]])


def test_cache_hit_share_over_30_days(client, boss):
    (ann,) = issue(1, ["ann@example.com"])
    client.force_login(boss)
    assert cell(dashboard_of(client.get("/admin/").content.decode()), "cache") == "—"
    ingest_cached(ann.key, at=timezone.now(), uncached=100, read=300, write=100)
    ingest_cached(ann.key, at=local_noon(2), uncached=200, read=300, write=0)
    ingest_cached(ann.key, at=local_noon(45), uncached=0, read=0, write=9_000)  # too old
    # 600 read of 1,000 prompt tokens (100 + 300 + 100 + 200 + 300 + 0)
    assert cell(dashboard_of(client.get("/admin/").content.decode()), "cache") == "60.0 %"


def test_the_model_rollup_is_what_a_rebuild_gives(month_of_usage):
    from usage.models import UsageModelDay, UsageSnapshot
    from usage.rollups import model_days_rebuild

    fields = ("day", "model", "requests", "total_tokens", "cost", "unpriced_requests",
              "incomplete_requests", "input_tokens", "cached_tokens", "cache_creation_tokens")
    incremental = sorted(UsageModelDay.objects.values_list(*fields))
    assert len(incremental) == 4 + 1  # four days in the month, one 40 days ago
    assert model_days_rebuild(snapshot_model=UsageSnapshot,
                              model_day_model=UsageModelDay) == len(incremental)
    assert sorted(UsageModelDay.objects.values_list(*fields)) == incremental


def test_usage_on_an_unissued_pool_key_is_not_in_the_rollup(db):
    from usage.models import UsageModelDay

    (key,) = pool_keys_create(count=1)
    served(key, at=timezone.now(), requests=3)
    assert not UsageModelDay.objects.exists()


# --- sync lag and backlog ---------------------------------------------------------------------


def test_sync_lag_counts_from_the_last_good_sync_and_shows_the_backlog(client, boss):
    from usage.models import UsageBatch

    now = timezone.now()
    SyncRun.objects.create(started_at=now - timedelta(minutes=12),
                           finished_at=now - timedelta(minutes=10), ok=True)
    SyncRun.objects.create(started_at=now - timedelta(minutes=1), finished_at=now, ok=False,
                           message="proxy unreachable")
    UsageBatch.objects.create(record_count=3)  # popped, stored, not counted yet
    QuarantinedRecord.objects.create(source="queue", reason="negative tokens")
    client.force_login(boss)
    lag = cell(dashboard_of(client.get("/admin/").content.decode()), "lag")
    assert "last successful sync finished 10\xa0minutes ago" in lag
    assert "1 stored pop waiting to be counted" in lag and "1 record set aside in all" in lag


def test_no_successful_sync_yet_says_so(client, boss):
    client.force_login(boss)
    assert "no successful sync yet" in cell(
        dashboard_of(client.get("/admin/").content.decode()), "lag")


# --- the pool alert has a button --------------------------------------------------------------


def test_the_pool_low_alert_offers_the_reconcile_button(client, boss, settings):
    settings.PORTAL_POOL_MIN = 5
    client.force_login(boss)
    page = client.get("/admin/").content.decode()
    alert = dashboard_of(page).split('data-alert="pool-low">', 1)[1].split("</td>", 1)[0]
    assert '<form method="post" action="/admin/pool/apikey/reconcile/"' in alert
    assert 'name="csrfmiddlewaretoken"' in alert and "Reconcile now" in alert
    assert "reconcile_keys" not in alert  # no shell command


# --- upstream health: the last known answer, never a call per load ----------------------------


def crs_row(url: str, name: str) -> Upstream:
    return Upstream.objects.create(name=name, kind=Upstream.Kind.CRS, management_url=url,
                                   public_url="https://crs.example.com", username="admin",
                                   secret="a-password")


def health_cell(part: str, upstream: Upstream) -> str:
    return part.split(f'data-upstream="{upstream.pk}">', 1)[1].split("</td>", 1)[0]


@pytest.fixture
def counted_drivers(monkeypatch):
    """The real drivers, counting each health question."""
    from pool import selectors

    asked: list[str] = []
    real = selectors.driver_for

    def counting(upstream):
        asked.append(upstream.name)
        return real(upstream)

    monkeypatch.setattr(selectors, "driver_for", counting)
    return asked


def test_a_relay_that_is_down_is_asked_once_a_minute_not_on_every_load(
    client, boss, counted_drivers
):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    down = crs_row("http://127.0.0.1:9", "team CRS")
    client.force_login(boss)
    first = dashboard_of(client.get("/admin/").content.decode())
    assert counted_drivers == ["team CRS"]
    said = health_cell(first, down)
    assert "not healthy" in said and "checked" in said
    for _ in range(3):
        again = client.get("/admin/")
        assert again.status_code == 200
    assert counted_drivers == ["team CRS"]  # the last known answer, from the cache
    assert "not healthy" in health_cell(dashboard_of(again.content.decode()), down)


def test_a_relay_that_never_answers_costs_one_load_its_budget_once(
    client, boss, settings, monkeypatch
):
    import threading

    from pool import selectors
    from pool.upstreams.base import Health

    released = threading.Event()
    asked: list[str] = []

    class Stuck:
        def __init__(self, upstream):
            self.upstream = upstream

        def health(self):
            asked.append(self.upstream.name)
            released.wait(30)
            return Health(True, "late")

        def close(self):
            pass

    monkeypatch.setattr(selectors, "driver_for", Stuck)
    settings.PORTAL_REQUEST_PROXY_BUDGET = 0.5
    stuck = crs_row("http://127.0.0.1:9", "stuck")
    client.force_login(boss)
    try:
        first = dashboard_of(client.get("/admin/").content.decode())
        second = dashboard_of(client.get("/admin/").content.decode())
    finally:
        released.set()
    assert asked == ["stuck"]
    for part in (first, second):
        said = health_cell(part, stuck)
        assert "did not answer within 0.5 seconds" in said and "late" not in said


def test_a_stale_answer_is_asked_again_once_the_minute_is_over(client, boss, counted_drivers):
    from pool.selectors import HEALTH_CACHE_KEY, HEALTH_REFRESH_LOCK

    down = crs_row("http://127.0.0.1:9", "team CRS")
    client.force_login(boss)
    client.get("/admin/")
    old = (timezone.now() - timedelta(minutes=5)).isoformat()
    cache.set(HEALTH_CACHE_KEY, {down.pk: {"ok": True, "detail": "fine", "at": old}}, 600)
    assert "5\xa0minutes ago" in health_cell(dashboard_of(client.get("/admin/").content.decode()),
                                             down)
    assert counted_drivers == ["team CRS"]  # the lock still holds for this minute
    cache.delete(HEALTH_REFRESH_LOCK)  # the minute is over
    part = dashboard_of(client.get("/admin/").content.decode())
    assert counted_drivers == ["team CRS", "team CRS"]
    assert "not healthy" in health_cell(part, down)


def test_the_proxy_page_refreshes_what_the_dashboard_shows(client, boss, counted_drivers):
    from tests.fakes.crs import PASSWORD, USERNAME, FakeCrs

    fake = FakeCrs().start()
    try:
        up = Upstream.objects.create(name="team CRS", kind=Upstream.Kind.CRS,
                                     management_url=fake.url, public_url="https://x.example",
                                     username=USERNAME, secret=PASSWORD)
        client.force_login(boss)
        assert client.get("/staff/proxy").status_code == 200
        assert counted_drivers == ["team CRS"]
        part = dashboard_of(client.get("/admin/").content.decode())
    finally:
        fake.stop()
    assert counted_drivers == ["team CRS"]  # fresh from the proxy page: not asked again
    assert "answers" in health_cell(part, up)


def test_the_index_costs_the_same_queries_with_upstreams_known(
    client, boss, django_assert_num_queries
):
    from pool.selectors import HEALTH_CACHE_KEY

    rows = [crs_row("http://127.0.0.1:9", f"relay {n}") for n in range(3)]
    now = timezone.now().isoformat()
    cache.set(HEALTH_CACHE_KEY, {u.pk: {"ok": True, "detail": "fine", "at": now} for u in rows},
              600)
    client.force_login(boss)
    client.get("/admin/")  # the checklist's look, cached for a minute (the relays not asked)
    # as in the test above, less the pool counts (a relay-only portal has no pool step)
    with django_assert_num_queries(17):
        response = client.get("/admin/")
    assert response.status_code == 200


# --- in Chinese -------------------------------------------------------------------------------


def test_the_dashboard_in_simplified_chinese(client, boss, month_of_usage):
    client.force_login(boss)
    page = client.get("/admin/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    part = dashboard_of(page)
    assert "今日请求" in part and "较昨日 +50 %" in change(part, "requests")
    assert "近 30 天用量最多的人" in part and "近 30 天用量最多的模型" in part
    assert "Top people" not in part and "vs yesterday" not in part


def test_only_models_unpriced_in_the_last_30_days_are_called_unpriced(client, boss):
    (ann,) = issue(1, ["ann@example.com"])
    served(ann.key, at=local_noon(45), model="old-model", requests=1)
    served(ann.key, at=local_noon(29), model="recent-model", requests=1)
    client.force_login(boss)
    unpriced = dashboard_of(client.get("/admin/").content.decode()).split(
        'data-alert="unpriced">', 1)[1].split("</td>", 1)[0]
    assert "<code>recent-model</code>" in unpriced and "old-model" not in unpriced
