from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext as _

from accounts.signin import mark_password_signin, signed_in_by_link
from keyportal.audit import Action, audit_record, client_ip


def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin's own password sign-in, plus the audit row every sign-in leaves (people's
    email-link sign-ins are recorded by their service). A session from an emailed link is
    told why the admin asks for a password."""
    if request.method == "GET" and signed_in_by_link(request) and request.user.is_staff:
        messages.warning(request, _(
            "You signed in with an emailed link, which opens your own keys only. "
            "The admin and the staff pages need your password: sign in with it below."
        ))
    response = admin.site.login(request)
    form = (getattr(response, "context_data", None) or {}).get("form")
    if getattr(form, "throttled", False):
        response.status_code = 429
    # The login view redirects only after a correct password (a refused one renders the form).
    if request.method == "POST" and response.status_code == 302 and request.user.is_authenticated:
        mark_password_signin(request)
        audit_record(action=Action.SIGN_IN, actor=request.user, target=request.user,
                     ip=client_ip(request), detail="admin password")
    return response
