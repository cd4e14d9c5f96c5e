"""/staff/export: usage per local day, person, key and model as streamed CSV, for staff only."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone as tz
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.usage.conftest import issue
from usage.models import UsageSnapshot

pytestmark = pytest.mark.django_db
URL = "/staff/export"


def hour(d: int, h: int) -> datetime:
    return datetime(2026, 3, d, h, tzinfo=tz.utc)


@pytest.fixture
def usage(settings):
    settings.TIME_ZONE = "Asia/Shanghai"  # UTC+8: 16:00 UTC is the next local day
    ann1, ann2, bob = issue(3, ["ann@example.com", "ann@example.com", "bob@example.com"])
    ann1.key.owner.name = "=HYPERLINK(\"x\")"
    ann1.key.owner.save()
    rows = [
        (ann1, "gpt", hour(1, 2), 2, 0, 100, 50, "0.10"),
        (ann1, "claude", hour(1, 3), 1, 1, 10, 5, "0.05"),  # same local day, other model
        (ann1, "gpt", hour(1, 16), 4, 0, 40, 40, "0.40"),  # 00:00 on 2 March in Shanghai
        (ann2, "mystery", hour(1, 5), 3, 0, 30, 30, None),  # no price
        (bob, "gpt", hour(2, 1), 1, 0, 7, 7, "0.01"),
        (bob, "gpt", hour(5, 1), 9, 0, 9, 9, "0.09"),  # after the period
    ]
    for held, model, at, req, fail, inp, out, cost in rows:
        UsageSnapshot.objects.create(
            api_key=held.key, model=model, hour=at, requests=req, failures=fail,
            input_tokens=inp, output_tokens=out, total_tokens=inp + out,
            cost=None if cost is None else Decimal(cost),
        )
    return ann1, ann2, bob


def read(response) -> list[dict[str, str]]:
    body = b"".join(response.streaming_content)
    assert body.startswith("\ufeff".encode())  # the BOM Excel on Windows needs
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))


def test_staff_get_usage_per_local_day_person_key_and_model(admin_client, usage):
    ann1, ann2, bob = usage
    response = admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-02"})

    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="usage-2026-03-01-to-2026-03-02.csv"' in response["Content-Disposition"]
    rows = read(response)
    got = [(r["date"], r["email"], r["key"], r["model"], r["requests"], r["failures"],
            r["uncached input tokens"], r["output tokens"], r["total tokens"], r["cost (USD)"],
            r["requests without a price"])
           for r in rows]
    a1, a2, b = ann1.key.masked, ann2.key.masked, bob.key.masked
    assert ann1.key.pk < ann2.key.pk  # rows of a day: by email, then key, then model
    assert got == [
        ("2026-03-01", "ann@example.com", a1, "claude", "1", "1", "10", "5", "15", "0.050000",
         "0"),
        ("2026-03-01", "ann@example.com", a1, "gpt", "2", "0", "100", "50", "150", "0.100000",
         "0"),
        ("2026-03-01", "ann@example.com", a2, "mystery", "3", "0", "30", "30", "60", "", "3"),
        ("2026-03-02", "ann@example.com", a1, "gpt", "4", "0", "40", "40", "80", "0.400000",
         "0"),
        ("2026-03-02", "bob@example.com", b, "gpt", "1", "0", "7", "7", "14", "0.010000", "0"),
    ]
    assert {r["cache read tokens"] for r in rows} == {r["cache write tokens"] for r in rows} \
        == {r["incomplete requests"] for r in rows} == {"0"}
    assert "cost (CNY)" not in rows[0]  # no display currency set: USD only
    # A name that a spreadsheet would run as a formula is kept as text.
    assert rows[0]["name"] == "'=HYPERLINK(\"x\")"


def test_keys_are_masked_in_the_csv(admin_client, usage):
    ann1, _ann2, _bob = usage
    response = admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-31"})
    body = b"".join(response.streaming_content).decode()
    assert ann1.value not in body and ann1.key.key_hash not in body
    assert ann1.key.masked in body


def test_the_export_is_one_grouped_query(admin_client, usage):
    response = admin_client.get(URL, {"from": "2026-03-01", "to": "2026-03-31"})
    with CaptureQueriesContext(connection) as queries:
        read(response)
    [query] = queries.captured_queries
    assert "GROUP BY" in query["sql"]


@pytest.mark.parametrize(
    "params, field, message",
    [
        ({"from": "2026-03-05", "to": "2026-03-01"}, "to", "before the start"),
        ({"from": "yesterday", "to": "2026-03-01"}, "from", "Enter a valid date"),
        ({"from": "2026-03-01"}, "to", "This field is required"),
        ({"from": "2000-01-01", "to": "2026-03-01"}, "to", "at most"),
    ],
)
def test_bad_dates_get_a_message_on_the_field_and_no_csv(admin_client, usage, params, field,
                                                         message):
    response = admin_client.get(URL, params)
    assert response.status_code == 400 and not response.streaming
    assert response["Content-Type"].startswith("text/html")
    assert message in str(response.context["form"].errors[field])


def test_the_form_is_shown_without_dates(admin_client):
    response = admin_client.get(URL)
    assert response.status_code == 200 and b'name="from"' in response.content


def test_people_who_are_not_staff_cannot_export(client, usage):
    ann1, _ann2, _bob = usage
    params = {"from": "2026-03-01", "to": "2026-03-31"}
    response = client.get(URL, params)  # anonymous
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.force_login(ann1.key.owner)
    response = client.get(URL, params)
    assert response.status_code == 302 and not response.streaming
