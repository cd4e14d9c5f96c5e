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

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.translation import gettext as _

from accounts.models import ApiToken
from accounts.services import api_token_authenticate
from accounts.signin import signed_in_by_link

View = Callable[..., HttpResponse]


class ApiError(Exception):
    """Raised by an API view to answer `{"error": message}` with `status` (400: bad input)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def api_error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def api_token_of(request: HttpRequest) -> ApiToken | None:
    """The staff API token the request was authenticated with, or None (a session)."""
    return getattr(request, "api_token", None)


def json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object; an empty body counts as `{}`."""
    if not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(_("The body is not valid JSON.")) from None
    if not isinstance(body, dict):
        raise ApiError(_("The body must be a JSON object."))
    return body


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
            if request.method not in methods:
                response = api_error(_("Method not allowed."), 405)
                response["Allow"] = ", ".join(methods)
                return response
            raw = _bearer(request)
            if raw is not None:
                token = api_token_authenticate(raw=raw) if raw else None
                if token is None:
                    response = api_error(_("The API token is invalid or revoked."), 401)
                    response["WWW-Authenticate"] = "Bearer"
                    return response
                request.user = token.user
                request.api_token = token  # type: ignore[attr-defined]
            else:
                request.api_token = None  # type: ignore[attr-defined]
                if not request.user.is_authenticated:
                    return api_error(_("Authentication required."), 401)
                if _csrf_refused(request):
                    return api_error(_("The CSRF token is missing or wrong."), 403)
            if staff and not request.user.is_staff:
                return api_error(_("Staff only."), 403)
            if staff and request.api_token is None and signed_in_by_link(request):
                return api_error(
                    _("Staff calls need an API token or a password sign-in to the admin."), 403
                )
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return api_error(str(exc), exc.status)

        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate
