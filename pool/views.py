"""People's keys: the registration link that issues the first key and the user side of the
JSON API. The /my-keys pages show usage, so they live in the usage app (usage/pages.py) and
reuse the helpers here (`key_shown`, `pool_empty`, `key_limit_reached`)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_POST

from accounts.forms import EMAIL_MAX_LENGTH, EmailField
from accounts.models import SignInLink, User, normalize_email
from accounts.ratelimit import rate_limited
from accounts.selectors import person_by_email, person_email
from accounts.services import LinkInvalid, person_get_or_create, signin_link_peek
from accounts.signin import link_login
from accounts.views import link_gone
from keyportal.api import ApiError, api_token_of, api_view, body_int, body_str, json_body
from keyportal.audit import client_ip
from pool.forms import KeyAddForm, KeyLabelForm, KeyRevokeForm
from pool.keytest import KeyTestError, key_models
from pool.models import ApiKey, Upstream, key_digest
from pool.selectors import pool_status
from pool.upstreams.registry import cliproxyapi_public_url, open_to, public_url
from pool.services import (
    IssuedKey,
    KeyRefused,
    PoolEmpty,
    RelayUnavailable,
    UpstreamClosed,
    key_assign,
    key_rename,
    key_revoke,
    keys_reconcile_in_request,
    pool_empty_notify,
    registration_complete,
    upstreams_open_to_email,
)


# Where each tool goes at each kind of upstream, below its public URL (checked against each
# relay's routes): claude-relay-service serves Claude Code under /api (/api/v1/messages),
# Codex under /openai (/openai/responses), OpenAI-style chat under /openai/v1 (its unified
# router picks the account by model), Gemini's own API under /gemini (/gemini/v1beta/...), and
# its model list at /api/v1/models; Claude Code Hub serves /v1 (messages, chat/completions,
# responses, models) and Gemini's API at /v1beta (src/app/v1beta, the key as x-goog-api-key),
# both below its root; CLIProxyAPI serves all at its root. "chat_host": what Cherry Studio and
# ChatBox want (they add /v1/chat/completions themselves).
_PATHS: dict[str, dict[str, str | None]] = {
    Upstream.Kind.CLIPROXYAPI: {"claude": "", "codex": "/v1", "openai": "/v1", "chat_host": "",
                                "gemini": "", "models": "/v1/models"},
    Upstream.Kind.CRS: {"claude": "/api", "codex": "/openai", "openai": "/openai/v1",
                        "chat_host": "/openai", "gemini": "/gemini", "models": "/api/v1/models"},
    Upstream.Kind.CCH: {"claude": "", "codex": "/v1", "openai": "/v1", "chat_host": "",
                        "gemini": "", "models": "/v1/models"},
}


def _proxy_urls(key: ApiKey | None = None) -> dict[str, Any]:
    """The addresses a key's tools use, at its upstream (the CLIProxyAPI's for a pool key).
    A tool the upstream does not serve gets None (its snippet is left out); with no public
    URL configured every address is empty (the page says to ask staff)."""
    # A key with no upstream is the CLIProxyAPI's (the pool's): no query for its row.
    upstream = key.upstream if key is not None and key.upstream_id is not None else None
    kind = upstream.kind if upstream is not None else Upstream.Kind.CLIPROXYAPI
    base = public_url(key) if key is not None else cliproxyapi_public_url()
    paths = _PATHS[kind]

    def at(name: str) -> str | None:
        tail = paths[name]
        if tail is None:
            return None
        return f"{base}{tail}" if base else ""

    return {
        "upstream_name": upstream.name if upstream is not None else "CLIProxyAPI",
        "upstream_kind": kind,
        "base_url": at("claude"),  # ANTHROPIC_BASE_URL
        "openai_base_url": at("openai"),
        "codex_base_url": at("codex"),
        "chat_host": at("chat_host"),
        "gemini_base_url": at("gemini"),
        "models_url": at("models"),
    }


def key_addresses(key: ApiKey) -> dict[str, Any]:
    """The addresses of `key`'s upstream for its tools (the key page shows them)."""
    return _proxy_urls(key)


def key_shown(request: HttpRequest, issued: IssuedKey, template: str) -> HttpResponse:
    """The only response that ever carries a key's full value: never cached anywhere."""
    context = {"key": issued.key, "value": issued.value, **_proxy_urls(issued.key)}
    response = render(request, template, context)
    add_never_cache_headers(response)
    return response


def pool_empty(request: HttpRequest, template: str) -> HttpResponse:
    pool_empty_notify()
    # htmx swaps only 2xx answers; a full page says 503 so scripts and monitors see it.
    return render(request, template, status=200 if request.htmx else 503)


def _my_keys(user: User) -> list[ApiKey]:
    return list(ApiKey.objects.filter(owner=user).select_related("upstream")
                .order_by("-issued_at", "-id"))


def key_limit_reached(user: User) -> bool:
    return rate_limited(
        scope="key-add", ident=str(user.pk), limit=settings.PORTAL_RATE_KEYS_PER_PERSON,
        window=settings.PORTAL_RATE_WINDOW_SECONDS,
    )


# --- the registration page ------------------------------------------------------------------


@never_cache
@require_http_methods(["GET", "POST"])
def register_confirm(request: HttpRequest, token: str) -> HttpResponse:
    """The registration link. GET only shows a button (mail scanners fetch links); POST uses
    the link, signs the person in and shows their first key, once."""
    link = signin_link_peek(token=token, purpose=SignInLink.Purpose.REGISTER)
    if link is None:
        return link_gone(request)
    # Several upstreams open to the person: they pick where their first key is made.
    form = KeyAddForm(request.POST if request.method == "POST" else None,
                      choices=upstreams_open_to_email(link.email))
    if request.method == "GET" or not form.is_valid():
        return render(request, "accounts/link_confirm.html", {"link": link, "form": form},
                      status=200 if request.method == "GET" else 400)
    picked = form.picked()
    try:
        user, issued = registration_complete(token=token, ip=client_ip(request),
                                             upstream_id=picked.pk if picked else None)
    except LinkInvalid:
        return link_gone(request)
    except UpstreamClosed as exc:
        return render(request, "pool/key_refused.html", {"message": str(exc)}, status=403)
    except PoolEmpty:
        return pool_empty(request, "pool/pool_empty.html")
    except RelayUnavailable as exc:
        # The transaction rolled back: the link stays unused and works again later.
        return render(request, "pool/key_refused.html", {"message": str(exc)}, status=503)
    except KeyRefused as exc:
        # Someone already known, over a limit: the link stays unused (the transaction rolled
        # back) and works again once the limit resets.
        return render(request, "pool/key_refused.html", {"message": str(exc)}, status=403)
    link_login(request, user)
    return key_shown(request, issued, "pool/key_shown.html")


# --- JSON API (user side) -------------------------------------------------------------------
# A session reaches its own keys only. A staff API token acts as its staff person, or, when
# the body names `email`, for that person (register-key creates them if new): automation
# that onboards people. Other people's keys answer 404, exactly like keys that do not exist.


def _api_person(request: HttpRequest, body: dict[str, Any], *, create: bool = False) -> User:
    raw = body_str(body, "email")
    if not raw:
        return request.user
    email = normalize_email(raw)  # a +tag is folded below, with the person (person_email)
    if len(email) > EMAIL_MAX_LENGTH:  # no one can have it; the lookup need not run
        raise ApiError(_("The email address is too long (at most %(max)d characters).")
                       % {"max": EMAIL_MAX_LENGTH})
    if api_token_of(request) is None:
        if person_email(email=email) != request.user.email:
            raise ApiError(_("You can only reach your own keys."), 403)
        return request.user
    if create:
        try:
            email = EmailField().clean(email)
        except forms.ValidationError as exc:
            raise ApiError(" ".join(exc.messages)) from None
        return person_get_or_create(email=email)
    person = person_by_email(email=email)
    if person is None:
        raise ApiError(_("No person uses this email address."), 404)
    return person


def key_refused_error(exc: KeyRefused) -> ApiError:
    """403: the caller is known and the request is well formed, but this person may not get
    a key now; `reason` and `resets_at` (null: not on its own) let a script wait."""
    return ApiError(str(exc), 403, data={
        "reason": exc.reason, "resets_at": exc.until.isoformat() if exc.until else None,
    })


def _api_urls(key: ApiKey) -> dict[str, Any]:
    """The addresses register-key answers with, at the key's upstream: `base_url` is what
    Claude Code takes as ANTHROPIC_BASE_URL, `openai_base_url` what OpenAI-style tools take."""
    urls = _proxy_urls(key)
    return {"base_url": urls["base_url"], "openai_base_url": urls["openai_base_url"]}


def _upstream_name(key: ApiKey) -> str:
    # No upstream: a key of the CLIProxyAPI (the pool's). Names come from the key's row, so
    # callers listing keys select_related("upstream").
    return key.upstream.name if key.upstream_id is not None else "CLIProxyAPI"


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "label": key.label,
        "upstream": _upstream_name(key),
        "masked": key.masked,
        "status": key.status,
        "proxy_state": key.proxy_state,
        "issued_at": key.issued_at.isoformat() if key.issued_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def _form_error(form: forms.Form) -> ApiError:
    fields = form.errors.get_json_data()
    first = next(iter(fields.values()))[0]["message"]
    return ApiError(first)


def _api_upstream(person: User, name: str) -> Upstream | None:
    """The upstream a register-key body names (None: not named, the default applies)."""
    if not name:
        return None
    for each in open_to(person):
        if each.name == name:
            return each
    raise ApiError(_("No upstream of that name is open to this person."))


@api_view(methods=("POST",))
def api_register_key(request: HttpRequest) -> JsonResponse:
    body = json_body(request)
    form = KeyLabelForm({"label": body_str(body, "label")})
    if not form.is_valid():
        raise _form_error(form)
    person = _api_person(request, body, create=True)
    if not person.is_active:  # only a staff token gets here with such a person
        raise ApiError(_("This person's account is deactivated: reactivate it in the admin "
                         "before issuing a key."), 409)
    if api_token_of(request) is None and key_limit_reached(person):
        raise ApiError(_("Too many keys added in a short time; try again later."), 429)
    upstream = _api_upstream(person, body_str(body, "upstream"))
    try:
        issued = key_assign(
            user=person, label=form.cleaned_data["label"], by=request.user,
            ip=client_ip(request), upstream=upstream,
        )
    except KeyRefused as exc:
        raise key_refused_error(exc) from None
    except PoolEmpty:
        pool_empty_notify()
        raise ApiError(_("No key is available right now; staff have been told."), 503) from None
    except RelayUnavailable as exc:
        # A relay that makes its own keys did not make it: nothing was filed.
        raise ApiError(str(exc), 503) from None
    except UpstreamClosed as exc:
        raise ApiError(str(exc), 403) from None
    response = JsonResponse(
        {**_key_json(issued.key), "key": issued.value, "email": person.email,
         **_api_urls(issued.key)},
        status=201,
    )
    add_never_cache_headers(response)
    return response


@api_view(methods=("POST",))
def api_my_keys(request: HttpRequest) -> JsonResponse:
    person = _api_person(request, json_body(request))
    return JsonResponse({"email": person.email, "keys": [_key_json(k) for k in _my_keys(person)]})


def _api_key(request: HttpRequest, body: dict[str, Any]) -> ApiKey:
    """The key a body names by `id` or full `key`, among the keys of the person it acts for."""
    form = KeyRevokeForm({"id": body_int(body, "id"), "key": body_str(body, "key")})
    if not form.is_valid():
        raise _form_error(form)
    person = _api_person(request, body)
    owned = ApiKey.objects.filter(owner=person)
    if form.cleaned_data["id"]:
        key = owned.filter(id=form.cleaned_data["id"]).first()
    else:
        key = owned.filter(key_hash=key_digest(form.cleaned_data["key"])).first()
    if key is None:
        raise ApiError(_("No such key."), 404)
    return key


@api_view(methods=("POST",))
def api_revoke_key(request: HttpRequest) -> JsonResponse:
    body = json_body(request)
    key = _api_key(request, body)
    if key_revoke(key=key, by=request.user, ip=client_ip(request)):
        keys_reconcile_in_request()  # committed already: a slow proxy only postpones removal
        key.refresh_from_db()
    return JsonResponse(_key_json(key))


@api_view(methods=("POST",))
def api_rename_key(request: HttpRequest) -> JsonResponse:
    body = json_body(request)
    if "label" not in body:  # a missing label must not wipe the one the key has
        raise ApiError(_("Give the new `label` (an empty string removes it)."))
    form = KeyLabelForm({"label": body_str(body, "label")})
    if not form.is_valid():
        raise _form_error(form)
    key = _api_key(request, body)
    key_rename(key=key, label=form.cleaned_data["label"], by=request.user, ip=client_ip(request))
    return JsonResponse(_key_json(key))


@api_view(methods=("GET",), staff=True)
def api_key_pool_status(request: HttpRequest) -> JsonResponse:
    status = pool_status()
    return JsonResponse(
        {"total": status.total, "unused": status.unused, "assigned": status.assigned}
    )


# --- "test this key" (the key-shown page) ---------------------------------------------------

KEY_TESTS_PER_MINUTE = 10


@sensitive_post_parameters("key")  # an error report never carries the key
@login_required
@require_POST
def key_test(request: HttpRequest) -> HttpResponse:
    """The key-shown page posts the key it shows; the proxy is asked with it which models it
    may use. Only the signed-in owner of an active key gets an answer (anything else: 404, as
    for keys that do not exist). The key is compared by hash and never logged or shown."""
    raw = request.POST.get("key", "")
    key = None
    if 0 < len(raw) <= 200:
        key = ApiKey.objects.filter(
            owner=request.user, key_hash=key_digest(raw), status=ApiKey.Status.ACTIVE
        ).select_related("upstream").first()
    if key is None:
        raise Http404
    context: dict[str, Any] = {"key": key, "models": None, "error": ""}
    if rate_limited(scope="key-test", ident=str(request.user.pk), limit=KEY_TESTS_PER_MINUTE,
                    window=60):
        context["error"] = _("You have tested keys many times in a minute; please wait a moment.")
    else:
        try:
            # At the key's own upstream: a relay key is tested at its relay.
            context["models"] = key_models(key=raw, upstream=key.upstream).ids
        except KeyTestError as exc:
            context["error"] = str(exc)
    template = "pool/key_test.html#result" if request.htmx else "pool/key_test.html"
    response = render(request, template, context)
    add_never_cache_headers(response)
    return response
