"""The token split and its price, checked against what the vendors bill for what the upstream
reported, for every case the real proxy builds were captured on (tests/fixtures/README.md).

The expected figures are computed here from `upstream_usage` (the vendor's own usage block)
with each vendor's billing rules, never from the portal's code; a record the proxy recorded
without part of its counts must be marked incomplete, its cost a lower bound."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from pool.models import key_digest
from tests.usage.conftest import issue
from usage import records as R
from usage.accounting import SNAPSHOT, split_tokens
from usage.models import ModelPrice, SyncRun, UsageDay, UsageSnapshot
from usage.pricing import Price, cost_of
from usage.services import Books, usage_queue_body_ingest, usage_snapshot_ingest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CASES = {
    version: json.loads((FIXTURES / f"usage-tokens-v{version}.json").read_text())
    for version in ("7.2.140", "6.9.47")
}
# Anthropic's list price for Sonnet-class models, per million: input, output, cache read
# (0.1x input), cache write (5-minute, 1.25x input). Used for every model here: the split is
# what is checked, and distinct rates make any part counted at the wrong rate show.
RATES = dict(input=Decimal(3), output=Decimal(15), cache_read=Decimal("0.30"),
             cache_write=Decimal("3.75"))
PRICE = Price(**RATES)

# (version, case, stream): the proxy lost counts of these requests (fixtures README).
LOST = {
    ("7.2.140", "claude-messages-cache", True),  # message_start's usage never read
    ("6.9.47", "claude-messages-cache", True),
    ("6.9.47", "claude-messages-cache", False),  # 6.9.x drops cache writes
    ("6.9.47", "claude-messages-cache-cumulative-delta", True),
    ("6.9.47", "openai-chat-cached-reasoning", True),  # 6.9.x chat streaming: all zeros
}


def vendor_split(case: dict) -> tuple[int, int, int, int]:
    """(uncached input, cache read, cache write, billed output) as the vendor bills the usage
    its API reported: Anthropic bills its three input counts apart; OpenAI's prompt and
    Gemini's prompt include the cached part; OpenAI's completion includes reasoning, Gemini
    bills thoughts as output beside the candidates."""
    usage = case["upstream_usage"]
    if case["stream"] or "response.completed.response.usage" in usage:
        events = [u for u in usage.values() if u]
        merged: dict = {}
        for event in events:  # later events carry the final (cumulative) counts
            merged.update(event)
        usage = merged
    if "cache_read_input_tokens" in usage:  # Anthropic
        return (usage["input_tokens"], usage["cache_read_input_tokens"],
                usage["cache_creation_input_tokens"], usage["output_tokens"])
    if "promptTokenCount" in usage:  # Gemini
        cached = usage.get("cachedContentTokenCount", 0)
        return (usage["promptTokenCount"] - cached, cached, 0,
                usage["candidatesTokenCount"] + usage.get("thoughtsTokenCount", 0))
    if "prompt_tokens" in usage:  # OpenAI chat
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        return usage["prompt_tokens"] - cached, cached, 0, usage["completion_tokens"]
    cached = usage["input_tokens_details"]["cached_tokens"]  # OpenAI Responses
    return usage["input_tokens"] - cached, cached, 0, usage["output_tokens"]


def vendor_cost(split: tuple[int, int, int, int]) -> Decimal:
    uncached, read, write, out = split
    return ((uncached * RATES["input"] + read * RATES["cache_read"] + write * RATES["cache_write"]
             + out * RATES["output"]) / 1_000_000).quantize(Decimal("1e-8"))


def records_of(version: str) -> list[tuple[str, dict, dict]]:
    """(id, case, record as the portal reads it): on 7.x both the queue's and the RESP
    stream's copy of each request, on 6.x the snapshot's detail (with its model name)."""
    out = []
    for case in CASES[version]:
        ids = f"{version}-{case['case']}-{'stream' if case['stream'] else 'plain'}"
        out.append((ids, case, case["proxy_record"]))
        if "resp_record" in case:
            out.append((ids + "-resp", case, case["resp_record"]))
    return out


ALL = [(v, *r) for v in CASES for r in records_of(v)]


def row_of(version: str, case: dict, record: dict) -> R.Row:
    if version.startswith("7"):
        rows, aside = R.queue_rows(json.dumps([record]))
        assert not aside
        return rows[0]
    model = case["snapshot_path"][4]
    (row,) = R.snapshot_rows([("h", model, [record], 0, "k", "")], [])
    return row


@pytest.mark.parametrize("version,ids,case,record", ALL, ids=[a[1] for a in ALL])
def test_every_captured_record_is_billed_as_the_vendor_bills_it_or_marked_incomplete(
        version, ids, case, record):
    row = row_of(version, case, record)
    uncached, out, reasoning, read, write, total, incomplete = (
        row[4], row[5], row[6], row[7], row[8], row[9], row[11])
    expected = vendor_split(case)
    cost = cost_of(PRICE, uncached=uncached, cache_read=read, cache_write=write, output=out)
    lost = (version, case["case"], case["stream"]) in LOST
    assert incomplete == (1 if lost else 0)
    if lost:
        # A lower bound, never above the bill, and never passed off as exact.
        assert cost <= vendor_cost(expected)
    else:
        assert (uncached, read, write, out) == expected
        assert total == sum(expected)
        assert cost == vendor_cost(expected)
    assert reasoning <= out  # reasoning is shown apart, billed inside output


def test_the_prompt_cache_request_of_the_issue_costs_what_anthropic_bills():
    # input 100, output 50, cache read 10,000, cache write 2,000: Anthropic bills $0.011550;
    # the portal stored $0.19125 before the split.
    (case,) = [c for c in CASES["7.2.140"] if c["case"] == "claude-messages-cache"
               and not c["stream"]]
    row = row_of("7.2.140", case, case["proxy_record"])
    assert cost_of(PRICE, uncached=row[4], cache_read=row[7], cache_write=row[8],
                   output=row[5]) == Decimal("0.01155")


def test_the_breakdown_wins_over_the_flat_counts():
    # A 7.x record whose flat counts follow no known convention: the schema-2 breakdown is read.
    breakdown = {"schema_version": 2, "quality": "complete", "total_tokens": 60,
                 "input": {"total_tokens": 40, "uncached_tokens": 10, "cache_read_tokens": 20,
                           "cache_write_tokens": 10},
                 "output": {"total_tokens": 20, "non_reasoning_tokens": 5, "reasoning_tokens": 15},
                 "unclassified_tokens": 0}
    split = split_tokens({"input_tokens": 999, "output_tokens": 1, "total_tokens": 7},
                         breakdown=breakdown, provider="openai-compatible-x", model="m")
    assert split == (10, 20, 10, 20, 15, 60, 0)
    # A breakdown that says it could not classify everything makes the record incomplete.
    partial = {**breakdown, "quality": "partial", "unclassified_tokens": 5}
    assert split_tokens({}, breakdown=partial, provider="claude", model="m")[6] == 1
    # An unknown schema falls back to the provider's convention.
    assert split_tokens({"input_tokens": 100, "output_tokens": 5, "cached_tokens": 60,
                         "total_tokens": 105}, breakdown={"schema_version": 3},
                        provider="openai-compatible-x", model="m") == (40, 60, 0, 5, 0, 105, 0)


def test_a_6_9_claude_record_without_cache_is_exact_and_one_with_cache_is_a_lower_bound():
    # 6.9.x puts the cache write in cached_tokens when nothing was read: with no cached count
    # there was neither, so the record is exact.
    plain = split_tokens({"input_tokens": 100, "output_tokens": 50, "total_tokens": 150},
                         model="claude-sonnet-4-5", generation=SNAPSHOT)
    assert plain == (100, 0, 0, 50, 0, 150, 0)
    cached = split_tokens({"input_tokens": 100, "output_tokens": 50, "cached_tokens": 2000,
                           "total_tokens": 150}, model="claude-sonnet-4-5", generation=SNAPSHOT)
    assert cached == (100, 2000, 0, 50, 0, 2150, 1)


def test_a_failed_request_without_counts_is_complete_and_a_served_one_is_not():
    assert split_tokens({}, provider="openai-compatible-x", model="m", failed=True)[6] == 0
    assert split_tokens({}, provider="openai-compatible-x", model="m", failed=False)[6] == 1


def test_a_token_count_that_is_not_an_integer_is_set_aside():
    body = json.dumps([{"timestamp": "2026-12-02T02:55:16.5Z", "api_key": "k" * 20,
                        "model": "m", "tokens": {"input_tokens": "100"}}])
    rows, aside = R.queue_rows(body)
    assert not rows and aside[0].reason == "a token count is not an integer"


@pytest.fixture
def priced(db):
    for model in ("claude-mock-upstream", "claude-mock-upstream-cumdelta", "mock-gpt-upstream",
                  "gemini-mock-upstream", "gpt-5-codex-mock"):
        ModelPrice.objects.update_or_create(model=model, defaults=RATES)


def _expected_rows(version: str) -> tuple[dict[str, tuple], dict[str, int]]:
    split: dict[str, list[int]] = {}
    incomplete: dict[str, int] = {}
    for _ids, case, record in records_of(version):
        model = record.get("model") or case["snapshot_path"][4]
        s = split.setdefault(model, [0, 0, 0, 0])
        if (version, case["case"], case["stream"]) not in LOST:
            for i, n in enumerate(vendor_split(case)):
                s[i] += n
        incomplete[model] = incomplete.get(model, 0) + (
            (version, case["case"], case["stream"]) in LOST)
    return {m: tuple(s) for m, s in split.items()}, incomplete


def test_queue_records_end_in_the_tables_with_the_vendors_cost(priced):
    (held,) = issue(1, ["ann@example.com"])
    body = []
    for _ids, case, record in records_of("7.2.140"):
        if (("7.2.140", case["case"], case["stream"]) in LOST):
            continue  # checked below, apart
        body.append({**record, "api_key": held.value})
    lost = [{**c["proxy_record"], "api_key": held.value} for c in CASES["7.2.140"]
            if ("7.2.140", c["case"], c["stream"]) in LOST]
    from django.utils import timezone

    result = usage_queue_body_ingest(body=json.dumps(body + lost).encode(), now=timezone.now(),
                                     books=Books.load())
    assert result.stored == len(body) + len(lost) and result.incomplete == len(lost)
    expected, _incomplete = _expected_rows("7.2.140")
    for model, (uncached, read, write, out) in expected.items():
        row = UsageSnapshot.objects.get(model=model)
        complete = row.requests - row.incomplete_requests
        assert complete, model
        if not row.incomplete_requests:
            assert (row.input_tokens, row.cached_tokens, row.cache_creation_tokens,
                    row.output_tokens) == (uncached, read, write, out), model
            assert row.cost == vendor_cost((uncached, read, write, out)), model
    claude = UsageSnapshot.objects.get(model="claude-mock-upstream")
    assert claude.incomplete_requests == 1
    # The person's day counts the incomplete request, so every page can say "≥".
    day = UsageDay.objects.get(person=held.key.owner)
    assert day.incomplete_requests == 1 and day.requests == len(body) + len(lost)


def test_snapshot_records_end_in_the_tables_and_the_lost_ones_are_counted_as_incomplete(priced):
    (held,) = issue(1, ["ann@example.com"])
    apis: dict = {held.value: {"models": {}}}
    for _ids, case, record in records_of("6.9.47"):
        model = case["snapshot_path"][4]
        apis[held.value]["models"].setdefault(model, {"details": []})["details"].append(record)
    result = usage_snapshot_ingest(apis=apis)
    lost = sum(1 for c in CASES["6.9.47"] if ("6.9.47", c["case"], c["stream"]) in LOST)
    assert result.incomplete == lost == 4
    gemini = UsageSnapshot.objects.get(model="gemini-mock-upstream")
    (case,) = [c for c in CASES["6.9.47"] if c["case"].startswith("gemini") and not c["stream"]]
    split = vendor_split(case)
    assert (gemini.input_tokens, gemini.cached_tokens, gemini.output_tokens) == (
        split[0] * 2, split[1] * 2, split[3] * 2)
    assert gemini.cost == 2 * vendor_cost(split) and gemini.incomplete_requests == 0
    assert UsageSnapshot.objects.get(model="claude-mock-upstream").incomplete_requests == 2
    assert key_digest(held.value) == held.key.key_hash
    assert not SyncRun.objects.exists()  # ingest alone records no run


def test_the_migration_splits_stored_rows_and_recomputes_their_cost(tmp_path):
    """Rows counted before the split (as the proxy reported them) are turned into the split
    and priced again: the 16x Claude Code overcharge goes away on existing data too."""
    import sqlite3

    from tests.test_migrate import manage

    db_file = tmp_path / "db.sqlite3"
    assert manage(db_file, "migrate", "--noinput").returncode == 0
    back = manage(db_file, "migrate", "usage", "0008", "--noinput")
    assert back.returncode == 0, back.stderr
    rows = [  # model, input, output, reasoning, cached, cache creation, total (as reported)
        ("claude-sonnet-4-5-20250929", 100, 50, 0, 10_000, 2_000, 12_150),  # 7.x
        ("claude-opus-4-5", 100, 50, 0, 10_000, 0, 150),  # 6.9.x
        ("gpt-5", 1_200, 300, 200, 1_000, 0, 1_500),
        ("gemini-2.5-pro", 1_200, 100, 200, 1_000, 0, 1_500),
    ]
    with sqlite3.connect(db_file) as db:
        db.execute(
            "INSERT INTO pool_apikey (value, key_hash, prefix, last4, label, status, proxy_state,"
            " created_at, suspended_for, limit_tokens_day, limit_tokens_month, limit_cost_day,"
            " limit_cost_month, remote_id) VALUES (NULL, ?, 'sk-kp-', 'aaaa', '', 'revoked',"
            " 'removed', '2026-01-01', '', NULL, NULL, NULL, NULL, '')", ("0" * 64,))
        (key_id,) = db.execute("SELECT id FROM pool_apikey").fetchone()
        for n, (model, inp, out, rsn, cached, created, total) in enumerate(rows):
            db.execute(
                "INSERT INTO usage_usagesnapshot (api_key_id, model, hour, requests, failures,"
                " input_tokens, output_tokens, reasoning_tokens, cached_tokens,"
                " cache_creation_tokens, total_tokens, cost) VALUES"
                " (?, ?, ?, 1, 0, ?, ?, ?, ?, ?, ?, '1.0')",
                (key_id, model, f"2026-11-0{n + 1} 10:00:00", inp, out, rsn, cached, created,
                 total))
        from usage.pricing import PriceBook

        book = PriceBook(
            ModelPrice(model=m, input=Decimal(str(i)), output=Decimal(str(o)),
                       cache_read=Decimal(str(r)), cache_write=Decimal(str(w)))
            for m, i, o, r, w in db.execute(
                "SELECT model, input, output, cache_read, cache_write FROM usage_modelprice"))
        prices = {m: book.price_for(m) for m, *_r in rows}

    forward = manage(db_file, "migrate", "usage", "--noinput")
    assert forward.returncode == 0, forward.stderr
    with sqlite3.connect(db_file) as db:
        got = {m: (i, cr, cw, o, t, c, inc) for m, i, cr, cw, o, t, c, inc in db.execute(
            "SELECT model, input_tokens, cached_tokens, cache_creation_tokens, output_tokens,"
            " total_tokens, cost, incomplete_requests FROM usage_usagesnapshot")}
    # (uncached, cache read, cache write, output) as the vendors bill the reported usage.
    expected = {
        "claude-sonnet-4-5-20250929": (100, 10_000, 2_000, 50),
        "claude-opus-4-5": (100, 10_000, 0, 50),
        "gpt-5": (200, 1_000, 0, 300),
        "gemini-2.5-pro": (200, 1_000, 0, 300),
    }
    for model, split in expected.items():
        p = prices[model]
        i, r, w, o = p.input, p.cache_read, p.cache_write, p.output
        usd = (split[0] * i + split[1] * r + split[2] * w + split[3] * o) / 1_000_000
        assert got[model][:5] == (*split, sum(split)), model
        assert Decimal(str(got[model][5])) == usd.quantize(Decimal("1e-8")), model
        assert got[model][6] == 0
    # Sonnet 4.5 at $3 / $15 / $0.30 / $3.75: what Anthropic bills for the issue's request.
    assert Decimal(str(got["claude-sonnet-4-5-20250929"][5])) == Decimal("0.01155")
