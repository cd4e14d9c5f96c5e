""""Test this key": ask the proxy's client API which models a key may use (`GET /v1/models`),
with the key itself as the credential, the way a client tool would.

Not the management client (pool/upstream.py): that one carries the management key and its
refusal latch, neither of which has any business here; a refused client key costs nothing at
the proxy (no ban counts client keys). Like it, every call is bounded from connect to last
byte by a short deadline and in size (pool/bounded.py), answers are a dataclass, failures are
typed errors whose str() is a sentence for a person, and the key never appears in an error, a log line or an exception chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests
from django.conf import settings
from django.utils.translation import gettext as _

from pool import bounded

if TYPE_CHECKING:
    from pool.models import Upstream

MAX_MODELS = 500  # a page lists them; a proxy answering more is cut, not trusted to be sane


class KeyTestError(Exception):
    """Base of every failure; str() is a sentence fit for the key's owner."""


class KeyTestNotConfigured(KeyTestError):
    pass


class KeyUnknownToProxy(KeyTestError):
    """401/403: the proxy does not (yet) accept this key."""


class ProxyUnreachable(KeyTestError):
    pass


class ProxySlow(KeyTestError):
    pass


class ProxyUnexpected(KeyTestError):
    pass


@dataclass(frozen=True, slots=True)
class ModelList:
    ids: list[str]


def timeout_seconds() -> float:
    # A person waits for this on a page: no longer than a page may wait for the proxy.
    return min(settings.CLIPROXY_TIMEOUT, settings.PORTAL_REQUEST_PROXY_BUDGET)


# Each kind's client model list, as its own client tools ask for it: claude-relay-service
# serves it under /api (src/routes/api.js), Claude Code Hub under /v1, CLIProxyAPI at /v1.
# A relay key is tested at its own relay, with the key itself as the credential.
MODELS_PATH = {"cliproxyapi": "/v1/models", "crs": "/api/v1/models", "cch": "/v1/models"}


def key_models(*, key: str, upstream: Upstream | None = None) -> ModelList:
    """The model ids `upstream` (None: the CLIProxyAPI) offers to `key`. Raises a
    KeyTestError subclass."""
    from pool.upstreams.registry import cliproxyapi_endpoint, endpoint  # noqa: PLC0415 (models)

    if upstream is None or upstream.is_cliproxyapi:
        base, path = cliproxyapi_endpoint().management_url, MODELS_PATH["cliproxyapi"]
    else:
        base, path = endpoint(upstream).management_url, MODELS_PATH[upstream.kind]
    if not base:
        raise KeyTestNotConfigured(
            _("The portal has no proxy address configured, so it cannot test keys; ask staff.")
        )
    timeout = timeout_seconds()
    with bounded.session() as session:
        try:
            # The deadline covers the whole answer: a proxy that drips its model list is cut
            # off like one that says nothing.
            with bounded.send(
                session, "GET", f"{base}{path}", timeout=timeout,
                headers={"Authorization": f"Bearer {key}"}, allow_redirects=False,
            ) as answer:
                answer.read(cap=settings.CLIPROXY_MAX_ANSWER_BYTES)
                response = answer.response
        except (bounded.DeadlinePassed, requests.Timeout):
            raise ProxySlow(
                _("The proxy did not answer within %(s)g seconds. The key may well be fine; try "
                  "again in a moment.") % {"s": timeout}
            ) from None
        except bounded.AnswerTooLarge:
            raise ProxyUnexpected(
                _("The proxy's model list is larger than the portal accepts "
                  "(CLIPROXY_MAX_ANSWER_BYTES); the key could not be tested.")
            ) from None
        except (bounded.AnswerBroken, requests.RequestException):
            raise ProxyUnreachable(
                _("The proxy cannot be reached right now, so the key could not be tested. The "
                  "key may well be fine; try again later.")
            ) from None
    if response.status_code in (401, 403):
        raise KeyUnknownToProxy(
            _("The proxy doesn't know this key yet. A new key usually starts working within a "
              "minute; if this persists, tell staff (and keep the key to yourself).")
        )
    if response.status_code != 200:
        raise ProxyUnexpected(
            _("The proxy answered with HTTP %(status)d instead of a model list; the key could "
              "not be tested.") % {"status": response.status_code}
        )
    try:
        data = response.json().get("data")
        ids = [item["id"] for item in data if isinstance(item.get("id"), str)]
    except (ValueError, AttributeError, TypeError, KeyError):
        raise ProxyUnexpected(
            _("The proxy's model list is not in the expected form; the key could not be "
              "tested.")
        ) from None
    return ModelList(ids=sorted(set(ids))[:MAX_MODELS])
