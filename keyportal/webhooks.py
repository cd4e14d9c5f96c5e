"""Each chat platform's documented message and signature, and one bounded POST.

Sources (docs/notifications.md cites them too):
- DingTalk custom robot: POST {"msgtype": "text", "text": {"content": ...}}; with "加签" the
  URL gets `&timestamp=<ms>&sign=<urlencode(base64(HmacSHA256(key=secret,
  msg=f"{timestamp}\\n{secret}")))>`; the answer is HTTP 200 with `errcode` 0 on success (a
  refusal is HTTP 200 too, with a non-zero errcode).
- Feishu / Lark custom bot: POST {"msg_type": "text", "content": {"text": ...}}; with
  signature verification the body also carries "timestamp" (seconds, a string) and "sign" =
  base64(HmacSHA256(key=f"{timestamp}\\n{secret}", msg=b"")); success is `code` 0 (older
  deployments answer `StatusCode` 0).
- WeCom group robot: POST {"msgtype": "text", "text": {"content": ...}} (content at most 2048
  bytes), no signature (the key in the URL is the secret); success is `errcode` 0.
- Slack incoming webhook: POST {"text": ...}; success is HTTP 200 (its body is `ok`); errors
  are HTTP 400/403/404/410/500 with a word in the body (`invalid_payload`, `no_text`,
  `channel_is_archived`, ...).
- Generic JSON: the portal's own shape, {"event", "subject", "text", "data", "at"}; with a
  secret, an `X-Portal-Signature: sha256=<hex HmacSHA256(key=secret, msg=body)>` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlsplit

import requests
from django.conf import settings

from pool.bounded import AnswerBroken, AnswerTooLarge, DeadlinePassed, send, session

ANSWER_CAP = 64 * 1024  # a robot answers a few bytes; anything bigger is not a robot
WECOM_TEXT_BYTES = 2048  # WeCom's documented limit on text.content
TEXT_CHARS = 4000  # the others take more; an alert this long is cut, not refused


@dataclass(frozen=True)
class Message:
    event: str
    subject: str
    body: str
    data: dict[str, Any]
    at: str  # ISO 8601, when the alert was raised

    @property
    def text(self) -> str:
        return f"{self.subject}\n\n{self.body}" if self.body else self.subject


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


class DeliveryError(Exception):
    """A delivery that did not go through, told in words that hold no URL and no secret."""


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def _cut_bytes(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def _hmac_b64(key: bytes, msg: bytes) -> str:
    return base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()


def dingtalk_sign(*, secret: str, timestamp_ms: int) -> str:
    """The base64 signature before URL encoding (the receiver decodes the query first)."""
    return _hmac_b64(secret.encode(), f"{timestamp_ms}\n{secret}".encode())


def feishu_sign(*, secret: str, timestamp: int) -> str:
    # Feishu's quirk: the string to sign is the HMAC *key*, and the message is empty.
    return _hmac_b64(f"{timestamp}\n{secret}".encode(), b"")


def build(*, kind: str, url: str, secret: str, message: Message, now: float | None = None
          ) -> Request:
    """The exact request a platform documents for a plain-text message."""
    now = time.time() if now is None else now
    text = message.text[:TEXT_CHARS]
    headers = {"Content-Type": "application/json; charset=utf-8"}
    payload: dict[str, Any]
    if kind == "dingtalk":
        payload = {"msgtype": "text", "text": {"content": text}}
        if secret:
            ms = int(now * 1000)
            sign = quote_plus(dingtalk_sign(secret=secret, timestamp_ms=ms))
            url = f"{url}{'&' if '?' in url else '?'}timestamp={ms}&sign={sign}"
    elif kind == "feishu":
        payload = {"msg_type": "text", "content": {"text": text}}
        if secret:
            seconds = int(now)
            payload = {"timestamp": str(seconds), "sign": feishu_sign(secret=secret,
                                                                        timestamp=seconds),
                       **payload}
    elif kind == "wecom":
        payload = {"msgtype": "text", "text": {"content": _cut_bytes(text, WECOM_TEXT_BYTES)}}
    elif kind == "slack":
        payload = {"text": text}
    else:
        payload = {"event": message.event, "subject": message.subject, "text": message.body,
                   "data": message.data, "at": message.at}
    body = json.dumps(payload, ensure_ascii=False).encode()
    if kind == "json" and secret:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Portal-Signature"] = f"sha256={digest}"
    return Request(url=url, body=body, headers=headers)


def _short(value: Any) -> str:
    return str(value)[:120]


def judge(*, kind: str, status: int, body: bytes) -> None:
    """Raises DeliveryError unless the answer is the platform's documented success."""
    if kind == "slack":
        # Slack's word: HTTP 200 is success (the body says "ok"); a refusal is 400/403/404/
        # 410/500 with a word in the body (invalid_payload, channel_is_archived, ...).
        if status == 200:
            return
        text = body.decode(errors="replace").strip()
        raise DeliveryError(f"HTTP {status}: {_short(text) or 'no answer'}")
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")
    if kind == "json":
        return
    try:
        answer = json.loads(body or b"null")
    except ValueError:
        raise DeliveryError(f"HTTP {status}, an answer that is not JSON") from None
    if not isinstance(answer, dict):
        raise DeliveryError(f"HTTP {status}, an unexpected answer")
    if kind in ("dingtalk", "wecom"):
        code, words = answer.get("errcode"), answer.get("errmsg", "")
    else:  # feishu: `code` now, `StatusCode` on older deployments
        code = answer.get("code", answer.get("StatusCode"))
        words = answer.get("msg", answer.get("StatusMessage", ""))
    if code == 0:
        return
    raise DeliveryError(f"refused by the platform: code {_short(code)} {_short(words)}".strip())


def post(request: Request, *, kind: str, timeout: float | None = None) -> None:
    """One POST, bounded from connect to last byte (pool.bounded: a receiver that drips or
    stalls costs at most `timeout` seconds). Raises DeliveryError in words: the exception
    texts of requests/urllib3 carry the URL, so none of them is ever passed on."""
    timeout = settings.PORTAL_WEBHOOK_TIMEOUT if timeout is None else timeout
    try:
        with session() as http:
            with send(http, "POST", request.url, timeout=timeout, data=request.body,
                      headers=request.headers, allow_redirects=False) as answer:
                status = answer.response.status_code
                body = answer.read(cap=ANSWER_CAP)
    except DeadlinePassed:
        raise DeliveryError(f"no complete answer within {timeout:g} s") from None
    except requests.ConnectTimeout:
        raise DeliveryError(f"could not connect within {timeout:g} s") from None
    except requests.ReadTimeout:
        # The same words as the deadline's: which of the two fires first is a race.
        raise DeliveryError(f"no complete answer within {timeout:g} s") from None
    except requests.ConnectionError as exc:
        text = str(exc).lower()
        if "refused" in text:
            raise DeliveryError("connection refused") from None
        if "name or service" in text or "resolve" in text or "nodename" in text:
            raise DeliveryError("the host name does not resolve") from None
        if "ssl" in text or "certificate" in text:
            raise DeliveryError("TLS failed (certificate or handshake)") from None
        raise DeliveryError("the connection failed") from None
    except AnswerTooLarge:
        raise DeliveryError(f"an answer over {ANSWER_CAP // 1024} KB") from None
    except AnswerBroken:
        raise DeliveryError("the connection broke during the answer") from None
    except requests.RequestException as exc:
        raise DeliveryError(f"the request failed ({type(exc).__name__})") from None
    judge(kind=kind, status=status, body=body)
