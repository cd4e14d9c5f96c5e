"""/staff/leaderboard: staff only; people ranked by tokens, requests or cost for a period
whose days follow the portal's time zone; shares; totals over everyone; the rollup under it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from accounts.models import User
from tests.usage.conftest import issue, served
from usage.models import ModelPrice, UsageDay, UsageSnapshot
from usage.rollups import usage_days_rebuild

pytestmark = pytest.mark.django_db
URL = "/staff/leaderboard"


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("boss@example.com", password="x-long-pass-1", is_staff=True)


@pytest.fixture
def board(db):
    """Ann: many tokens, few requests, priced. Bob: many requests, few tokens, unpriced.
    Cy: a priced request 10 days ago only."""
    ann, bob, cy = issue(3, ["ann@example.com", "bob@example.com", "cy@example.com"])
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    now = timezone.now()
    served(ann.key, at=now, requests=2, input_tokens=1_000_000, output_tokens=0)
    served(bob.key, at=now, model="unpriced", requests=10, input_tokens=1, output_tokens=0)
    served(cy.key, at=now - timedelta(days=10), requests=1, input_tokens=5_000_000,
           output_tokens=0)
    return ann, bob, cy


def emails_in_order(page: str) -> list[str]:
    table = page.split('<table id="leaderboard">', 1)[1].split("</table>", 1)[0]
    return sorted((e for e in ("ann@", "bob@", "cy@") if e in table), key=table.index)


def test_anonymous_and_non_staff_are_sent_to_the_admin_login(client, board):
    assert client.get(URL)["Location"].startswith("/admin/login/")
    client.force_login(board[0].key.owner)
    response = client.get(URL)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize(("period", "by", "order"), [
    ("7d", "tokens", ["ann@", "bob@"]),
    ("7d", "requests", ["bob@", "ann@"]),
    ("7d", "cost", ["ann@", "bob@"]),
    ("30d", "tokens", ["cy@", "ann@", "bob@"]),
    ("all", "requests", ["bob@", "ann@", "cy@"]),
    ("today", "tokens", ["ann@", "bob@"]),
])
def test_people_are_ranked_for_the_period(client, staff, board, period, by, order):
    client.force_login(staff)
    response = client.get(URL, {"period": period, "by": by})
    assert response.status_code == 200
    assert emails_in_order(response.content.decode()) == order


def test_totals_shares_and_click_through(client, staff, board):
    ann = board[0]
    staff.is_superuser = True  # to follow the link into the key admin
    staff.save()
    client.force_login(staff)
    page = client.get(URL, {"period": "7d", "by": "requests"}).content.decode()
    totals = page.split('class="staff-totals"', 1)[1].split("</table>", 1)[0]
    assert "<td>12</td>" in totals  # requests: 2 + 10
    assert "<td>2,000,010</td>" in totals  # tokens
    assert "≥ $2.00" in totals  # Bob's model has no price: a lower bound, said so
    assert "83.3 %" in page and "16.7 %" in page  # shares of requests
    link = f"/admin/pool/apikey/?owner__id__exact={ann.key.owner_id}"
    assert link in page
    keys = client.get(link)
    assert keys.status_code == 200 and ann.key.masked in keys.content.decode()
    assert board[1].key.masked not in keys.content.decode()


def test_only_the_top_rows_are_listed_but_totals_cover_everyone(client, staff, board, monkeypatch):
    from usage import selectors

    real = selectors.leaderboard
    monkeypatch.setattr("usage.pages.leaderboard", lambda **kw: real(**kw, limit=1))
    client.force_login(staff)
    page = client.get(URL, {"period": "all", "by": "tokens"}).content.decode()
    assert emails_in_order(page) == ["cy@"]
    assert "of 3" in page and "<td>7,000,010</td>" in page


@pytest.mark.parametrize("query", [{"period": "year"}, {"by": "money"}, {"period": ""}])
def test_bad_input_is_answered_plainly_and_changes_nothing(client, staff, board, query):
    client.force_login(staff)
    before = list(UsageDay.objects.values_list())
    response = client.get(URL, query)
    assert response.status_code == 400 and b"Unknown period or ranking" in response.content
    assert list(UsageDay.objects.values_list()) == before


def test_an_empty_board_says_so(client, staff):
    client.force_login(staff)
    assert b"Nobody used the proxy in this period" in client.get(URL).content


@pytest.mark.parametrize("people", [1, 15])
def test_the_board_costs_the_same_queries_however_many_people(
    client, staff, django_assert_num_queries, people
):
    held = issue(people * 2, [f"p{n}@example.com" for n in range(people)])
    for n, h in enumerate(held):
        served(h.key, at=timezone.now() - timedelta(days=n % 3), requests=n + 1)
    client.force_login(staff)
    # session, staff person, top people, totals, keys held, the top people's names, and the
    # admin sidebar's two permission reads, and the daily trend chart
    with django_assert_num_queries(9):
        response = client.get(URL, {"period": "30d"})
    assert response.content.count(b"?owner__id__exact=") == people


def test_days_follow_the_portal_time_zone(staff, settings, db):
    from usage.selectors import leaderboard

    settings.TIME_ZONE = "Pacific/Kiritimati"  # UTC+14: local "today" began 14 h before UTC's
    (ann,) = issue(1, ["ann@example.com"])
    tz = ZoneInfo("Pacific/Kiritimati")
    local_midnight = timezone.now().astimezone(tz).replace(hour=0, minute=0, second=0,
                                                           microsecond=0)
    served(ann.key, at=local_midnight + timedelta(minutes=30), requests=3)  # today, locally
    served(ann.key, at=local_midnight - timedelta(minutes=30), requests=5)  # yesterday
    assert leaderboard(period="today", by="requests").totals.requests == 3
    assert leaderboard(period="7d", by="requests").totals.requests == 8


def test_the_rollup_equals_the_hourly_rows_and_a_rebuild_changes_nothing(board, settings):
    incremental = sorted(UsageDay.objects.values_list(
        "person_id", "day", "requests", "total_tokens", "cost", "unpriced_requests"))
    assert sum(r[2] for r in incremental) == sum(
        UsageSnapshot.objects.values_list("requests", flat=True))
    assert usage_days_rebuild() == len(incremental)
    rebuilt = sorted(UsageDay.objects.values_list(
        "person_id", "day", "requests", "total_tokens", "cost", "unpriced_requests"))
    assert rebuilt == incremental


def test_the_rebuild_command_puts_a_stale_rollup_right(board):
    from io import StringIO

    from django.core.management import call_command

    right = sorted(UsageDay.objects.values_list("person_id", "day", "requests", "cost"))
    UsageDay.objects.update(requests=0, cost=0)  # e.g. prices recomputed since
    out = StringIO()
    call_command("rebuild_usage_days", stdout=out)
    assert f"Rebuilt {len(right)} person-day rows." in out.getvalue()
    assert sorted(UsageDay.objects.values_list("person_id", "day", "requests", "cost")) == right
