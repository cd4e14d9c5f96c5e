"""The JSON API's front door: who is calling, and errors as JSON with the right status.

Callers authenticate with their session (browser, same-site scripts) or with a staff API
token sent as `Authorization: Bearer <token>` (automation; staff create and revoke tokens in
the admin). A session caller's unsafe requests must carry the CSRF token; a token caller's
need not (a browser never attaches the header on its own, so there is nothing to forge)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from accounts.models import ApiToken
from accounts.services import api_token_authenticate
from accounts.signin import staff_with_password

View = Callable[..., HttpResponse]


class ApiError(Exception):
    """Raised by an API view to answer `{"error": message}` with `status` (400: bad input)."""

    def __init__(self, message: str, status: int = 400, *,
                 data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.data = data or {}  # more fields for scripts, next to "error"


def api_error(message: str, status: int, *, data: dict[str, Any] | None = None) -> JsonResponse:
    return JsonResponse({"error": message, **(data or {})}, status=status)


# Why a staff session is refused a staff call (api_view(staff=True), /api/user-stats).
STAFF_SIGN_IN = gettext_lazy(
    "Staff calls need an API token or a password sign-in to the admin (with its authenticator "
    "code, when one is set up)."
)


def api_token_of(request: HttpRequest) -> ApiToken | None:
    """The staff API token the request was authenticated with, or None (a session)."""
    return getattr(request, "api_token", None)


# The API's bodies are a few short fields; anything bigger is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# Bodies are flat objects; a cap on nesting keeps the parser and the checks below shallow.
MAX_DEPTH = 20


def _too_large() -> ApiError:
    return ApiError(_("The body is too large."), 413)


def _body_bytes(request: HttpRequest) -> bytes:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > MAX_BODY_BYTES:
        raise _too_large()
    try:
        raw = request.body  # Django refuses more than DATA_UPLOAD_MAX_MEMORY_SIZE itself
    except RequestDataTooBig:
        raise _too_large() from None
    if len(raw) > MAX_BODY_BYTES:
        raise _too_large()
    return raw


def _check_values(body: Any) -> None:
    """Refuses what would fail later, deep in a form, a hash or the database, as a 500: nesting
    past MAX_DEPTH, and strings with lone surrogates (they cannot be encoded as UTF-8) or NUL
    characters (PostgreSQL text cannot hold them). Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(_("The body is nested too deeply."))
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise ApiError(_("The body contains a NUL character."))
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(_("The body contains text that is not valid Unicode.")) from None


def json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object; an empty body counts as `{}`. Every API view that takes a
    body reads it here, so bad input is answered alike (400, or 413 when too large)."""
    raw = _body_bytes(request)
    if not raw:
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(_("The body is not valid JSON.")) from None
        except RecursionError:
            raise ApiError(_("The body is nested too deeply.")) from None
    if not isinstance(body, dict):
        raise ApiError(_("The body must be a JSON object."))
    _check_values(body)
    return body


def body_str(body: dict[str, Any], name: str) -> str:
    """`body[name]` as text: missing or null is ""; any other type is refused."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(_("`%(name)s` must be a string.") % {"name": name})
    return value


def body_int(body: dict[str, Any], name: str) -> int | None:
    """`body[name]` as a whole number: missing or null is None; text, floats and booleans
    are refused (True would otherwise count as 1)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(_("`%(name)s` must be an integer.") % {"name": name})
    return value


def _bearer(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _sep, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def _csrf_refused(request: HttpRequest) -> bool:
    # The view is csrf_exempt so that token callers pass; session callers get the same
    # check the middleware would have made.
    check = CsrfViewMiddleware(lambda _request: HttpResponse())
    return check.process_view(request, None, (), {}) is not None


def api_view(*, methods: tuple[str, ...], staff: bool = False) -> Callable[[View], View]:
    """Wraps a JSON endpoint: allowed methods, an authenticated caller (session or staff API
    token), and staff-only where asked. Answers 401/403/405 as JSON, never a redirect to a
    login page a script cannot follow. An `ApiError` raised by the view becomes its JSON answer."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                return answer(request, *args, **kwargs)
            except RequestDataTooBig:  # a form-encoded body read by the CSRF check
                return api_error(str(_too_large()), 413)

        def answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = api_error(_("Method not allowed."), 405)
                response["Allow"] = ", ".join(methods)
                return response
            raw = _bearer(request)
            if raw is not None:
                refused = _sign_in_by_token(request, raw)
                if refused is not None:
                    return refused
            else:
                request.api_token = None  # type: ignore[attr-defined]
                if not request.user.is_authenticated:
                    return api_error(_("Authentication required."), 401)
                if _csrf_refused(request):
                    return api_error(_("The CSRF token is missing or wrong."), 403)
            if staff and not request.user.is_staff:
                return api_error(_("Staff only."), 403)
            if staff and request.api_token is None and not staff_with_password(request):
                return api_error(str(STAFF_SIGN_IN), 403)
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return api_error(str(exc), exc.status, data=exc.data)

        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _sign_in_by_token(request: HttpRequest, raw: str) -> HttpResponse | None:
    """Lets the request in as the token's staff person (`request.api_token` set); a wrong
    or revoked token gets the 401 JSON answer, which is returned."""
    token = api_token_authenticate(raw=raw) if raw else None
    if token is None:
        response = api_error(_("The API token is invalid or revoked."), 401)
        response["WWW-Authenticate"] = "Bearer"
        return response
    request.user = token.user
    request.api_token = token  # type: ignore[attr-defined]
    return None


def staff_page_or_token(view: View) -> View:
    """For the staff pages that have a machine-readable use (the CSV export, the
    leaderboard): a staff API token (`Authorization: Bearer`) is let in as its person, with
    `request.api_token` set, so the view can answer a script in its own format; everyone else
    goes through staff_password_required (the admin's password sign-in). A wrong or revoked
    token is answered 401 JSON, never a redirect to a login page a script cannot follow."""
    from keyportal.admin_site import staff_password_required

    page = staff_password_required(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        raw = _bearer(request)
        if raw is None:
            request.api_token = None  # type: ignore[attr-defined]
            return page(request, *args, **kwargs)
        return _sign_in_by_token(request, raw) or view(request, *args, **kwargs)

    return wrapper
