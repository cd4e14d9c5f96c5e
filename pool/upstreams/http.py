"""One bounded JSON exchange with a relay's admin API, shared by the relay clients
(pool/upstreams/crs.py, pool/upstreams/cch.py).

Every call goes through pool/bounded.py (a deadline from connect to last byte, a watchdog for
dripped answers) and is capped in size: a success up to the client's cap, an error's body up to
ERROR_BODY_CAP (only its sentence is wanted). What can go wrong on the wire becomes one of
pool.upstream's errors with one sentence that names the relay and the call's shape, never a
secret: the caller words the answers (status and JSON) the way its relay means them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import requests

from pool import bounded
from pool.upstream import UpstreamTooLarge, UpstreamUnreachable

ERROR_BODY_CAP = 64 * 1024

# What `Reply.body` is when the answer had a body that is not JSON (an empty body is None).
NOT_JSON = object()


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the parsed JSON, None for an empty body, NOT_JSON otherwise

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return NOT_JSON


def exchange(session: requests.Session, method: str, url: str, *, who: str, where: str,
             timeout: float, max_answer_bytes: int, **kwargs: Any) -> Reply:
    """Sends one request and reads its whole answer within `timeout` seconds. `who` names the
    relay in sentences ("Claude Code Hub at http://..."), `where` the call without ids or
    values ("PATCH /api/v1/keys/<id>"). Raises UpstreamUnreachable (no answer, late, broken)
    or UpstreamTooLarge; any status comes back as a Reply."""
    try:
        answer = bounded.send(session, method, url, timeout=timeout, **kwargs)
    except (bounded.DeadlinePassed, requests.Timeout):
        raise late(who, where, timeout) from None
    except requests.ConnectionError:
        raise UpstreamUnreachable(f"{who} cannot be reached (connection failed).") from None
    except requests.RequestException as exc:
        raise UpstreamUnreachable(f"{who} cannot be reached ({type(exc).__name__}).") from None
    with answer:
        response = answer.response
        try:
            if 200 <= response.status_code < 300:
                raw = answer.read(cap=max_answer_bytes)
            else:
                try:
                    raw = answer.read(cap=ERROR_BODY_CAP)
                except bounded.AnswerTooLarge:
                    raw = b""  # an error's text is only for its sentence
        except bounded.DeadlinePassed:
            raise late(who, where, timeout) from None
        except bounded.AnswerBroken:
            raise UpstreamUnreachable(
                f"{who} broke the connection before the end of its answer to {where}.") from None
        except bounded.AnswerTooLarge as exc:
            raise UpstreamTooLarge(
                f"{who} answered {where} with more than {exc.cap} bytes, so the portal "
                "refused the answer.") from None
    return Reply(response.status_code, parse_json(raw))


def late(who: str, where: str, timeout: float) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"{who} did not finish answering {where} within {timeout:g} s.")


# --- the values both relays' answers carry (the caller turns ValueError into its own
# "answered something unexpected" sentence) ---------------------------------------------------


def money(value: Any) -> Decimal | None:
    """A USD amount as JSON gives it (number or numeric text); None when absent or empty.
    ValueError for anything else, a negative amount, NaN or infinity."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not an amount")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("not an amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("not an amount")
    return amount


def aware_time(value: Any) -> datetime:
    """An ISO 8601 time with its offset ("Z" included). ValueError for anything else, a time
    without an offset included (it would be read in the portal's zone, not the relay's)."""
    if not isinstance(value, str):
        raise ValueError("not a time")
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a time without an offset")
    return moment
