"""Page benchmark: the staff pages (leaderboard, the admin index's dashboard, a person's
staff page) and /my-keys at scale. Not part of the test suite.

    .venv/bin/python bench/pages.py [--people 10000] [--keys 30000] [--rows 2000000] [--runs 30]

Builds a throw-away SQLite database (migrated like production) with `people` people holding
`keys` keys and `rows` UsageSnapshot rows over the last year, with a heavy-tailed spread
(person n gets a share proportional to 1 / (n + 20): the heaviest has ~8 % of all rows) and
work-day hours. The person × day rollup is filled by the real `usage_days_rebuild()`. Then
each page is fetched `runs` times with Django's test Client (a warm-up first) and the median
and p95 latency and the number of queries are printed. Staff are signed in as the admin
requires (a password session, no emailed link), the way the tests sign them in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import setup_django  # noqa: E402  (one way to start Django for benches)

MODELS = ["claude-sonnet-4-5-20250929", "gpt-5", "gemini-2.5-pro", "claude-haiku-4-5",
          "unpriced-model"]
SLOTS_PER_HOUR = 6  # 3 keys × 2 models
HOURS_PER_DAY = 8


def build(people: int, keys: int, rows: int) -> None:
    from django.db import connection, transaction

    from accounts.models import User
    from pool.models import ApiKey
    from usage.models import UsageSnapshot

    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    q = connection.ops.quote_name
    # People and keys through the ORM (every default filled in); usage rows, the bulk, raw.
    User.objects.bulk_create(
        [User(id=p + 1, email=f"person{p}@example.com") for p in range(people)], batch_size=5000
    )
    ApiKey.objects.bulk_create(
        [ApiKey(id=k + 1, owner_id=k % people + 1, status="active", proxy_state="pushed",
                key_hash=f"{k:064x}", prefix="sk-kp-", last4=f"{k % 10000:04d}", issued_at=now)
         for k in range(keys)],
        batch_size=5000,
    )
    per_key = keys // people  # each person's keys are p, p + people, p + 2 people, ...
    weights = [1 / (p + 20) for p in range(people)]
    scale = rows / sum(weights)
    counts = [max(1, int(w * scale)) for w in weights]
    counts[0] += rows - sum(counts)  # exact total; the heaviest person takes the rounding
    table = q(UsageSnapshot._meta.db_table)
    insert = (
        f"INSERT INTO {table} (api_key_id, model, hour, requests, failures, input_tokens, "
        "output_tokens, reasoning_tokens, cached_tokens, cache_creation_tokens, total_tokens, "
        "incomplete_requests, cost) VALUES (%s, %s, %s, %s, 0, %s, %s, 0, 0, 0, %s, 0, %s)"
    )
    batch: list[tuple] = []
    done = 0
    for p, n in enumerate(counts):
        slots_per_day = SLOTS_PER_HOUR * HOURS_PER_DAY
        days_needed = -(-n // slots_per_day)
        step = max(1, 365 // days_needed)
        for r in range(n):
            slot, combo = divmod(r, SLOTS_PER_HOUR)
            day_index, hour_in_day = divmod(slot, HOURS_PER_DAY)
            hour = now - timedelta(days=day_index * step + p % step) \
                - timedelta(hours=(now.hour - 9 - hour_in_day) % 24)
            key_id = p + (combo // 2 % per_key) * people + 1
            model = MODELS[(p + combo % 2) % len(MODELS)]
            reqs = 1 + (r * 7 + p) % 9
            inp, out = reqs * 1200, reqs * 300
            cost = None if model == "unpriced-model" else f"{(inp * 3 + out * 15) / 1e6:.8f}"
            batch.append((key_id, model, hour, reqs, inp, out, inp + out, cost))
            if len(batch) >= 50_000:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.executemany(insert, batch)
                done += len(batch)
                batch = []
                print(f"\r  usage rows: {done:,}", end="", file=sys.stderr)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(insert, batch)
    print(file=sys.stderr)


def measure(client, url: str, runs: int) -> tuple[float, float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    response = client.get(url)  # warm-up (and a check that the page works)
    assert response.status_code == 200, (url, response.status_code)
    times = []
    for _ in range(runs):
        with CaptureQueriesContext(connection) as queries:
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    times.sort()
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return statistics.median(times), p95, len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=30_000)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--db", help="keep the database in this file and reuse it next time "
                        "(skips the build when it already holds data)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ALLOWED_HOSTS"] = "testserver"
        # --db keeps the database: not emptied, so the build is skipped the next time.
        setup_django(args.db or str(Path(tmp) / "bench.sqlite3"), flush=not args.db)
        from django.db import connection
        from django.test import Client, override_settings

        from accounts.models import User
        from pool.models import ApiKey
        from usage.models import UsageDay, UsageModelDay, UsageSnapshot
        from usage.rollups import usage_days_rebuild

        if not User.objects.exists():
            t0 = time.perf_counter()
            build(args.people, args.keys, args.rows)
            t1 = time.perf_counter()
            usage_days_rebuild()
            t2 = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")  # what a long-lived database has: planner statistics
            User.objects.create_user("boss@example.com", password="x" * 16, is_staff=True)
            print(f"built in {t1 - t0:.0f} s; rollup rebuilt in {t2 - t1:.0f} s")
        print(f"{User.objects.count() - 1:,} people, {ApiKey.objects.count():,} keys, "
              f"{UsageSnapshot.objects.count():,} usage rows, {UsageDay.objects.count():,} "
              f"person-day rows, {UsageModelDay.objects.count():,} model-day rows; heaviest person: "
              f"{UsageSnapshot.objects.filter(api_key__owner_id=1).count():,} rows")

        staff = User.objects.get(email="boss@example.com")
        heavy = User.objects.get(email="person0@example.com")
        heavy_key = ApiKey.objects.filter(owner=heavy).order_by("id").first()
        pages = [(f"leaderboard period={p}", staff, f"/staff/leaderboard?period={p}&by=tokens")
                 for p in ("today", "7d", "30d", "all")]
        pages += [("leaderboard period=30d by=cost", staff,
                   "/staff/leaderboard?period=30d&by=cost")]
        pages += [("admin index (dashboard)", staff, "/admin/"),
                  ("admin index, 90-day trend", staff, "/admin/?days=90"),
                  ("staff person page (heaviest)", staff, f"/staff/people/{heavy.pk}")]
        pages += [("/my-keys (heaviest person)", heavy, "/my-keys"),
                  ("/my-keys/<id> (heaviest key)", heavy, f"/my-keys/{heavy_key.pk}")]
        storages = {"staticfiles": {
            "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
        print(f"{'page':34} {'median ms':>10} {'p95 ms':>8} {'queries':>8}")
        with override_settings(STORAGES={"default": {
                "BACKEND": "django.core.files.storage.FileSystemStorage"}, **storages}):
            for name, who, url in pages:
                client = Client()
                client.force_login(who)
                median, p95, queries = measure(client, url, args.runs)
                print(f"{name:34} {median:10.1f} {p95:8.1f} {queries:8d}")


if __name__ == "__main__":
    main()
