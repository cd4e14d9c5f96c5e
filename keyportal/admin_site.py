"""The admin site: staff, signed in with their password."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _

from accounts.models import User, normalize_email
from accounts.ratelimit import (
    ADMIN_FAILED_BY_ACCOUNT,
    ADMIN_FAILED_BY_IP,
    rate_hit,
    rate_hits,
    rate_reset,
)
from accounts.signin import staff_with_password
from keyportal.audit import Action, audit_record, client_ip

REFUSAL_AUDITED = "admin-login-refused:audited"


class ThrottledLoginForm(AdminAuthenticationForm):
    """The admin's password form, refused for a while once a client address or an account
    has had too many wrong passwords (counted in the shared cache, so every portal process
    sees the same count). Both are counted: one address trying many accounts, and many
    addresses trying one account."""

    throttled = False

    def clean(self) -> dict[str, Any]:
        ip = client_ip(self.request) or ""
        email = normalize_email(self.cleaned_data.get("username") or "")
        counters = ((ADMIN_FAILED_BY_IP, ip), (ADMIN_FAILED_BY_ACCOUNT, email))
        limit = settings.PORTAL_ADMIN_LOGIN_FAILURES
        window = settings.PORTAL_ADMIN_LOGIN_WINDOW_SECONDS
        if any(rate_hits(scope=scope, ident=ident) >= limit for scope, ident in counters):
            # Refused before the password is even checked: a right guess now proves nothing.
            self.throttled = True
            self._audit_refusal(ip=ip, email=email, window=window)
            raise ValidationError(
                _("Too many failed sign-ins. Please wait %(minutes)d minutes and try again.")
                % {"minutes": max(window // 60, 1)},
                code="throttled",
            )
        try:
            cleaned = super().clean()
        except ValidationError:
            for scope, ident in counters:
                rate_hit(scope=scope, ident=ident, window=window)
            raise
        rate_reset(scope=ADMIN_FAILED_BY_ACCOUNT, ident=email)
        return cleaned

    def _audit_refusal(self, *, ip: str, email: str, window: int) -> None:
        # One row per address and account per window: a flood of refused attempts is one
        # line in the log, not a million.
        if rate_hit(scope=REFUSAL_AUDITED, ident=f"{ip} {email}", window=window) > 1:
            return
        audit_record(
            action=Action.ADMIN_LOGIN_THROTTLED,
            target=User.objects.filter(email=email).first(),
            target_label=email[:254],
            ip=ip or None,
            detail=f"admin password sign-in refused after {settings.PORTAL_ADMIN_LOGIN_FAILURES}"
                   f" failures in {window // 60} minutes",
        )


class PortalAdminSite(admin.AdminSite):
    login_form = ThrottledLoginForm

    def has_permission(self, request: HttpRequest) -> bool:
        # A session from an emailed link is a person's session, staff or not: whoever can
        # read a staff member's inbox must not reach the admin without the password.
        return staff_with_password(request)

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None
              ) -> HttpResponse:
        # The dashboard on top of the index (templates/admin/index.html). Imported here:
        # keyportal sits under the apps, and usage reads the pool and the proxy's state.
        from usage.charts import chart, chart_days
        from usage.selectors import admin_dashboard, getting_started

        # The trend chart's period picker (?days=7/30/90), as on the person pages.
        days, unknown = chart_days(request.GET)
        # The checklist first: its look at the upstreams (at most once a minute) also leaves
        # their health where the dashboard reads it, so one visit asks them once.
        checklist = getting_started(user=request.user)
        dashboard = admin_dashboard(now=timezone.now(), days=days)
        context = {
            "checklist": checklist,
            "dashboard": dashboard,
            "usage_chart": chart(
                dashboard.trend, query=request.GET, chart_id="dashboard-trend",
                title=_("Everyone's daily usage by model"), unknown_days=unknown,
                measures=("requests", "tokens", "cost"),
            ) if dashboard.trend is not None else None,
            **(extra_context or {}),
        }
        return super().index(request, context)


def back_to(request: HttpRequest, default: str) -> str:
    """Where an admin button's POST returns: its `next` (the admin index's getting-started
    checklist sends it) when it is a path on this site, else `default`."""
    target = request.GET.get("next") or request.POST.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return target
    return default


def staff_password_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For staff pages outside the admin: the admin's own rule (see has_permission), and the
    admin's login page for everyone else, as staff_member_required does."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if admin.site.has_permission(request):
            return view(request, *args, **kwargs)
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))

    return wrapper
