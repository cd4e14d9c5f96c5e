"""The admin site: staff, signed in with their password."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.urls import reverse

from accounts.signin import staff_with_password


class PortalAdminSite(admin.AdminSite):
    def has_permission(self, request: HttpRequest) -> bool:
        # A session from an emailed link is a person's session, staff or not: whoever can
        # read a staff member's inbox must not reach the admin without the password.
        return staff_with_password(request)


def staff_password_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For staff pages outside the admin: the admin's own rule (see has_permission), and the
    admin's login page for everyone else, as staff_member_required does."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if admin.site.has_permission(request):
            return view(request, *args, **kwargs)
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))

    return wrapper
