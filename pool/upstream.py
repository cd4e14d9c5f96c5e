"""The client of CLIProxyAPI's Management API (`/v0/management`).

Built to the proxy's code, not its published docs (../shared/docs/cliproxyapi-contract.md):
- `GET /api-keys` may answer `{"api-keys": null}`; a PUT of `[]` empties the list and an empty
  list opens the proxy to everyone, so this client refuses to send one.
- `/usage` (snapshot, up to 6.9.x) and `/usage-queue` (destructive pop, 6.10.8+) are both
  spoken; `usage_mode()` tells which one without popping anything.

Every call is bounded from connect to last byte (pool/bounded.py: a proxy that drips its answer
cannot outlast it) and in size (CLIPROXY_MAX_ANSWER_BYTES, refused with UpstreamTooLarge);
answers come out as dataclasses; failures are typed errors whose message is one plain sentence
that never contains a key. A client built with a `budget` (pages: PORTAL_REQUEST_PROXY_BUDGET)
waits at most that long in all: each call's deadline is min(CLIPROXY_TIMEOUT, time left), and
with no time left nothing is sent. A pop can also be streamed to a sink
(`usage_queue_pop_stream`), which is not capped: it goes to disk, not to memory.

The refusal latch. The proxy counts failed management logins per address (localhost
included): each 401 adds one, a successful login resets the count, so does the end of a ban,
and an address idle for over 2 h is forgotten by a sweep that runs every hour (so within 3 h).
The 5th failure bans the address for 30 minutes, which also locks the operator out of the
proxy's own management UI when the portal runs on the proxy's machine. A 403 (remote
management disabled, no secret set, address banned) is not counted. So:
- A 401 or 403 is never retried on the spot. It is remembered in the shared cache (the latch)
  under a fingerprint of (CLIPROXY_URL, CLIPROXY_MANAGEMENT_KEY), so that fixing either
  setting lifts the pause at once, and nothing but probes is sent with that key meanwhile.
- While latched, one cheap probe (`GET /usage-statistics-enabled`) may go out when due, claimed
  with `cache.add` so that one portal process sends it, not each. An answer that is not a
  refusal lifts the latch and the call goes on; a refusal keeps it.
- Probes after a 401 go out 5 and 10 minutes after the refusal (three 401s in all, two short
  of a ban), then 3 h 10 min after the last 401 each time (the proxy has forgotten the count
  by then; 10 minutes of margin). After a 403 they go out every 5 minutes. A probe that gets
  no answer (timeout, connection refused) keeps the latch and waits 5 minutes again.
- The 401s are also counted per proxy URL, whatever the key: a latch never probes while the
  proxy may remember 3 of them, and a new key is tried at once only while it would be the
  4th at most; so the portal's own failures never reach the 5th.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import requests
from django.conf import settings
from django.core.cache import cache
from django.utils.translation import gettext as _

from pool import bounded

MANAGEMENT_PREFIX = "/v0/management"

# The refusal latch (see the module's docstring). Seconds.
PROBE_PATH = "/usage-statistics-enabled"  # cheap, and in every proxy generation
PROBE_EVERY = 5 * 60
PROXY_BAN_AFTER = 5  # the proxy bans an address at its 5th failed login...
STRIKES_BEFORE_PAUSE = 3  # ...the portal lets a latch spend at most 3 of them in a row
PROXY_FORGETS_AFTER = 3 * 60 * 60 + 10 * 60  # idle > 2 h, swept hourly: gone within 3 h
LATCH_KEEP = 24 * 60 * 60  # long after the proxy forgot; refreshed at every attempt

# The settings' default for CLIPROXY_MAX_ANSWER_BYTES: far above any management answer and a
# pop of USAGE_QUEUE_BATCH records (about 1.3 KB each), far below what hurts a worker.
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024


def clock() -> float:
    """Wall-clock seconds for the latch's timestamps, which every portal process reads from
    the shared cache. Tests move it."""
    return time.time()


# --- errors ---------------------------------------------------------------------------------


class UpstreamError(Exception):
    """Base of every failure talking to the proxy; str() is a sentence fit for a person."""


class UpstreamNotConfigured(UpstreamError):
    pass


class UpstreamUnreachable(UpstreamError):
    """No answer: connection refused, DNS, or timeout."""


class UpstreamTooLarge(UpstreamError):
    """An answer over CLIPROXY_MAX_ANSWER_BYTES: refused before it could fill the memory."""


class UpstreamRefused(UpstreamError):
    """401/403: the management key is wrong, missing, or this address is not allowed."""


class UpstreamNotFound(UpstreamError):
    """404: the route does not exist (older proxy, or the management API is disabled)."""


class UpstreamUnexpected(UpstreamError):
    """An answer the contract does not allow: 5xx, 400, non-JSON, or the wrong shape."""


class EmptyKeyListRefused(UpstreamError):
    """The portal never empties the proxy's key list: an empty list opens the proxy."""


# --- answers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokens:
    input: int = 0
    output: int = 0
    reasoning: int = 0
    cached: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request as the proxy reports it. `api_key` is the plaintext client key: hash it,
    never store it."""

    timestamp: datetime
    api_key: str
    model: str
    failed: bool
    tokens: Tokens
    alias: str = ""
    endpoint: str = ""
    provider: str = ""
    request_id: str = ""
    status_code: int | None = None
    latency_ms: int = 0
    source: str = ""


@dataclass(frozen=True)
class UsageSnapshot:
    """The old generation's cumulative snapshot (`GET /usage`)."""

    total_requests: int
    success_count: int
    failure_count: int
    total_tokens: int
    apis: dict[str, Any] = field(repr=False)

    def records(self) -> Iterator[UsageRecord]:
        """Every request in the snapshot, one record each (details are never capped)."""
        for api_key, entry in self.apis.items():
            models = _expect(entry, dict, "usage.apis entry").get("models") or {}
            for model, model_entry in _expect(models, dict, "usage.apis models").items():
                details = _expect(model_entry, dict, "usage model entry").get("details") or []
                for detail in _expect(details, list, "usage details"):
                    yield _record_from(detail, api_key=api_key, model=model)


# --- parsing --------------------------------------------------------------------------------


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UpstreamUnexpected(
            f"The proxy answered with a malformed {what} (expected {kind.__name__})."
        )
    return value


def _int(value: Any, what: str) -> int:
    if value is None:
        return 0
    return _expect(value, int, what)


def _tokens(raw: Any) -> Tokens:
    if raw is None:
        return Tokens()
    raw = _expect(raw, dict, "tokens object")
    return Tokens(
        input=_int(raw.get("input_tokens"), "input_tokens"),
        output=_int(raw.get("output_tokens"), "output_tokens"),
        reasoning=_int(raw.get("reasoning_tokens"), "reasoning_tokens"),
        cached=_int(raw.get("cached_tokens"), "cached_tokens"),
        cache_read=_int(raw.get("cache_read_tokens"), "cache_read_tokens"),
        cache_creation=_int(raw.get("cache_creation_tokens"), "cache_creation_tokens"),
        total=_int(raw.get("total_tokens"), "total_tokens"),
    )


def _timestamp(raw: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(_expect(raw, str, "timestamp"))
    except ValueError:
        raise UpstreamUnexpected("The proxy answered with a timestamp that is not RFC 3339.")
    if parsed.tzinfo is None:
        raise UpstreamUnexpected("The proxy answered with a timestamp without a time zone.")
    return parsed


def _record_from(raw: Any, *, api_key: str | None = None, model: str | None = None) -> UsageRecord:
    raw = _expect(raw, dict, "usage record")
    fail = raw.get("fail") if isinstance(raw.get("fail"), dict) else {}
    status = fail.get("status_code")
    return UsageRecord(
        timestamp=_timestamp(raw.get("timestamp")),
        api_key=api_key if api_key is not None else _expect(raw.get("api_key", ""), str, "api_key"),
        model=model if model is not None else _expect(raw.get("model") or "", str, "model"),
        failed=bool(raw.get("failed", False)),
        tokens=_tokens(raw.get("tokens")),
        alias=_text(raw, "alias"),
        endpoint=_text(raw, "endpoint"),
        provider=_text(raw, "provider"),
        request_id=_text(raw, "request_id"),
        status_code=status if isinstance(status, int) and not isinstance(status, bool) else None,
        latency_ms=raw.get("latency_ms") if isinstance(raw.get("latency_ms"), int) else 0,
        source=_text(raw, "source"),
    )


def _text(raw: dict[str, Any], name: str) -> str:
    """An informational field: kept when it is a string, dropped otherwise (not garbage
    enough to lose a whole batch over)."""
    value = raw.get(name)
    return value if isinstance(value, str) else ""


def parse_usage_queue(body: bytes | str) -> list[UsageRecord]:
    """Records out of a `/usage-queue` answer body. Raises UpstreamUnexpected on garbage."""
    try:
        items = json.loads(body)
    except ValueError:
        raise UpstreamUnexpected("The proxy's usage queue answer is not JSON.")
    return [_record_from(item) for item in _expect(items, list, "usage queue (a list)")]


def parse_usage_snapshot(payload: Any) -> UsageSnapshot:
    payload = _expect(payload, dict, "usage answer")
    usage = _expect(payload.get("usage"), dict, "usage snapshot")
    return UsageSnapshot(
        total_requests=_int(usage.get("total_requests"), "total_requests"),
        success_count=_int(usage.get("success_count"), "success_count"),
        failure_count=_int(usage.get("failure_count"), "failure_count"),
        total_tokens=_int(usage.get("total_tokens"), "total_tokens"),
        apis=_expect(usage.get("apis") or {}, dict, "usage.apis"),
    )


# --- the client -----------------------------------------------------------------------------


class ProxyClient:
    """One `requests.Session` to one proxy. Build it with `ProxyClient.from_settings()`."""

    USAGE_MODE_QUEUE = "queue"
    USAGE_MODE_SNAPSHOT = "snapshot"

    def __init__(
        self, *, base_url: str, management_key: str, timeout: float, budget: float | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        if not base_url:
            raise UpstreamNotConfigured(
                "No proxy is configured: set CLIPROXY_URL (and CLIPROXY_MANAGEMENT_KEY)."
            )
        if not management_key:
            raise UpstreamNotConfigured(
                "CLIPROXY_MANAGEMENT_KEY is not set: the portal cannot manage the proxy."
            )
        self.base_url = base_url.rstrip("/")
        self._key = management_key
        self.timeout = timeout
        # The budget runs from here: build the client right before its calls.
        self.budget = budget
        self._deadline = None if budget is None else time.monotonic() + budget
        self.max_answer_bytes = max_answer_bytes
        self.session = bounded.session()
        self.session.headers["Authorization"] = f"Bearer {management_key}"
        self.requests_sent = 0
        self._strikes_seen = False

    @classmethod
    def from_settings(cls, *, budget: float | None = None) -> ProxyClient:
        """`budget`: seconds this client may wait for the proxy in all (a page passes
        PORTAL_REQUEST_PROXY_BUDGET); None: CLIPROXY_TIMEOUT per call, however many calls."""
        from pool.upstreams.registry import cliproxyapi_endpoint  # noqa: PLC0415 (models)

        where = cliproxyapi_endpoint()  # CLIPROXY_*, or the CLIProxyAPI staff added
        return cls(
            base_url=where.management_url,
            management_key=where.secret,
            timeout=settings.CLIPROXY_TIMEOUT,
            budget=budget,
            max_answer_bytes=settings.CLIPROXY_MAX_ANSWER_BYTES,
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ProxyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        self._pass_latch()
        return self._transport(method, path, **kwargs)

    def _time_left(self) -> float:
        if self._deadline is None:
            return self.timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise UpstreamUnreachable(
                _("Nothing was sent to the proxy at %(url)s: the %(budget)g s a page may wait "
                  "for it (PORTAL_REQUEST_PROXY_BUDGET) are used up.")
                % {"url": self.base_url, "budget": self.budget}
            )
        return min(self.timeout, left)

    def _deadline_error(self, timeout: float, method: str, path: str) -> UpstreamUnreachable:
        """The call did not end by its deadline (no answer, or an answer still arriving): the
        connection is closed by now. Names the setting that set the deadline."""
        if timeout < self.timeout:
            return UpstreamUnreachable(
                _("The proxy at %(url)s did not answer within %(s).1f s, what was left of the "
                  "%(budget)g s a page may wait for it (PORTAL_REQUEST_PROXY_BUDGET).")
                % {"url": self.base_url, "s": timeout, "budget": self.budget}
            )
        return UpstreamUnreachable(
            _("The proxy at %(url)s did not answer within %(s)g s (CLIPROXY_TIMEOUT, the "
              "deadline for its whole answer to %(method)s %(path)s); the portal closed the "
              "connection.")
            % {"url": self.base_url, "method": method, "path": path, "s": self.timeout}
        )

    def _transport(self, method: str, path: str, *, sink: Callable[[bytes], None] | None = None,
                   **kwargs: Any) -> requests.Response:
        """One request, past the latch: sent, read to its last byte within the deadline, its
        refusal remembered, its failure typed. With `sink`, a 200 answer's body goes there
        chunk by chunk (uncapped; `response.written` says how much) instead of into memory."""
        timeout = self._time_left()
        url = f"{self.base_url}{MANAGEMENT_PREFIX}{path}"
        self.requests_sent += 1
        try:
            answer = bounded.send(self.session, method, url, timeout=timeout, **kwargs)
        except (bounded.DeadlinePassed, requests.Timeout):
            raise self._deadline_error(timeout, method, path) from None
        except requests.ConnectionError:
            raise UpstreamUnreachable(
                f"The proxy at {self.base_url} cannot be reached (connection failed); "
                "check CLIPROXY_URL and that the proxy is running."
            ) from None
        except requests.RequestException as exc:
            raise UpstreamUnreachable(
                f"The proxy at {self.base_url} cannot be reached ({type(exc).__name__})."
            ) from None
        with answer:
            response = answer.response
            try:
                if response.status_code != 200:
                    _read_error_body(answer)
                elif sink is not None:
                    response.written = answer.stream(sink)  # type: ignore[attr-defined]
                else:
                    answer.read(cap=self.max_answer_bytes)
            except bounded.DeadlinePassed:
                raise self._deadline_error(timeout, method, path) from None
            except bounded.AnswerBroken:
                raise UpstreamUnreachable(
                    _("The proxy at %(url)s broke the connection before the end of its answer "
                      "to %(method)s %(path)s.")
                    % {"url": self.base_url, "method": method, "path": path}
                ) from None
            except bounded.AnswerTooLarge as exc:
                raise UpstreamTooLarge(
                    _("The proxy at %(url)s answered %(method)s %(path)s with more than "
                      "%(mib)s MiB (CLIPROXY_MAX_ANSWER_BYTES), so the portal refused the "
                      "answer and closed the connection.")
                    % {"url": self.base_url, "method": method, "path": path,
                       "mib": _mib(exc.cap)}
                ) from None
        if response.status_code in (401, 403):
            message = self._refusal_message(response)
            banned = "banned" in _error_text(response).lower()
            self._latch(response.status_code, message, banned=banned)
            raise UpstreamRefused(message)
        if response.status_code == 200 and self._strikes_seen:
            # A login that works resets the proxy's count of failures for this address.
            cache.delete(self._strikes_cache_key)
            self._strikes_seen = False
        if response.status_code == 404:
            raise UpstreamNotFound(
                f"The proxy at {self.base_url} has no {MANAGEMENT_PREFIX}{path} (404): it is an "
                "older or newer version without this call, or its management API is disabled."
            )
        if response.status_code != 200:
            raise UpstreamUnexpected(
                f"The proxy at {self.base_url} answered {method} {path} with HTTP "
                f"{response.status_code}: {_error_text(response)}."
            )
        return response

    # -- the refusal latch (the module's docstring has the rules) ------------------------

    @property
    def refusal_cache_key(self) -> str:
        """Where the latch lives in the shared cache (the admin dashboard reads it without
        calling the proxy). A fingerprint of (url, key): fixing either setting lifts the
        pause at once."""
        digest = hashlib.sha256(f"{self.base_url}\0{self._key}".encode()).hexdigest()[:24]
        return f"upstream:refused:{digest}"

    @property
    def _strikes_cache_key(self) -> str:
        # Per proxy, whatever the key: the proxy counts failures per address, not per key.
        digest = hashlib.sha256(self.base_url.encode()).hexdigest()[:24]
        return f"upstream:strikes:{digest}"

    def _pass_latch(self) -> None:
        """Returns when a call may be sent; raises UpstreamRefused, having sent nothing or
        only a probe, when not."""
        state = cache.get_many([self.refusal_cache_key, self._strikes_cache_key])
        latch, strikes = state.get(self.refusal_cache_key), state.get(self._strikes_cache_key)
        self._strikes_seen = strikes is not None
        now = clock()
        remembered = _remembered(strikes, now)
        if latch is None:
            if remembered >= PROXY_BAN_AFTER - 1:
                wait = strikes["last"] + PROXY_FORGETS_AFTER - now
                raise UpstreamRefused(
                    _("Nothing was sent: the proxy at %(url)s refused the portal's management "
                      "key %(n)d times lately and bans this address at %(ban)d failures, so the "
                      "portal tries again in about %(minutes)d minutes, whatever the key.")
                    % {"url": self.base_url, "n": remembered, "ban": PROXY_BAN_AFTER,
                       "minutes": _minutes(wait)}
                )
            return
        if not isinstance(latch, dict):  # a latch from before the probes: a bare sentence
            latch = {"status": 401, "message": str(latch), "last": now, "strikes": 1,
                     "last_strike": now}
            cache.set(self.refusal_cache_key, latch, LATCH_KEEP)
        due = latch["last"] + PROBE_EVERY
        if latch["strikes"] >= STRIKES_BEFORE_PAUSE:
            due = max(due, latch["last_strike"] + PROXY_FORGETS_AFTER)
        if remembered >= STRIKES_BEFORE_PAUSE:
            due = max(due, strikes["last"] + PROXY_FORGETS_AFTER)
        if now < due:
            raise UpstreamRefused(
                _("%(why)s Nothing was sent: the portal asks the proxy again in about "
                  "%(minutes)d minutes, with one probe shared by all its processes so that it "
                  "never nears the ban; changing CLIPROXY_MANAGEMENT_KEY lifts the pause at "
                  "once.") % {"why": latch["message"], "minutes": _minutes(due - now)}
            )
        # One probe per turn, whichever portal process gets here first. The claim outlives
        # the probe, which moves the turn on when it ends; a process killed mid-probe leaves
        # the turn to another one 5 minutes later.
        turn = f"{self.refusal_cache_key}:probe:{latch['last']!r}"
        if not cache.add(turn, True, PROBE_EVERY):
            raise UpstreamRefused(
                _("%(why)s Nothing was sent: another portal process is asking the proxy again "
                  "right now.") % {"why": latch["message"]}
            )
        self._probe(latch)

    def _probe(self, latch: dict[str, Any]) -> None:
        try:
            self._transport("GET", PROBE_PATH)
        except UpstreamRefused:
            raise  # still refused: _transport has moved the latch on
        except UpstreamUnreachable:
            # No answer says nothing about the key: the latch stays, and waits its turn again.
            cache.set(self.refusal_cache_key, {**latch, "last": clock()}, LATCH_KEEP)
            raise
        except UpstreamError:
            pass  # an answer, and not a refusal: the key got through
        cache.delete(self.refusal_cache_key)

    def _latch(self, status: int, message: str, *, banned: bool) -> None:
        now = clock()
        latch = cache.get(self.refusal_cache_key)
        if not isinstance(latch, dict):
            latch = {"strikes": 0, "last_strike": None}
        latch = {**latch, "status": status, "message": message, "last": now}
        if status == 401:
            latch["strikes"] += 1
            latch["last_strike"] = now
            strikes = cache.get(self._strikes_cache_key)
            cache.set(self._strikes_cache_key,
                      {"count": _remembered(strikes, now) + 1, "last": now}, LATCH_KEEP)
            self._strikes_seen = True
        elif banned:
            # The proxy zeroes its count when it bans, and again when the ban ends.
            latch["strikes"], latch["last_strike"] = 0, None
            cache.delete(self._strikes_cache_key)
        cache.set(self.refusal_cache_key, latch, LATCH_KEEP)

    def _refusal_message(self, response: requests.Response) -> str:
        reason = _error_text(response)
        if response.status_code == 401:
            return _(
                "The proxy at %(url)s refused the management key (%(reason)s): check "
                "CLIPROXY_MANAGEMENT_KEY. The portal pauses its calls and checks again later: "
                "the proxy bans an address after 5 failed attempts."
            ) % {"url": self.base_url, "reason": reason}
        hint = _("check CLIPROXY_MANAGEMENT_KEY and the proxy's remote-management settings")
        if "banned" in reason.lower():
            hint = _("this address is banned for 30 minutes after 5 failed attempts")
        elif "remote management disabled" in reason.lower():
            hint = _("the portal is not on the proxy's machine: turn on remote management there")
        elif "key not set" in reason.lower():
            hint = _("the proxy has no management secret configured")
        return _("The proxy at %(url)s refused the management call (%(reason)s): %(hint)s.") % {
            "url": self.base_url, "reason": reason, "hint": hint,
        }

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise UpstreamUnexpected(
                f"The proxy at {self.base_url} answered {method} {path} with something that is "
                "not JSON."
            ) from None

    def _write(self, method: str, path: str, **kwargs: Any) -> None:
        payload = self._json(method, path, **kwargs)
        if not isinstance(payload, dict) or payload.get("status") != "ok":
            raise UpstreamUnexpected(
                f"The proxy at {self.base_url} did not confirm {method} {path} "
                '(expected {"status": "ok"}).'
            )

    # -- /api-keys -----------------------------------------------------------------------

    def list_keys(self) -> list[str]:
        payload = self._json("GET", "/api-keys")
        if not isinstance(payload, dict) or "api-keys" not in payload:
            raise UpstreamUnexpected(
                f'The proxy at {self.base_url} answered GET /api-keys without an "api-keys" list.'
            )
        keys = payload["api-keys"]
        if keys is None:  # the proxy's way of saying "none"
            return []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise UpstreamUnexpected(
                f"The proxy at {self.base_url} answered GET /api-keys with a list that is not "
                "all strings."
            )
        return keys

    def replace_keys(self, keys: Sequence[str]) -> None:
        """PUT the whole list. One write, whatever its length."""
        keys = list(keys)
        if not keys:
            raise EmptyKeyListRefused(
                "Refusing to empty the proxy's key list: with no keys it lets every request in."
            )
        self._write("PUT", "/api-keys", json=keys)

    def replace_key_at(self, *, index: int, value: str) -> None:
        self._write("PATCH", "/api-keys", json={"index": index, "value": value})

    def replace_key(self, *, old: str, new: str) -> None:
        """Quirk: when `old` is not in the list, the proxy appends `new`."""
        self._write("PATCH", "/api-keys", json={"old": old, "new": new})

    def delete_key(self, *, value: str) -> None:
        """Removes every entry equal to `value`; answers ok even when none matched. Callers
        must make sure the list does not end up empty."""
        self._write("DELETE", "/api-keys", params={"value": value})

    def delete_key_at(self, *, index: int) -> None:
        self._write("DELETE", "/api-keys", params={"index": index})

    # -- usage ---------------------------------------------------------------------------

    def usage_statistics_enabled(self) -> bool:
        payload = self._json("GET", "/usage-statistics-enabled")
        value = payload.get("usage-statistics-enabled") if isinstance(payload, dict) else None
        if not isinstance(value, bool):
            raise UpstreamUnexpected(
                f"The proxy at {self.base_url} answered GET /usage-statistics-enabled without a "
                "true/false value."
            )
        return value

    def set_usage_statistics_enabled(self, enabled: bool) -> None:
        self._write("PUT", "/usage-statistics-enabled", json={"value": enabled})

    def usage_mode(self) -> str:
        """`queue` or `snapshot`, found without popping anything: a count of 0 is refused
        (400) by proxies with the queue, and unknown (404) to those without it."""
        try:
            self._send("GET", "/usage-queue", params={"count": 0})
        except UpstreamNotFound:
            # Old proxies lack the queue; a proxy whose management API is off lacks every
            # route. The statistics switch exists in both generations and tells them apart.
            self.usage_statistics_enabled()
            return self.USAGE_MODE_SNAPSHOT
        except UpstreamUnexpected as exc:
            if "HTTP 400" in str(exc):
                return self.USAGE_MODE_QUEUE
            raise
        # A proxy that answers 200 to count=0 is not one the contract describes; it has a
        # queue, though, and that is what matters.
        return self.USAGE_MODE_QUEUE

    def usage_snapshot(self) -> UsageSnapshot:
        return parse_usage_snapshot(self._json("GET", "/usage"))

    def usage_queue_pop_raw(self, *, count: int) -> bytes:
        """Pops up to `count` records and returns the answer body untouched, so the caller can
        make it durable before parsing: a popped record is gone from the proxy for good."""
        _check_count(count)
        return self._send("GET", "/usage-queue", params={"count": count}).content

    def usage_queue_pop_stream(self, *, count: int, sink: Callable[[bytes], None]) -> int:
        """Pops up to `count` records and hands the answer body to `sink` chunk by chunk as it
        arrives, never holding it whole (so CLIPROXY_MAX_ANSWER_BYTES does not apply: the sink
        writes it to disk). Returns the bytes handed over. The whole answer has the call's
        deadline; when it passes, or the connection breaks, mid-answer, UpstreamUnreachable is
        raised after the chunks read so far went to the sink: the proxy has removed those
        records, and the sink's owner keeps what arrived. What the sink raises comes out
        unchanged (the connection is closed)."""
        _check_count(count)
        response = self._send("GET", "/usage-queue", params={"count": count}, sink=sink)
        return response.written  # type: ignore[attr-defined]

    def usage_queue_pop(self, *, count: int) -> list[UsageRecord]:
        return parse_usage_queue(self.usage_queue_pop_raw(count=count))


ERROR_BODY_CAP = 64 * 1024  # the proxy's error answers are one short JSON object


def _read_error_body(answer: bounded.Answer) -> None:
    """An error answer's body, for its sentence: a huge one is dropped, never refused, so
    that a 401 or 403 is still remembered by the latch whatever came with it."""
    try:
        answer.read(cap=ERROR_BODY_CAP)
    except bounded.AnswerTooLarge:
        answer.response._content = b""  # type: ignore[attr-defined]
        answer.response._content_consumed = True  # type: ignore[attr-defined]


def _check_count(count: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError("count must be a positive integer")


def _error_text(response: requests.Response) -> str:
    """The proxy's own error sentence, short; its answers never echo a key, but cut it anyway
    so a misbehaving server cannot stuff a page or a log line."""
    try:
        payload = response.json()
        text = payload.get("error") if isinstance(payload, dict) else None
    except ValueError:
        text = None
    text = text if isinstance(text, str) and text else (response.text or response.reason or "")
    text = " ".join(text.split())
    return text[:200] or "no reason given"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g}"


def _remembered(strikes: dict[str, Any] | None, now: float) -> int:
    """How many of the portal's failed logins the proxy may still count."""
    if not strikes or now - strikes["last"] >= PROXY_FORGETS_AFTER:
        return 0
    return strikes["count"]


def _minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))
