"""The token split: what one usage record means in billable parts, whatever the provider and
the proxy version that reported it.

Every record becomes `(uncached input, cache read, cache write, output, reasoning, total,
incomplete)`:
- uncached input, cache read and cache write are disjoint and each has its own price;
- output includes reasoning (vendors bill reasoning as output); reasoning is shown apart;
- total is the sum of the four billed parts, so the same request has the same total on every
  proxy version (6.9.x Claude reported input + output only);
- incomplete is 1 when the proxy itself lost counts of this request, so its cost is a lower
  bound (pages show "≥"), never a cheap exact figure.

How the proxy reports tokens (../shared/fixtures/README.md, read from its source at each tag):
- 7.x records carry `token_breakdown` (schema 2), already split: it wins where present.
- Claude (provider `claude`; on 6.x, which names no provider, a `claude*` model): `input_tokens`
  excludes cache reads and writes (Anthropic's own convention). 7.x reports the write as
  `cache_creation_tokens`; 6.9.x drops it, and its `cached_tokens` is the cache read, or the
  cache write when there was no read: a 6.9.x Claude record with a cached count is priced as a
  read (the cheaper reading) and marked incomplete.
- Everyone else (OpenAI chat and Responses, Gemini, OpenAI-compatible providers): input
  includes the cached part. OpenAI's output includes reasoning; Gemini's does not (its total =
  input + output + reasoning), so reasoning is added to output when the total says it is apart.
- Claude streaming, both versions: the proxy reads only `message_delta`'s usage, so input and
  cache are recorded as 0 while output is not: incomplete.
- 6.9.x OpenAI chat streaming: every count 0 on a successful request: incomplete.

This runs once per request served (the hot loop of sync_usage): plain ints and tuples.
"""

from __future__ import annotations

from typing import Any

QUEUE = "queue"  # /usage-queue or the RESP stream: CLIProxyAPI 6.10.8+ (7.x)
SNAPSHOT = "snapshot"  # /usage: CLIProxyAPI up to 6.9.x

Split = tuple[int, int, int, int, int, int, int]


class SplitError(ValueError):
    """A count the contract does not allow (not an integer)."""


def _count(value: Any) -> int:
    # An absent count is 0; `x or 0` also maps null to 0.
    value = value or 0
    if type(value) is not int:
        raise SplitError("a token count is not an integer")
    return value


def is_claude(provider: Any, model: str) -> bool:
    """Anthropic's way of counting: by the record's provider when it names one (7.x), by the
    model name otherwise (6.x snapshots name none; their models are upstream names)."""
    if isinstance(provider, str) and provider:
        return provider == "claude"
    return model[:6].lower() == "claude"


def split_of_breakdown(breakdown: Any) -> Split | None:
    """The split a 7.x `token_breakdown` (schema 2) gives, or None when it is not one."""
    if type(breakdown) is not dict or breakdown.get("schema_version") != 2:
        return None
    inp, out = breakdown.get("input"), breakdown.get("output")
    if type(inp) is not dict or type(out) is not dict:
        return None
    try:
        uncached = _count(inp.get("uncached_tokens"))
        read = _count(inp.get("cache_read_tokens"))
        write = _count(inp.get("cache_write_tokens"))
        reasoning = _count(out.get("reasoning_tokens"))
        output = _count(out.get("total_tokens")) or (
            _count(out.get("non_reasoning_tokens")) + reasoning
        )
        unclassified = _count(breakdown.get("unclassified_tokens"))
    except SplitError:
        return None
    incomplete = 1 if unclassified or breakdown.get("quality", "complete") != "complete" else 0
    return uncached, read, write, output, reasoning, uncached + read + write + output, incomplete


def split_tokens(tokens: Any, *, breakdown: Any = None, provider: Any = None, model: str = "",
                 generation: str = QUEUE, failed: bool = False) -> Split:
    """The split of one record (see the module's docstring). Raises SplitError for counts
    that are not integers; range checks are the caller's (usage.records)."""
    claude = is_claude(provider, model)
    split = split_of_breakdown(breakdown) if breakdown is not None else None
    if split is None:
        if tokens is None:
            tokens = {}
        get = tokens.get
        inp, out = _count(get("input_tokens")), _count(get("output_tokens"))
        reasoning = _count(get("reasoning_tokens"))
        # Queue records name the cache read `cache_read_tokens`; snapshots only `cached_tokens`.
        read = _count(get("cache_read_tokens")) or _count(get("cached_tokens"))
        write = _count(get("cache_creation_tokens"))
        total = _count(get("total_tokens"))
        incomplete = 0
        if claude:
            uncached = inp
            if generation == SNAPSHOT and read:
                incomplete = 1  # 6.9.x dropped the cache write (see the docstring)
        else:
            uncached = inp - read - write
            if uncached < 0:  # a relay that reports cache beside input, not inside it
                uncached = inp
            if reasoning and total >= inp + out + reasoning:
                out += reasoning  # Gemini: thoughts are beside the candidates
        split = (uncached, read, write, out, reasoning, uncached + read + write + out, incomplete)
    uncached, read, write, out, reasoning, total, incomplete = split
    if not incomplete:
        if claude and out and not (uncached or read or write):
            incomplete = 1  # a Claude stream whose message_start usage the proxy never read
        elif not total and not failed:
            incomplete = 1  # a request served without any count (6.9.x chat streaming)
        if incomplete:
            split = (uncached, read, write, out, reasoning, total, incomplete)
    return split
