"""A Content-Security-Policy header on every response. The portal's pages load scripts and
styles from its own static files only (no inline <script>, no style= attributes, htmx's
indicator style in portal.css), so the policy allows 'self' and nothing else. The admin
(/admin/) and the staff pages built on its templates (/staff/) get the same policy: Django's
admin templates carry no inline scripts or styles either, and its scripts change styles
through the DOM, which a policy does not restrict."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

DIRECTIVES = [
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "frame-ancestors 'none'",
    "base-uri 'self'",
    "form-action 'self'",
]
POLICY = "; ".join(DIRECTIVES)


def policy_with_form_action(*origins: str) -> str:
    """The policy, with forms also allowed to lead to `origins`: a form that posts to the
    portal and is redirected elsewhere (the sign-in page's identity-provider button) needs the
    redirect's origin in form-action, or the browser stops at the redirect."""
    extra = " ".join(sorted(set(origins)))
    return "; ".join(
        f"{d} {extra}" if d.startswith("form-action") and extra else d for d in DIRECTIVES
    )


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        # A view that set its own policy keeps it.
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
