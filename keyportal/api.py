"""The JSON API's front door: who is calling, and errors as JSON with the right status."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.translation import gettext as _

View = Callable[..., HttpResponse]


def api_error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def api_view(*, methods: tuple[str, ...], staff: bool = False) -> Callable[[View], View]:
    """Wraps a JSON endpoint: allowed methods, an authenticated caller (the session for
    now), and staff-only where asked. Answers 401/403/405 as JSON, never a redirect to a
    login page a script cannot follow."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = api_error(_("Method not allowed."), 405)
                response["Allow"] = ", ".join(methods)
                return response
            if not request.user.is_authenticated:
                return api_error(_("Authentication required."), 401)
            if staff and not request.user.is_staff:
                return api_error(_("Staff only."), 403)
            return view(request, *args, **kwargs)

        return wrapper

    return decorate



