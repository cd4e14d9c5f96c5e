"""Ingest benchmark for sync_usage, both proxy generations. Not part of the test suite.

    .venv/bin/python bench/ingest.py [--count 1000000] [--batch 4000] [--keys 3000]

Generates `count` usage records shaped like the proxy's real answers (tests/fixtures/), then
ingests them with the real code on a throw-away SQLite database, or on the PostgreSQL
database DATABASE_URL names (its tables are emptied first):
- queue: each popped body goes through `usage_queue_body_ingest` (seal and commit the body,
  parse, hash keys, count it) — exactly what `sync_usage` does after the HTTP call; timed pop
  by pop against `json.loads` of the same body, interleaved;
- snapshot: one cumulative `/usage` body through `json.loads` + `usage_snapshot_ingest`, then
  a second run over the same body (what a sync right after finds: nothing new).
Prints wall time as a ratio to `json.loads` of the same bytes, and peak traced memory
(tracemalloc, in a separate pass so it does not slow the timed one) as a ratio to the payload.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ["claude-sonnet-4-5-20250929", "gpt-5", "gemini-2.5-pro", "claude-haiku-4-5", "mock-x"]
HOURS = 48
FIXTURE = json.loads((ROOT / "tests/fixtures/usage-queue-v7.2.140.json").read_text())[0]


def setup_django(db_path: str, *, flush: bool = True) -> None:
    # PostgreSQL when DATABASE_URL points at one (its tables are emptied first, unless
    # `flush` is False: a bench that keeps its database between runs); otherwise a
    # throw-away SQLite file.
    url = os.environ.get("DATABASE_URL", "")
    os.environ.update({
        "SECRET_KEY": "bench-only-secret-key-bench-only-secret-key", "DEBUG": "false",
        "DATABASE_URL": url if url.startswith("postgres") else f"sqlite:///{db_path}",
        "CACHE_URL": "locmemcache://",
        "CLIPROXY_URL": "", "LOG_LEVEL": "WARNING", "EMAIL_URL": "consolemail://",
    })
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyportal.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    if flush:
        call_command("flush", interactive=False, verbosity=0)


def make_keys(count: int) -> list[str]:
    from accounts.models import User
    from pool.models import ApiKey, key_digest

    users = User.objects.bulk_create(
        [User(email=f"person{i}@example.com") for i in range(max(count // 3, 1))]
    )
    values = [f"sk-kp-bench-{i:08d}-xxxxxxxxxxxxxxxxxxxxxxxx" for i in range(count)]
    ApiKey.objects.bulk_create([
        ApiKey(owner=users[i % len(users)], status="active", key_hash=key_digest(v),
               prefix="sk-kp-", last4=v[-4:])
        for i, v in enumerate(values)
    ], batch_size=500)
    return values


def timestamp(i: int, count: int) -> str:
    seconds = i * (HOURS * 3600) // count
    h, rest = divmod(seconds, 3600)
    day, hour = divmod(h, 24)
    return f"2026-11-{20 + day:02d}T{hour:02d}:{rest // 60:02d}:{rest % 60:02d}.{i % 10**9:09d}Z"


def queue_record(i: int, count: int, keys: list[str]) -> dict:
    record = dict(FIXTURE)
    record["timestamp"] = timestamp(i, count)
    record["api_key"] = keys[i % len(keys)] if i % 50 else "operator-own-key"
    record["model"] = record["alias"] = MODELS[i % len(MODELS)]
    record["request_id"] = f"{i:08x}"
    record["tokens"] = dict(FIXTURE["tokens"], input_tokens=100 + i % 900, output_tokens=i % 300,
                            total_tokens=100 + i % 900 + i % 300)
    return record


def snapshot_body(count: int, keys: list[str]) -> bytes:
    apis: dict = {}
    for i in range(count):
        key = keys[i % len(keys)] if i % 50 else "POST /v1/chat/completions"
        model = MODELS[i % len(MODELS)]
        entry = apis.setdefault(key, {"total_requests": 0, "total_tokens": 0, "models": {}})
        details = entry["models"].setdefault(model, {"total_requests": 0, "total_tokens": 0,
                                                     "details": []})["details"]
        details.append({
            "timestamp": timestamp(i, count), "latency_ms": 40, "source": "acct@example.com",
            "auth_index": "2a4984ef82170838", "failed": i % 97 == 0,
            "tokens": {"input_tokens": 100 + i % 900, "output_tokens": i % 300,
                       "reasoning_tokens": 0, "cached_tokens": i % 7,
                       "total_tokens": 100 + i % 900 + i % 300},
        })
    answer = {"failed_requests": 0, "usage": {"total_requests": count, "apis": apis}}
    return json.dumps(answer).encode()


def timed(fn, *, collect: bool = False) -> float:
    if collect:
        gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def traced_peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def bench_queue(count: int, batch: int, keys: list[str]) -> None:
    from django.utils import timezone

    from usage.models import UsageBatch, UsageSnapshot
    from usage.services import Books
    from usage.services import usage_queue_body_ingest

    started = time.perf_counter()
    bodies = [
        json.dumps([queue_record(i, count, keys) for i in range(s, min(s + batch, count))]).encode()
        for s in range(0, count, batch)
    ]
    size = sum(map(len, bodies))
    print(f"queue: {count:,} records in {len(bodies):,} pops of {batch:,}, "
          f"{size / 1e6:,.1f} MB (generated in {time.perf_counter() - started:.1f} s)")

    now, books = timezone.now(), Books.load()
    # Interleaved, pop by pop, so that both sides of the ratio run under the same load on
    # the machine (timed minutes apart, the baseline alone moved by 20 %).
    t_json = t_ingest = 0.0
    for body in bodies:
        t_json += timed(lambda: json.loads(body))  # not kept: ingest holds one pop as well
        t_ingest += timed(lambda: usage_queue_body_ingest(body=body, now=now, books=books))
    stored = sum(UsageSnapshot.objects.values_list("requests", flat=True))
    assert stored == count - len(range(0, count, 50)), stored  # every 50th is foreign
    # Memory: one pop at a time is all that is ever held, so trace a sample of pops.
    sample = bodies[: max(1, min(len(bodies), 20))]
    peak = traced_peak(lambda: [usage_queue_body_ingest(body=b, now=now, books=books)
                                for b in sample])
    biggest = max(map(len, sample))
    print(f"  json.loads {t_json:.2f} s, ingest {t_ingest:.2f} s "
          f"-> {t_ingest / t_json:.2f}x json.loads "
          f"({count / t_ingest:,.0f} records/s; batches stored: {UsageBatch.objects.count():,})")
    print(f"  peak traced memory {peak / 1e6:.1f} MB = {peak / biggest:.2f}x one pop's body, "
          f"{peak / size:.4f}x the whole payload")


def bench_snapshot(count: int, keys: list[str]) -> None:
    from pool.upstream import parse_usage_snapshot
    from usage.models import UsageSnapshot
    from usage.services import usage_snapshot_ingest

    UsageSnapshot.objects.all().delete()
    started = time.perf_counter()
    body = snapshot_body(count, keys)
    print(f"snapshot: {count:,} details, {len(body) / 1e6:,.1f} MB "
          f"(generated in {time.perf_counter() - started:.1f} s)")

    # The baseline is timed right before and right after each sync and averaged, so that a
    # change of load on the machine moves both sides of the ratio.
    def around(fn) -> tuple[float, float]:
        before = timed(lambda: json.loads(body), collect=True)
        took = timed(fn, collect=True)
        return took, (before + timed(lambda: json.loads(body), collect=True)) / 2

    def sync_once() -> None:
        snapshot = parse_usage_snapshot(json.loads(body))
        usage_snapshot_ingest(apis=snapshot.apis)

    t_first, t_json = around(sync_once)
    stored = sum(UsageSnapshot.objects.values_list("requests", flat=True))
    assert stored == count - len(range(0, count, 50)), stored
    t_again, t_json_again = around(sync_once)
    assert sum(UsageSnapshot.objects.values_list("requests", flat=True)) == stored
    peak = traced_peak(sync_once)  # a run with nothing new still decodes the whole body
    print(f"  json.loads {t_json:.2f} s, first sync {t_first:.2f} s "
          f"-> {t_first / t_json:.2f}x json.loads; sync right after {t_again:.2f} s "
          f"-> {t_again / t_json_again:.2f}x")
    print(f"  peak traced memory (sync with nothing new) {peak / 1e6:,.0f} MB = "
          f"{peak / len(body):.2f}x the payload")
    from usage.models import SnapshotCursor

    SnapshotCursor.objects.all().delete()
    UsageSnapshot.objects.all().delete()
    peak = traced_peak(sync_once)
    print(f"  peak traced memory (first sync) {peak / 1e6:,.0f} MB = "
          f"{peak / len(body):.2f}x the payload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4000, help="records per queue pop (the USAGE_QUEUE_BATCH default)")
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--only", choices=["queue", "snapshot"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyportal-bench-") as tmp:
        setup_django(str(Path(tmp) / "bench.sqlite3"))
        keys = make_keys(args.keys)
        if args.only != "snapshot":
            bench_queue(args.count, args.batch, keys)
        if args.only != "queue":
            bench_snapshot(args.count, keys)


if __name__ == "__main__":
    main()
