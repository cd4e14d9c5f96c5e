from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy as _lazy

from accounts.signin import (
    TOTP_SETUP,
    TOTP_VERIFY,
    mark_password_signin,
    password_signed_in_staff,
    signed_in_by_link,
    signed_in_by_provider,
    totp_step,
    totp_step_done,
)
from accounts.totp import (
    totp_confirm,
    totp_device,
    totp_device_pending,
    totp_qr_svg,
    totp_remove,
    totp_secret_text,
    totp_throttled,
    totp_verify,
    TotpWait,
)
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
    elif (request.method == "GET" and signed_in_by_provider(request) and request.user.is_staff
          and not settings.PORTAL_PROVIDER_OPENS_ADMIN):
        messages.warning(request, _(
            "You signed in with your company account, which opens your own keys only. "
            "The admin and the staff pages need your password: sign in with it below."
        ))
    if request.method == "GET" and password_signed_in_staff(request) and totp_step(request):
        return _totp_redirect(request, _next_url(request))
    response = admin.site.login(request)
    form = (getattr(response, "context_data", None) or {}).get("form")
    if getattr(form, "throttled", False):
        response.status_code = 429
    # The login view redirects only after a correct password (a refused one renders the form).
    if request.method == "POST" and response.status_code == 302 and request.user.is_authenticated:
        mark_password_signin(request)
        step = totp_step(request)
        # With an authenticator step owed, this is not a sign-in yet: a stolen password
        # followed by a wrong code must not read as "signed in" in the audit log. SIGN_IN is
        # written when the code is right (accounts/totp.py).
        if step:
            audit_record(action=Action.PASSWORD_ACCEPTED, actor=request.user,
                         target=request.user, ip=client_ip(request),
                         detail=f"admin password; authenticator {step} next")
        else:
            audit_record(action=Action.SIGN_IN, actor=request.user, target=request.user,
                         ip=client_ip(request), detail="admin password",
                         after={"method": "password"})
        if step:
            return _totp_redirect(request, response["Location"])
    return response


def _totp_redirect(request: HttpRequest, target: str) -> HttpResponse:
    name = "admin-totp-setup" if totp_step(request) == TOTP_SETUP else "admin-totp"
    return redirect(f"{reverse(name)}?{urlencode({'next': target})}")


# --- the authenticator step of a staff sign-in (accounts/totp.py) --------------------------


def _next_url(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                       require_https=request.is_secure()):
        return target
    return reverse("admin:index")


class TotpCodeForm(forms.Form):
    code = forms.CharField(
        label=_lazy("Code from your authenticator app"), max_length=12,
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric",
                                      "autofocus": True, "pattern": "[0-9 ]*"}),
    )


def _totp_render(request: HttpRequest, template: str, context: dict, status: int = 200):
    return TemplateResponse(request, template, {
        **admin.site.each_context(request), "next": _next_url(request), **context,
    }, status=status)


def _totp_submit(request: HttpRequest, form: TotpCodeForm, check, wrong: str) -> int:
    """Checks a posted code with `check` (verify or confirm): 302 when it was right, else
    the status the page answers with (200: nothing posted), the form carrying why."""
    if request.method != "POST" or not form.is_valid():
        return 400 if request.method == "POST" else 200
    if totp_throttled(request.user):
        form.add_error(None, _("Too many failed sign-ins. Please wait %(minutes)d minutes and "
                               "try again.")
                       % {"minutes": max(settings.PORTAL_ADMIN_LOGIN_WINDOW_SECONDS // 60, 1)})
        return 429
    try:
        if check(request, form.cleaned_data["code"]):
            return 302
        form.add_error("code", wrong)
    except TotpWait:
        form.add_error("code", _("Too soon after a wrong code: wait a few seconds, then type "
                                 "the code your app shows."))
    return 400


def admin_totp(request: HttpRequest) -> HttpResponse:
    """After the password: the code from the staff member's authenticator app."""
    if not password_signed_in_staff(request):
        return redirect_to_login(_next_url(request), reverse("admin:login"))
    step = totp_step(request)
    if step == TOTP_SETUP:
        return _totp_redirect(request, _next_url(request))
    if step != TOTP_VERIFY:
        return redirect(_next_url(request))
    form = TotpCodeForm(request.POST or None)
    status = _totp_submit(request, form, totp_verify, _(
        "That code is not right. Codes change every 30 seconds: use the one your app shows now."
    ))
    if status == 302:
        return redirect(_next_url(request))
    return _totp_render(request, "admin/totp_verify.html",
                        {"form": form, "title": _("Authenticator code")}, status)


def admin_totp_setup(request: HttpRequest) -> HttpResponse:
    """Setting up (or replacing, or removing) the staff member's authenticator app."""
    if not password_signed_in_staff(request):
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))
    if totp_step(request) == TOTP_VERIFY:  # prove the current device before replacing it
        return _totp_redirect(request, request.get_full_path())
    user = request.user
    form = TotpCodeForm(request.POST or None)
    if request.method == "POST" and request.POST.get("action") == "remove":
        if settings.PORTAL_STAFF_TOTP_REQUIRED:
            messages.error(request, _("This portal requires an authenticator app for staff: "
                                      "set up a new one instead of removing it."))
        else:
            totp_remove(user=user, by=user, ip=client_ip(request))
            totp_step_done(request, verified=False)
            messages.success(request, _("Your authenticator app was removed: the admin now "
                                        "asks for your password only."))
        return redirect("admin-totp-setup")
    status = _totp_submit(request, form, totp_confirm, _(
        "That code is not right: check the app shows Key Portal and type the code it shows now."
    ))
    if status == 302:
        messages.success(request, _("Your authenticator app is set up: the admin will ask "
                                    "for a code from it after your password."))
        return redirect(_next_url(request))
    device = totp_device_pending(user)
    return _totp_render(request, "admin/totp_setup.html", {
        "form": form, "title": _("Authenticator app"),
        "active": totp_device(user), "required": settings.PORTAL_STAFF_TOTP_REQUIRED,
        "qr": mark_safe(totp_qr_svg(device)),  # noqa: S308 - segno's own SVG, no user text
        "secret": totp_secret_text(device),
    }, status)


# --- error pages ------------------------------------------------------------------------------


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """settings.CSRF_FAILURE_VIEW: the portal's own page, in the reader's language, with a way
    on (Django's is bare English). `reason` names what was wrong with the token: Django logs
    it already ("Forbidden (CSRF ...)"); it is never shown. No "back" link built from the
    Referer: the page a form came from may be a sign-in or registration link, whose token
    must not be echoed into another page."""
    return TemplateResponse(request, "403_csrf.html", {}, status=403).render()
