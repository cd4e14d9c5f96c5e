from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from keyportal.audit import Action, audit_record, client_ip


def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin's own password sign-in, plus the audit row every sign-in leaves (people's
    email-link sign-ins are recorded by their service)."""
    was_signed_in = request.user.is_authenticated
    response = admin.site.login(request)
    if request.method == "POST" and not was_signed_in and request.user.is_authenticated:
        audit_record(action=Action.SIGN_IN, actor=request.user, target=request.user,
                     ip=client_ip(request), detail="admin password")
    return response
