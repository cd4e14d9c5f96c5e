"""Daily charts (usage/charts.py, templates/usage/_chart.html): the SVG and its table add up
to the usage recorded, models stack biggest first with stable colours, days follow the
portal's time zone, an empty range says so, and the page's query count stays pinned."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.http import QueryDict
from django.utils import timezone

from tests.usage.conftest import issue, served
from usage.charts import (
    OTHERS, PALETTE, chart, chart_days, fold, nice_ceiling, series_colours, stacked,
)
from usage.currency import USD, Currency, remember
from usage.models import ModelPrice, UsageDay, UsageSnapshot
from usage.selectors import daily_all_usage, daily_by_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def ann(db):
    (held,) = issue(1, ["ann@example.com"])
    ModelPrice.objects.create(model="big-model", input=Decimal("2"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    return held


def test_sums_in_the_svg_and_the_table_equal_the_recorded_usage(ann):
    now = timezone.now()
    served(ann.key, at=now, model="big-model", requests=3, input_tokens=1000, output_tokens=0)
    served(ann.key, at=now - timedelta(days=2), model="small-model", requests=2,
           input_tokens=100, output_tokens=50)
    served(ann.key, at=now - timedelta(days=40), model="big-model", requests=9)  # outside 30
    daily = daily_by_model(rows=UsageSnapshot.objects.filter(api_key=ann.key), days=30)

    inside = UsageSnapshot.objects.filter(api_key=ann.key, hour__gte=now - timedelta(days=3))
    assert daily.total.tokens == sum(inside.values_list("total_tokens", flat=True)) == 3300
    assert daily.total.requests == 5
    assert daily.total.cost == Decimal("0.006")  # 3000 tokens at $2/M; small-model unpriced
    assert daily.total.unpriced_requests == 2
    assert len(daily.days) == 30 and daily.days[-1] == timezone.localdate()

    drawn = stacked(daily, measure="tokens")
    # Bar heights are proportional to the values: the tallest day is 3000 tokens.
    big = _heights_of(drawn, "big-model")
    small = _heights_of(drawn, "small-model")
    assert len(big) == 1 and len(small) == 1
    assert big[0] / small[0] == pytest.approx(3000 / 300, rel=1e-3)
    assert drawn.total == Decimal(3300)


def _heights_of(drawn, model: str) -> list[float]:
    return [s.height for s in drawn.segments if model in s.title]


def test_the_page_shows_the_chart_whose_table_totals_match(client, ann):
    now = timezone.now()
    served(ann.key, at=now, model="big-model", requests=3, input_tokens=1000, output_tokens=0)
    served(ann.key, at=now - timedelta(days=1), model="small-model", requests=2,
           input_tokens=100, output_tokens=50)
    client.force_login(ann.key.owner)
    page = client.get("/my-keys").content.decode()
    section = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
    assert section.count("<svg class=\"chart-svg\"") == 2  # tokens and cost
    assert 'role="img"' in section and "<title" in section
    total = section.split('data-total="tokens">', 1)[1].split("<", 1)[0]
    assert total == "3,300"
    rows = re.findall(r'<tr><td><time datetime="([\d-]+)">', section)
    assert len(rows) == 2  # one row per non-empty (day, model)
    # The cost chart stacks the known part; the unpriced model is said to be unknown.
    # $0.006 known, the rest unpriced: a lower bound, rounded down so that "≥" stays true,
    # the exact figure in its title.
    assert "unknown" in section and "≥ $0.00" in section and "Exactly $0.006000." in section


def test_models_stack_biggest_first_and_keep_their_colour(ann):
    now = timezone.now()
    served(ann.key, at=now, model="b-model", requests=1, input_tokens=10, output_tokens=0)
    served(ann.key, at=now, model="a-model", requests=1, input_tokens=500, output_tokens=0)
    served(ann.key, at=now, model="c-model", requests=1, input_tokens=10, output_tokens=0)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
    assert daily.series == ["a-model", "b-model", "c-model"]  # by tokens, then by name
    drawn = stacked(daily, measure="tokens")
    today = [s for s in drawn.segments]
    # Bottom first: each segment sits on top of the previous one.
    assert [s.title.split(" · ")[1].split(":")[0] for s in today] == daily.series
    for lower, upper in zip(today, today[1:]):
        assert upper.y + upper.height == pytest.approx(lower.y, abs=0.02)
    # Colours follow the same order: the palette's first three, one each.
    assert [s.css for s in today] == ["series-0", "series-1", "series-2"]


def test_an_empty_range_says_so_instead_of_drawing(client, ann):
    served(ann.key, at=timezone.now() - timedelta(days=60), requests=1)
    client.force_login(ann.key.owner)
    page = client.get("/my-keys?days=7").content.decode()
    section = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
    assert "No usage in the last 7 days." in section and "<svg class=\"chart-svg\"" not in section
    # 90 days reaches the 60-day-old request.
    page = client.get("/my-keys?days=90").content.decode()
    section = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
    assert section.count('<rect class="series-') == 2  # one bar on each chart
    assert 'aria-current="page" class="current">90 days' in section


def test_ninety_days_draws_ninety_slots_inside_the_view_box(ann):
    start = timezone.now()
    for n in range(0, 90, 3):
        served(ann.key, at=start - timedelta(days=n), requests=1, input_tokens=n + 1)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=90)
    drawn = stacked(daily, measure="tokens")
    assert len(daily.days) == 90 and len(drawn.segments) == 30
    assert all(drawn.left <= s.x and s.x + s.width <= drawn.right_edge for s in drawn.segments)
    assert all(s.y >= 0 and s.y + s.height <= drawn.baseline + 0.01 for s in drawn.segments)
    assert 5 <= len(drawn.day_labels) <= 7  # readable, not 90 labels
    assert drawn.day_labels[-1].label == f"{daily.days[-1].month}-{daily.days[-1].day}"


def test_days_follow_the_portal_time_zone(ann, settings):
    settings.TIME_ZONE = "Pacific/Kiritimati"  # UTC+14
    tz = ZoneInfo("Pacific/Kiritimati")
    midnight = timezone.now().astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    served(ann.key, at=midnight + timedelta(minutes=30), requests=3)
    served(ann.key, at=midnight - timedelta(minutes=30), requests=5)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
    today, yesterday = daily.days[-1], daily.days[-2]
    assert today == midnight.date()
    assert daily.per_day[today].requests == 3 and daily.per_day[yesterday].requests == 5


def test_the_leaderboard_trend_equals_the_rollup(ann, client):
    from accounts.models import User

    bob = issue(1, ["bob@example.com"])[0]
    served(ann.key, at=timezone.now(), requests=2, input_tokens=10, output_tokens=0)
    served(bob.key, at=timezone.now() - timedelta(days=3), requests=4, input_tokens=5,
           output_tokens=0)
    daily = daily_all_usage(days=7)
    assert daily.total.requests == 6 == sum(UsageDay.objects.values_list("requests", flat=True))
    assert daily.series == ["*"]
    staff = User.objects.create_user("boss@example.com", password="x-long-pass-1", is_staff=True)
    client.force_login(staff)
    page = client.get("/staff/leaderboard?period=7d&by=tokens&days=7").content.decode()
    section = page.split('id="trend"', 1)[1].split("</section>", 1)[0]
    assert 'data-total="tokens">40<' in section  # 2×10 + 4×5
    assert "series-all" in section
    # The picker keeps the board's period and ranking.
    assert "?period=7d&amp;by=tokens&amp;days=30#trend" in section


@pytest.mark.parametrize("raw", ["5", "abc", "-1", "1000000000000000000000"])
def test_an_unknown_period_falls_back_to_30_days_and_says_so(client, ann, raw):
    assert chart_days(QueryDict(f"days={raw}")) == (30, True)
    client.force_login(ann.key.owner)
    response = client.get("/my-keys", {"days": raw})
    assert response.status_code == 200
    assert b"the chart covers 7, 30 or 90 days" in response.content


def test_nice_axis_maximum():
    assert nice_ceiling(Decimal(3300)) == (Decimal(4000), Decimal(1000))
    assert nice_ceiling(Decimal(1)) == (Decimal("2.0"), Decimal("0.5"))
    assert nice_ceiling(Decimal(0))[0] == 1


def test_chart_object_lists_the_table_rows_in_day_order(ann):
    served(ann.key, at=timezone.now() - timedelta(days=1), model="z-model", requests=1)
    served(ann.key, at=timezone.now(), model="a-model", requests=1)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
    c = chart(daily, query=QueryDict(""), chart_id="x", title="t")
    assert [r.day for r in c.rows] == sorted(r.day for r in c.rows)
    assert [n for n, _link, current in c.choices if current] == [7]


@pytest.mark.parametrize("models", [1, 6])
def test_my_keys_query_count_does_not_grow_with_usage(client, ann, django_assert_num_queries,
                                                       models):
    for n in range(models * 5):
        served(ann.key, at=timezone.now() - timedelta(days=n), model=f"m{n % models}")
    client.force_login(ann.key.owner)
    # session, person, keys with their sums, quota, daily chart, the upstreams open to them
    with django_assert_num_queries(6):
        response = client.get("/my-keys", {"days": "90"})
    assert response.status_code == 200


def test_a_period_with_requests_but_no_tokens_gets_whole_token_ticks(ann):
    served(ann.key, at=timezone.now(), requests=2, input_tokens=0, output_tokens=0)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
    assert not daily.empty  # two requests happened
    assert [t.label for t in stacked(daily, measure="tokens").ticks] == ["0", "1", "2", "3", "4"]


MODELS = ["claude-sonnet-4-5", "claude-opus-4-1", "gpt-5", "gpt-5-codex", "gemini-2.5-pro",
          "claude-haiku-4-5", "deepseek-chat", "qwen3-coder", "kimi-k2", "glm-4.6", "o3",
          "grok-4"]


def _served_models(key, names: list[str]) -> None:
    now = timezone.now()
    for n, name in enumerate(names):  # the first the biggest
        served(key, at=now - timedelta(days=n % 3), model=name, requests=1,
               input_tokens=10_000 - 100 * n, output_tokens=0)


def test_six_models_on_one_page_have_six_colours_the_same_on_both_charts(client, ann):
    # Six models whose name hashes (the old rule) put two pairs on one colour each.
    _served_models(ann.key, MODELS[:6])
    client.force_login(ann.key.owner)
    page = client.get("/my-keys").content.decode()
    section = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
    legend = dict(re.findall(r'<li data-series="([^"]+)"><svg class="swatch"[^>]*><rect '
                             r'class="(series-[\w-]+)"', section))
    assert list(legend) == MODELS[:6]  # most tokens first
    assert list(legend.values()) == [f"series-{n}" for n in range(6)]
    # Each chart's segments of a model carry the legend's colour.
    for svg in section.split('<svg class="chart-svg"')[1:]:
        for css, title in re.findall(r'<rect class="(series-[\w-]+)"[^>]*><title>([^<]+)', svg):
            model = title.split(" · ")[1].split(":")[0]
            assert legend[model] == css, (model, css)


def test_more_models_than_colours_fold_the_smallest_into_other_models(ann):
    _served_models(ann.key, MODELS)
    daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
    assert len(daily.series) == 12 > PALETTE
    folded = fold(daily)
    assert folded.series == [*MODELS[:PALETTE - 1], OTHERS]
    # Nothing lost: the other models' sum is the rest, day by day.
    assert folded.total == daily.total
    rest = MODELS[PALETTE - 1:]
    assert folded.per_series[OTHERS].tokens == sum(daily.per_series[m].tokens for m in rest)
    for day in daily.days:
        assert sum(t.tokens for (d, _n), t in folded.cells.items() if d == day) == \
            daily.per_day.get(day, daily.total.__class__()).tokens
    colours = series_colours(folded)
    shown = [colours[name] for name in folded.series]
    assert len(set(shown)) == len(shown) == PALETTE and shown[-1] == "series-others"
    drawn = chart(daily, query=QueryDict(), chart_id="c", title="t")
    assert [item.label for item in drawn.legend][-1] == "other models"


def test_the_cost_axis_and_titles_are_in_the_display_currency(client, ann):
    served(ann.key, at=timezone.now(), model="big-model", requests=1, input_tokens=1_000_000,
           output_tokens=0)  # $2.00
    remember(Currency("CNY", Decimal("7.1")))
    try:
        daily = daily_by_model(rows=UsageSnapshot.objects.all(), days=7)
        drawn = stacked(daily, measure="cost")
        assert drawn.title == "Cost (CNY, known part)"
        assert drawn.total == Decimal("14.2")
        assert [t.label for t in drawn.ticks] == ["¥0", "¥5", "¥10", "¥15", "¥20"]
        assert drawn.segments[0].title.endswith(": ¥14.20")
        client.force_login(ann.key.owner)
        page = client.get("/my-keys").content.decode()
        section = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
        assert "$" not in section.replace('title="$2.00 at 7.1 CNY per US dollar."', "")
    finally:
        remember(USD, seconds=0)
