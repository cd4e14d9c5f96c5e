"""CSV export benchmark: memory stays flat as the exported period grows. Not part of the suite.

    .venv/bin/python bench/export.py [--keys 300] [--days 365] [--periods 30,120,365]

Fills a throw-away SQLite database with `keys` × 24 hours × `days` hourly usage rows (one
model per key and hour, one key in 20 on a model without a price), then streams
`/staff/export` for periods of growing length through the Django test client, reading
`streaming_content` chunk by chunk without keeping it. For each period it prints the rows the
database grouped, the CSV size, the wall time and the peak of Python memory traced by
tracemalloc during the request; then, for contrast, the peak when the same grouped rows are
materialised in a list (what a non-streamed export would hold at the least).

tracemalloc sees Python allocations only: SQLite's own sort buffers are bounded by its
cache_size and temp_store settings, not by this code.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
START = date(2025, 1, 1)


def setup_django(db_path: str) -> None:
    os.environ.update({
        "SECRET_KEY": "bench-only-secret-key-bench-only-secret-key", "DEBUG": "false",
        "DATABASE_URL": f"sqlite:///{db_path}", "CACHE_URL": "locmemcache://",
        "CLIPROXY_URL": "", "LOG_LEVEL": "WARNING", "EMAIL_URL": "consolemail://",
        "ALLOWED_HOSTS": "testserver", "TIME_ZONE": "Europe/Berlin",
    })
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyportal.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def fill(keys: int, days: int) -> int:
    from django.db import connection, transaction

    from accounts.models import User
    from pool.models import ApiKey
    from usage.models import UsageSnapshot

    people = User.objects.bulk_create(
        [User(email=f"person{i}@example.com", name=f"Person {i}") for i in range(max(keys // 3, 1))]
    )
    made = ApiKey.objects.bulk_create([
        ApiKey(owner=people[i % len(people)], status="active", key_hash=f"{i:064x}",
               prefix="sk-kp-", last4=f"{i:04d}"[-4:], label=f"laptop {i}")
        for i in range(keys)
    ], batch_size=500)
    q = connection.ops.quote_name
    sql = (
        f"INSERT INTO {q(UsageSnapshot._meta.db_table)} (api_key_id, model, hour, requests, "
        "failures, input_tokens, output_tokens, reasoning_tokens, cached_tokens, "
        "cache_creation_tokens, total_tokens, incomplete_requests, cost) "
        "VALUES (%s,%s,%s,%s,%s,%s,%s,0,0,0,%s,0,%s)"
    )
    first = datetime.combine(START, datetime.min.time(), tzinfo=timezone.utc)
    rows = 0
    for day in range(days):
        batch = []
        for h in range(24):
            hour = connection.ops.adapt_datetimefield_value(first + timedelta(days=day, hours=h))
            for i, key in enumerate(made):
                unpriced = i % 20 == 0
                batch.append((key.pk, "mystery" if unpriced else "gpt-5", hour, 3, i % 2,
                              300 + i, 90, 390 + i, None if unpriced else "0.01234500"))
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, batch)
        rows += len(batch)
    return rows


def stream(client, start: date, end: date) -> tuple[int, int]:
    response = client.get("/staff/export", {"from": start.isoformat(), "to": end.isoformat()})
    assert response.status_code == 200 and response.streaming, response.status_code
    size = lines = 0
    for chunk in response.streaming_content:  # read and dropped, as a client would
        size += len(chunk)
        lines += chunk.count(b"\n")
    return size, lines - 1  # minus the header


def materialised(start: date, end: date) -> int:
    from usage.export import usage_by_day

    return len(list(usage_by_day(start=start, end=end)))


def traced(fn):
    gc.collect()
    tracemalloc.start()
    began = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--periods", default="30,120,365")
    args = parser.parse_args()
    periods = [int(p) for p in args.periods.split(",")]
    if max(periods) > args.days:
        parser.error("a period is longer than the generated data")

    with tempfile.TemporaryDirectory() as tmp:
        setup_django(str(Path(tmp) / "bench.sqlite3"))
        from django.test import Client

        from accounts.models import User

        began = time.perf_counter()
        total = fill(args.keys, args.days)
        print(f"generated {total:,} hourly rows ({args.keys} keys x 24 h x {args.days} days) "
              f"in {time.perf_counter() - began:.0f} s")
        staff = User.objects.create_superuser("staff@example.com", "bench-password")
        client = Client()
        client.force_login(staff)
        stream(client, START, START)  # warm-up: imports, templates, the session

        print(f"{'days':>5} {'hourly rows':>12} {'CSV lines':>10} {'CSV MB':>8} {'s':>6} "
              f"{'streamed peak':>14} {'list() peak':>12}")
        for days in periods:
            end = START + timedelta(days=days - 1)
            (size, lines), peak, seconds = traced(lambda: stream(client, START, end))
            _n, list_peak, _s = traced(lambda: materialised(START, end))
            print(f"{days:>5} {args.keys * 24 * days:>12,} {lines:>10,} {size / 1e6:>8.1f} "
                  f"{seconds:>6.1f} {peak / 1e6:>11.2f} MB {list_peak / 1e6:>9.1f} MB")


if __name__ == "__main__":
    main()
