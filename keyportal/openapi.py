"""The JSON API described as an OpenAPI 3.1 document, served at /api/schema and rendered as a
page at /api/docs.

The portal's API is plain Django views (keyportal/api.py), so the description is a table
here rather than a framework's introspection: `OPERATIONS` names each operation by its URL
name and method; the path and its path parameters come from the URL resolver, the enums from
the models, the limits from the forms and settings. tests/test_openapi.py keeps the table
honest: every URL answering JSON must be in it, every documented method and status is
provoked for real, and every JSON body is validated against the schema given here. A new
JSON endpoint therefore fails the tests until it is described below.

Response objects close with `additionalProperties: false`: a field added to a view without
adding it here fails the response-shape test too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.functional import Promise
from django.utils.translation import gettext, pgettext
from django.utils.translation import gettext_lazy as _

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
CSV = "text/csv"
OPENAPI_MEDIA = "application/vnd.oai.openapi+json"
# The dialect 3.1 schemas are written in (JSON Schema 2020-12 plus OpenAPI's keywords).
SCHEMA_DIALECT = "https://spec.openapis.org/oas/3.1/dialect/base"

# --- schemas --------------------------------------------------------------------------------

_DECIMAL = {
    "type": "string",
    # str(Decimal): plain digits, or an exponent for very small amounts ("1E-8").
    "pattern": r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$",
    "examples": ["12.34000000"],
}
_COUNT = {"type": "integer", "minimum": 0}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}


def _obj(properties: dict[str, Any], *, description: str | Promise = "") -> dict[str, Any]:
    """A closed object: every property listed is always present, no other is allowed."""
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _key_fields() -> dict[str, Any]:
    from pool.models import ApiKey

    return {
        "id": {"type": "integer", "minimum": 1},
        "label": {"type": "string", "examples": ["laptop"]},
        "upstream": {"type": "string", "description": _(
            "The name of the upstream (relay) the key belongs to, as staff named it; "
            "“CLIProxyAPI” for the keys of the portal's CLIProxyAPI pool."),
            "examples": ["CLIProxyAPI", "claude-relay-service"]},
        "masked": {"type": "string", "description": _("The key's prefix and last four "
                   "characters; the full value is never shown again."),
                   "examples": ["sk-kp-3f…9a1c"]},
        "status": {"type": "string", "enum": list(ApiKey.Status.values),
                   "examples": [ApiKey.Status.ACTIVE.value]},
        "proxy_state": {"type": "string", "enum": list(ApiKey.ProxyState.values),
                        "examples": [ApiKey.ProxyState.PUSHED.value]},
        "issued_at": _TIME_OR_NULL,
        "last_used_at": _TIME_OR_NULL,
        "revoked_at": _TIME_OR_NULL,
    }


def _email() -> dict[str, Any]:
    from accounts.forms import EMAIL_MAX_LENGTH

    return {"type": "string", "format": "email", "maxLength": EMAIL_MAX_LENGTH,
            "examples": ["ann@example.com"]}


def _body_email() -> dict[str, Any]:
    return {**_email(), "type": ["string", "null"], "description": _(
        "Whose keys. A session may name only its own address; a staff API token may name "
        "anyone (register-key creates the person if new). Left out: the caller.")}


def _totals() -> dict[str, Any]:
    return {
        "requests": _COUNT,
        "tokens": _COUNT,
        "cost": {**_DECIMAL, "description": _("The known cost in USD, as an exact decimal.")},
        "cost_complete": {"type": "boolean", "description": _(
            "False when part of the usage has no price: the cost is then a lower bound.")},
    }


def schemas() -> dict[str, dict[str, Any]]:
    from pool.forms import KeyLabelForm, KeyRevokeForm
    from usage.selectors import PERIODS, RANKINGS

    label_max = KeyLabelForm.base_fields["label"].max_length
    key_max = KeyRevokeForm.base_fields["key"].max_length
    cost_or_null = {**_DECIMAL, "type": ["string", "null"], "description": _(
        "USD, as an exact decimal; null when none of the usage has a price.")}
    cost_complete = {"type": "boolean", "description": _(
        "False when part of the usage has no price, or the proxy lost part of some requests' "
        "token counts: the cost is then a lower bound.")}
    return {
        "Error": _obj(
            {"error": {"type": "string", "description": _("One sentence saying what was wrong."),
                       "examples": ["Authentication required."]}},
            description=_("Every refusal: a 4xx or 5xx answer with one sentence."),
        ),
        "KeyRefused": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": _(
                    "One sentence: why no key was issued and, for a limit, which one and when "
                    "it resets."),
                    "examples": ["You have reached your daily token limit (150,000 of 100,000), "
                                 "so no new key can be added until it resets at 2026-12-03 "
                                 "00:00 CST."]},
                "reason": {"type": "string", "description": _(
                    "Only when a limit refused the key: which one, e.g. `person_tokens_day` "
                    "(the person's daily token limit) or `key_cost_month` (the monthly cost "
                    "limit of one of their keys)."), "examples": ["person_tokens_day"]},
                "resets_at": {"type": ["string", "null"], "format": "date-time",
                              "description": _("Only when a limit refused the key: when it "
                                               "resets and a key can be added again.")},
            },
            "additionalProperties": False,
            "description": _("A refusal (403). When a limit is the reason, `reason` and "
                             "`resets_at` say which and until when."),
        },
        "FieldsError": _obj(
            {
                "error": {"type": "string"},
                "fields": {"type": "object", "additionalProperties": {
                    "type": "array", "items": {"type": "string"}},
                    "description": _("Each refused query parameter with its messages."),
                    "examples": [{"from": ["Enter a valid date."]}]},
            },
            description=_("A refusal naming the query parameters at fault."),
        ),
        "Key": _obj(_key_fields(), description=_("One key, masked.")),
        "IssuedKey": _obj(
            {
                **_key_fields(),
                "key": {"type": "string", "description": _(
                    "The key's full value: shown in this answer only, never again."),
                    "examples": ["sk-kp-…"]},
                "email": _email(),
                "base_url": {"type": "string", "description": _(
                    "Where Claude Code goes (ANTHROPIC_BASE_URL) at the key's upstream: the "
                    "public URL of a CLIProxyAPI or Claude Code Hub, <public URL>/api for "
                    "claude-relay-service. Empty when staff have not configured it.")},
                "openai_base_url": {"type": "string", "description": _(
                    "The OpenAI-compatible base URL at the key's upstream: <public URL>/v1 "
                    "(CLIProxyAPI, Claude Code Hub), <public URL>/openai/v1 "
                    "(claude-relay-service).")},
            },
            description=_("A newly issued key, with its full value this once."),
        ),
        "KeyList": _obj({"email": _email(), "keys": {"type": "array", "items": _ref("Key")}}),
        "PoolStatus": _obj({
            "total": _COUNT,
            "unused": {**_COUNT, "description": _("Keys ready to be handed out.")},
            "assigned": _COUNT,
        }),
        "KeyUsage": _obj({
            "id": {"type": "integer", "minimum": 1},
            "key": {"type": "string", "description": _("The key, masked.")},
            "label": {"type": "string"},
            "upstream": _key_fields()["upstream"],
            "status": _key_fields()["status"],
            "requests": _COUNT,
            "tokens": _COUNT,
            "cost": cost_or_null,
            "cost_complete": cost_complete,
            "last_used_at": _TIME_OR_NULL,
        }),
        "UserStats": _obj({
            "email": _email(),
            "name": {"type": "string"},
            "key_count": _COUNT,
            "total_requests": _COUNT,
            "total_tokens": _COUNT,
            "input_tokens": {**_COUNT, "description": _(
                "Input tokens not read from or written to the prompt cache.")},
            "output_tokens": {**_COUNT, "description": _("Output tokens, reasoning included.")},
            "reasoning_tokens": _COUNT,
            "cache_read_tokens": _COUNT,
            "cache_write_tokens": _COUNT,
            "incomplete_requests": {**_COUNT, "description": _(
                "Requests whose token counts the proxy partly lost: their cost is a lower "
                "bound.")},
            "failures": _COUNT,
            "total_cost": cost_or_null,
            "cost_complete": cost_complete,
            "keys": {"type": "array", "items": _ref("KeyUsage")},
        }),
        "PersonUsage": _obj({
            "email": _email(),
            "name": {"type": "string"},
            "key_count": _COUNT,
            "total_requests": _COUNT,
            "total_tokens": _COUNT,
            "total_cost": cost_or_null,
            "cost_complete": cost_complete,
        }),
        "AllUsersStats": _obj({
            "users": {"type": "array", "items": _ref("PersonUsage")},
            "summary": _obj({
                "total_users": _COUNT,
                "total_keys": _COUNT,
                "total_requests": _COUNT,
                "total_tokens": _COUNT,
                "total_cost": cost_or_null,
                "cost_complete": cost_complete,
            }),
        }),
        "SyncReport": _obj({
            "ok": {"type": "boolean"},
            "mode": {"type": "string", "description": _(
                "How usage was read: the proxy's queue or its cumulative snapshot."),
                "examples": ["queue"]},
            "message": {"type": "string"},
            "records_read": _COUNT,
            "records_stored": _COUNT,
            "records_foreign": {**_COUNT, "description": _(
                "Records of keys the portal did not issue (the operator's own).")},
            "records_unissued": _COUNT,
            "records_quarantined": _COUNT,
            "records_incomplete": _COUNT,
            "people_touched": _COUNT,
            "duration_seconds": {"type": "number", "minimum": 0},
            "keys_suspended": {**_COUNT, "description": _(
                "Keys suspended by the limits after this sync.")},
        }),
        "Leaderboard": _obj({
            "period": {"type": "string", "enum": list(PERIODS)},
            "by": {"type": "string", "enum": list(RANKINGS)},
            "since": {"type": ["string", "null"], "format": "date", "description": _(
                "The first day counted; null for all time.")},
            "totals": _obj(_totals()),
            "active_people": _COUNT,
            "people_with_keys": _COUNT,
            "keys_held": _COUNT,
            "rows": {"type": "array", "items": _obj({
                "rank": {"type": "integer", "minimum": 1},
                "email": _email(),
                "name": {"type": "string"},
                **_totals(),
                "share": {"type": "number", "minimum": 0, "maximum": 100, "description": _(
                    "Percent of the period's total by the ranking measure.")},
            })},
        }),
        # Request bodies: every field may be left out or null.
        "RegisterKeyRequest": {
            "type": "object",
            "properties": {
                "label": {"type": ["string", "null"], "maxLength": label_max, "description": _(
                    "Where the key will be used, e.g. “laptop” or “CI”."),
                    "examples": ["ci"]},
                "email": _body_email(),
                "upstream": {"type": ["string", "null"], "maxLength": 60, "description": _(
                    "Where the key is made, by the upstream's name, among those open to the "
                    "person. Left out: the first one open to them."),
                    "examples": ["claude-relay-service"]},
            },
        },
        "MyKeysRequest": {"type": "object", "properties": {"email": _body_email()}},
        "RevokeKeyRequest": {
            "type": "object",
            "description": _("Give the key's `id`, or its full value as `key`."),
            "properties": {
                "id": {"type": ["integer", "null"], "minimum": 1, "examples": [12]},
                "key": {"type": ["string", "null"], "maxLength": key_max},
                "email": _body_email(),
            },
        },
        "RenameKeyRequest": {
            "type": "object",
            "description": _("Give the key's `id`, or its full value as `key`, and its new "
                             "`label` (an empty string removes the label)."),
            "required": ["label"],
            "properties": {
                "id": {"type": ["integer", "null"], "minimum": 1, "examples": [12]},
                "key": {"type": ["string", "null"], "maxLength": key_max},
                "label": {"type": "string", "maxLength": label_max, "description": _(
                    "The new label: no control characters or line breaks."),
                    "examples": ["build box"]},
                "email": _body_email(),
            },
        },
    }


# --- operations -----------------------------------------------------------------------------

SESSION = "session"  # session cookie (+ CSRF header on unsafe methods)
TOKEN = "token"  # Authorization: Bearer <staff API token>

_STANDARD: dict[int, Promise] = {
    400: _("Bad input: the body or a parameter is not what this endpoint takes. Nothing "
           "was changed."),
    401: _("No session and no token, or the API token is invalid or revoked."),
    403: _("Signed in, but not allowed: a session without the CSRF token, someone else's "
           "keys or usage, a staff-only endpoint, or a staff session from an emailed link "
           "(staff need their password sign-in or an API token)."),
    404: _("No such person or key, or not one the caller may reach."),
    405: _("The method is not allowed; the Allow header lists the one that is."),
    413: _("The body is too large."),
}


@dataclass(frozen=True)
class Answer:
    """One documented status of an operation: its meaning and body (a schema name, or None
    for no body)."""

    description: str | Promise
    schema: str | None = "Error"
    media: str = JSON


def _answers(*codes: int, **specific: Answer) -> dict[int, Answer]:
    """The standard refusals for `codes`, plus `specific` ones given as `s503=Answer(...)`."""
    answers = {code: Answer(_STANDARD[code]) for code in codes}
    answers.update({int(name[1:]): answer for name, answer in specific.items()})
    return dict(sorted(answers.items()))


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" or "path"
    description: str | Promise
    schema: dict[str, Any]
    required: bool = True


@dataclass(frozen=True)
class Operation:
    url_name: str
    method: str
    operation_id: str
    tag: str
    summary: str | Promise
    description: str | Promise
    answers: dict[int, Answer]
    auth: tuple[str, ...] = (SESSION, TOKEN)
    staff: bool = False
    body: str | None = None  # a request schema name
    params: tuple[Param, ...] = ()
    public: bool = False  # no sign-in at all


TAG_KEYS = "keys"
TAG_USAGE = "usage"
TAG_STAFF = "staff"
TAG_META = "meta"
TAGS: dict[str, Promise] = {
    TAG_KEYS: _("Keys: issue, list and revoke API keys."),
    TAG_USAGE: _("Usage: what keys did, per person and in total."),
    TAG_STAFF: _("Staff reports, for staff API tokens."),
    TAG_META: _("This description."),
}


def _ok(description: str | Promise, schema: str) -> Answer:
    return Answer(description, schema)


# The staff reports answer a caller without a token with the admin's sign-in page instead.
_BAD_TOKEN = Answer(_("The API token is invalid or revoked."))
# Django's require_GET answers other methods 405 with an empty body (and an Allow header).
_GET_ONLY = Answer(_("The method is not allowed; use GET."), schema=None)


def operations() -> tuple[Operation, ...]:
    from usage.export import COLUMNS, PRESETS
    from usage.selectors import PERIODS, RANKINGS

    # The separator is translated too: Chinese lists take "、", not an ASCII comma.
    columns = pgettext("list separator", ", ").join(str(c) for c in COLUMNS)

    return (
        Operation(
            "api-register-key", "post", "registerKey", TAG_KEYS,
            _("Issue a key"),
            _("Hands the caller (or, for a staff token, the person named by `email`) a key: "
              "from the pool of the portal's CLIProxyAPI, or made at the relay named by "
              "`upstream` (claude-relay-service, Claude Code Hub). The answer is the only one that ever carries the key's full "
              "value, and is never cached."),
            _answers(400, 401, 405, 413,
                     s201=_ok(_("The key was issued."), "IssuedKey"),
                     s403=Answer(_("Not allowed: a session without the CSRF token or naming "
                                   "someone else, or the person has reached a limit (theirs, "
                                   "or the own limit of one of their keys): no key is issued "
                                   "until it resets, or until staff raise it."), "KeyRefused"),
                     s409=Answer(_("The person named is deactivated (staff tokens only).")),
                     s429=Answer(_("Too many keys added in a short time (sessions only).")),
                     s503=Answer(_("The pool is empty (staff have been told), or the "
                                   "relay the key is made at did not make it."))),
            body="RegisterKeyRequest",
        ),
        Operation(
            "api-my-keys", "post", "listKeys", TAG_KEYS,
            _("List keys"),
            _("The caller's keys (or, for a staff token, those of the person named by "
              "`email`), newest first, masked."),
            _answers(400, 401, 403, 404, 405, 413, s200=_ok(_("The keys."), "KeyList")),
            body="MyKeysRequest",
        ),
        Operation(
            "api-revoke-key", "post", "revokeKey", TAG_KEYS,
            _("Revoke a key"),
            _("Revokes one of the caller's keys (or of the person named by `email`, for a "
              "staff token), by id or by full value, and removes it from the proxy. Revoking "
              "a revoked key again answers it unchanged."),
            _answers(400, 401, 403, 404, 405, 413, s200=_ok(_("The revoked key."), "Key")),
            body="RevokeKeyRequest",
        ),
        Operation(
            "api-rename-key", "post", "renameKey", TAG_KEYS,
            _("Rename a key"),
            _("Gives one of the caller's keys (or of the person named by `email`, for a staff "
              "token), found by id or by full value, a new label. The change is in the audit "
              "log."),
            _answers(400, 401, 403, 404, 405, 413, s200=_ok(_("The renamed key."), "Key")),
            body="RenameKeyRequest",
        ),
        Operation(
            "api-key-pool-status", "get", "poolStatus", TAG_KEYS,
            _("Pool counts"),
            _("How many keys exist, how many are ready to hand out and how many are held."),
            _answers(401, 403, 405, s200=_ok(_("The counts."), "PoolStatus")),
            staff=True,
        ),
        Operation(
            "api-user-stats", "get", "userStats", TAG_USAGE,
            _("One person's usage"),
            _("A person's totals and their keys' usage. People read their own; staff read "
              "anyone's with an API token or a password sign-in to the admin (with its "
              "authenticator code, when one is set up), as for the staff-only endpoints."),
            _answers(401, 403, 404, 405, s200=_ok(_("The person's usage."), "UserStats")),
            params=(Param("email", "path", _("The person's email address."), _email()),),
        ),
        Operation(
            "api-all-users-stats", "get", "allUsersStats", TAG_USAGE,
            _("Everyone's usage"),
            _("Everyone who holds a key, biggest users first, with a summary."),
            _answers(401, 403, 405, s200=_ok(_("Everyone's usage."), "AllUsersStats")),
            staff=True,
        ),
        Operation(
            "api-sync-usage", "post", "syncUsage", TAG_USAGE,
            _("Sync usage now"),
            _("Reads new usage from the proxy, as the `sync_usage` command does, and applies "
              "the limits. Takes no body."),
            _answers(401, 403, 405, 413,
                     s200=_ok(_("The sync ran."), "SyncReport"),
                     s409=Answer(_("Another usage sync is running.")),
                     s502=Answer(_("The proxy could not be read or refused the management "
                                   "key."))),
            staff=True,
        ),
        Operation(
            "staff-leaderboard", "get", "leaderboard", TAG_STAFF,
            _("Leaderboard"),
            _("People ranked by usage over a period. A staff API token gets JSON; a browser "
              "session gets the page in the admin instead."),
            _answers(s200=_ok(_("The ranking."), "Leaderboard"),
                     s401=_BAD_TOKEN,
                     s400=Answer(_("Unknown period or ranking.")),
                     s405=_GET_ONLY),
            auth=(TOKEN,), staff=True,
            params=(
                Param("period", "query", _("The period counted."),
                      {"type": "string", "enum": list(PERIODS), "default": "7d"}, False),
                Param("by", "query", _("What people are ranked by."),
                      {"type": "string", "enum": list(RANKINGS), "default": "tokens"}, False),
            ),
        ),
        Operation(
            "usage-export", "get", "exportUsage", TAG_STAFF,
            _("Usage export (CSV)"),
            _("Usage per day, person, key and model, as CSV (UTF-8 with a byte order mark), "
              "streamed. Days are the portal's time zone. A staff API token gets the CSV or a "
              "JSON refusal; a browser session gets the export form instead."),
            _answers(s200=Answer(_("The CSV, one row per key, model and day, keys masked, "
                                   "cost in USD. Columns: %(columns)s; with a display "
                                   "currency set, one more: the cost in it.")
                                 % {"columns": columns},
                                 schema=None, media=CSV),
                     s401=_BAD_TOKEN,
                     s400=Answer(_("Missing or bad dates, or dates out of range (from "
                                   "2000-01-01 to 9998-12-31)."), "FieldsError"),
                     s405=_GET_ONLY),
            auth=(TOKEN,), staff=True,
            params=(
                Param("from", "query", _("The first day (YYYY-MM-DD); needed unless preset."),
                      {"type": "string", "format": "date"}, False),
                Param("to", "query", _("The last day, included (YYYY-MM-DD); needed unless "
                                       "preset."),
                      {"type": "string", "format": "date"}, False),
                Param("preset", "query", _("A ready-made period instead of from and to, "
                                           "counted from today in the portal's time zone."),
                      {"type": "string", "enum": list(PRESETS)}, False),
            ),
        ),
        Operation(
            "api-schema", "get", "openapiSchema", TAG_META,
            _("This OpenAPI description"),
            _("The OpenAPI 3.1 document describing this API; its server URL is the one the "
              "request came to. A human-readable version is at /api/docs."),
            {200: Answer(_("The OpenAPI document."), schema=None, media=OPENAPI_MEDIA),
             405: _GET_ONLY},
            auth=(), public=True,
        ),
    )


# --- paths from the URL resolver ------------------------------------------------------------


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for item in patterns:
        route = str(item.pattern)
        if isinstance(item, URLResolver):
            yield from _walk(item.url_patterns, prefix + route)
        elif isinstance(item, URLPattern):
            yield prefix + route, item


def url_patterns() -> Iterator[tuple[str, URLPattern]]:
    """Every URL pattern with its full route ("api/user-stats/<str:email>")."""
    yield from _walk(get_resolver().url_patterns)


def _openapi_path(route: str) -> str:
    """"api/user-stats/<str:email>" -> "/api/user-stats/{email}"."""
    parts = []
    for piece in route.split("<"):
        if ">" in piece:
            name, rest = piece.split(">", 1)
            parts.append("{" + name.split(":")[-1] + "}" + rest)
        else:
            parts.append(piece)
    return "/" + "".join(parts)


def route_of(url_name: str) -> str:
    for route, pattern in url_patterns():
        if pattern.name == url_name:
            return route
    raise LookupError(url_name)


def path_of(url_name: str) -> str:
    return _openapi_path(route_of(url_name))


# --- the document ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Lazy translations forced to text in the active language, recursively."""
    if isinstance(value, Promise):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _security(op: Operation) -> list[dict[str, list[str]]]:
    options: list[dict[str, list[str]]] = []
    if SESSION in op.auth:
        unsafe = op.method not in ("get", "head", "options")
        options.append({"session": [], "csrf": []} if unsafe else {"session": []})
    if TOKEN in op.auth:
        options.append({"token": []})
    return options


def _auth_note(op: Operation) -> Promise | str:
    if op.public:
        return _("No sign-in needed.")
    if op.staff and op.auth == (TOKEN,):
        return _("Staff API token only.")
    if op.staff:
        return _("Staff only: a staff API token, or a staff session signed in with a password.")
    return _("A session (signed-in person) or a staff API token.")


def _operation(op: Operation) -> dict[str, Any]:
    item: dict[str, Any] = {
        "operationId": op.operation_id,
        "tags": [op.tag],
        "summary": op.summary,
        "description": f"{op.description}\n\n{_auth_note(op)}",
        "security": _security(op),
        "responses": {},
    }
    if op.params:
        item["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
             "description": p.description, "schema": p.schema}
            for p in op.params
        ]
    if op.body:
        item["requestBody"] = {
            "required": False,
            "description": _("A JSON object; an empty body counts as {}."),
            "content": {JSON: {"schema": _ref(op.body)}},
        }
    for code, answer in op.answers.items():
        response: dict[str, Any] = {"description": answer.description}
        if answer.schema is not None:
            response["content"] = {answer.media: {"schema": _ref(answer.schema)}}
        elif answer.media == OPENAPI_MEDIA:
            response["content"] = {answer.media: {"schema": {"type": "object"}}}
        elif answer.media != JSON:
            response["content"] = {answer.media: {"schema": {"type": "string"}}}
        if code == 405:
            response["headers"] = {"Allow": {"description": _("The allowed method."),
                                             "schema": {"type": "string"}}}
        item["responses"][str(code)] = response
    return item


def document(*, server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, its texts in the active language."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations():
        paths.setdefault(path_of(op.url_name), {})[op.method] = _operation(op)
    csrf_header = settings.CSRF_HEADER_NAME.removeprefix("HTTP_").replace("_", "-")
    return _plain({
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": SCHEMA_DIALECT,
        "info": {
            "title": _("Key Portal API"),
            "version": "1",
            "description": _(
                "Self-service API keys and usage for the shared proxy. Bodies and answers are "
                "JSON; every refusal is a JSON object with one sentence in `error` and the "
                "status saying why. Callers authenticate with their session (and send the "
                "CSRF token on unsafe methods) or with a staff API token."),
        },
        "servers": [{"url": server_url}],
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie",
                            "name": settings.SESSION_COOKIE_NAME, "description": _(
                                "The session of a signed-in person (sign in at /login).")},
                "csrf": {"type": "apiKey", "in": "header", "name": csrf_header,
                         "description": _(
                             "The CSRF token (the %(cookie)s cookie's value), required with a "
                             "session on unsafe methods.") % {"cookie": settings.CSRF_COOKIE_NAME}},
                "token": {"type": "http", "scheme": "bearer", "description": _(
                    "A staff API token: Authorization: Bearer kpt_…. Staff create and revoke "
                    "tokens in the admin; a token acts as its staff person and needs no CSRF "
                    "token.")},
            },
        },
    })


# --- examples for the docs page -------------------------------------------------------------


def example(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """A made-up value shaped like `schema` (its first `examples` entry where given), for
    the docs page. Never real data."""
    if "$ref" in schema:
        return example(components[schema["$ref"].rsplit("/", 1)[-1]], components)
    if "examples" in schema:
        return schema["examples"][0]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties and isinstance(schema.get("additionalProperties"), dict):
            return {"name": example(schema["additionalProperties"], components)}
        return {name: example(sub, components) for name, sub in properties.items()}
    if kind == "array":
        return [example(schema.get("items", {}), components)]
    if schema.get("format") == "date-time":
        return "2026-11-22T09:30:00+00:00"
    if schema.get("format") == "date":
        return "2026-11-22"
    if schema.get("format") == "email":
        return "ann@example.com"
    return {"string": "…", "integer": 1, "number": 1.5, "boolean": True}[kind]


def example_json(schema: dict[str, Any], components: dict[str, Any]) -> str:
    return json.dumps(example(schema, components), indent=2, ensure_ascii=False)


# --- the docs page --------------------------------------------------------------------------


def type_label(schema: dict[str, Any]) -> str:
    """"string", "integer | null", "array of Key", "Error": a schema as a few words."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "object")
    kinds = kind if isinstance(kind, list) else [kind]
    words = []
    for item in kinds:
        if item == "array":
            items = type_label(schema.get("items", {}))
            words.append(gettext("array of %(items)s") % {"items": items})
        elif item == "string" and schema.get("format"):
            words.append(f"string ({schema['format']})")
        else:
            words.append(item)
    text = " | ".join(words)
    if "enum" in schema:
        text += ": " + ", ".join(str(v) for v in schema["enum"])
    if "default" in schema:
        text += " " + gettext("(default: %(value)s)") % {"value": schema["default"]}
    return text


Segments = list[tuple[str, bool]]


def segments(text: str) -> list[Segments]:
    """Paragraphs of `text`, each as (text, is_code) pieces: the descriptions mark names
    with backticks, as CommonMark does, and the page shows them as code (escaped by the
    template like any text)."""
    return [
        [(piece, n % 2 == 1) for n, piece in enumerate(paragraph.split("`")) if piece]
        for paragraph in text.split("\n\n")
    ]


@dataclass(frozen=True)
class FieldRow:
    name: str
    where: str
    type: str
    required: bool
    description: str


@dataclass(frozen=True)
class AnswerRow:
    status: str
    description: str
    media: str
    schema_name: str
    example: str


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    anchor: str
    summary: str
    description: list[Segments]
    auth: list[str]
    fields: list[FieldRow]
    answers: list[AnswerRow]


def _fields(item: dict[str, Any], components: dict[str, Any]) -> list[FieldRow]:
    rows = [
        FieldRow(p["name"], p["in"], type_label(p["schema"]), p["required"],
                 p.get("description", ""))
        for p in item.get("parameters", [])
    ]
    body = item.get("requestBody", {}).get("content", {}).get(JSON)
    if body:
        schema = components[body["schema"]["$ref"].rsplit("/", 1)[-1]]
        required = set(schema.get("required", ()))
        rows += [
            FieldRow(name, "body", type_label(sub), name in required, sub.get("description", ""))
            for name, sub in schema.get("properties", {}).items()
        ]
    return rows


def _answer_rows(item: dict[str, Any], components: dict[str, Any]) -> list[AnswerRow]:
    rows = []
    for status, response in item["responses"].items():
        media, schema_name, shown = "", "", ""
        for media, content in response.get("content", {}).items():
            schema = content["schema"]
            if "$ref" in schema:
                schema_name = type_label(schema)
                # Refusals share one shape, shown once at the top of the page.
                shown = "" if schema_name == "Error" else example_json(schema, components)
        rows.append(AnswerRow(status, response["description"], media, schema_name, shown))
    return rows


def endpoints(doc: dict[str, Any]) -> dict[str, list[Endpoint]]:
    """The document's operations grouped by tag, shaped for the docs page."""
    components = doc["components"]["schemas"]
    schemes = doc["components"]["securitySchemes"]
    groups: dict[str, list[Endpoint]] = {tag["name"]: [] for tag in doc["tags"]}
    for path, methods in doc["paths"].items():
        for method, item in methods.items():
            auth = [
                " + ".join(
                    f"{schemes[name]['name']} ({schemes[name]['in']})"
                    if schemes[name]["type"] == "apiKey" else "Authorization: Bearer"
                    for name in option
                )
                for option in item["security"]
            ]
            groups[item["tags"][0]].append(Endpoint(
                method=method.upper(), path=path, anchor=item["operationId"],
                summary=item["summary"], description=segments(item["description"]),
                auth=auth, fields=_fields(item, components),
                answers=_answer_rows(item, components),
            ))
    return groups
