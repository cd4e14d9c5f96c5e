"""Sign-in by emailed link, registration, sign-out. Issuing the first key (which needs the
pool) happens in pool.views.register_confirm: accounts never imports pool."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import logout
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django.views.i18n import LANGUAGE_QUERY_PARAMETER, set_language

from accounts.forms import LdapLoginForm, LoginForm, RegisterForm
from accounts.ldap import ldap_enabled
from accounts.models import SignInLink
from accounts.oidc import provider_form_origins, signin_providers
from accounts.platforms import platform_form_origins
from accounts.ratelimit import link_requests_limited
from accounts.services import (
    LinkInvalid,
    person_language_set,
    signin_link_peek,
    signin_link_redeem,
    signin_link_send,
)
from accounts.signin import link_login
from keyportal.audit import client_ip
from keyportal.csp import policy_with_form_action

Purpose = SignInLink.Purpose
LINK_ROUTES = {Purpose.LOGIN: "login-link", Purpose.REGISTER: "register-link"}


def too_many(request: HttpRequest, email: str, form_name: str) -> bool:
    """Counts this submission per client address, then per email; True when refused."""
    return link_requests_limited(form_name=form_name, ip=client_ip(request), email=email)


def send_link(request: HttpRequest, *, purpose: str, email: str, **extra: str) -> None:
    def link_url(purpose: str, token: str) -> str:
        return request.build_absolute_uri(reverse(LINK_ROUTES[purpose], args=[token]))

    signin_link_send(
        email=email, purpose=purpose, link_url=link_url,
        register_url=request.build_absolute_uri(reverse("register")),
        login_url=request.build_absolute_uri(reverse("login")), **extra,
    )


def login_page_context(
    request: HttpRequest, *, form: LoginForm | RegisterForm | None = None,
    ldap_form: LdapLoginForm | None = None,
) -> dict:
    """What the sign-in page shows: the emailed-link form, a button per identity provider
    that is on, and the company-account (LDAP) form when a directory is configured."""
    if ldap_form is None and ldap_enabled():
        ldap_form = LdapLoginForm()
    return {"form": form if form is not None else LoginForm(), "providers": signin_providers(),
            "links": settings.PORTAL_EMAIL_LINK_SIGNIN, "ldap_form": ldap_form}


def with_provider_policy(response: HttpResponse) -> HttpResponse:
    origins = provider_form_origins() + platform_form_origins()
    if origins:  # the provider buttons' POST is redirected to the provider
        response["Content-Security-Policy"] = policy_with_form_action(*origins)
    return response


def _link_form(
    request: HttpRequest, form: LoginForm | RegisterForm, *, purpose: str, template: str
) -> HttpResponse:
    context = login_page_context(request, form=form)
    if request.method == "POST" and not context["links"]:
        # PORTAL_EMAIL_LINK_SIGNIN is off: no link is sent, whatever the form says.
        return render(request, template, context, status=403)
    if request.method == "POST" and form.is_valid():
        email = form.cleaned_data["email"]
        if too_many(request, email, purpose):
            form.add_error(
                "email",
                _("Too many attempts. Please wait %(minutes)d minutes and try again.")
                % {"minutes": settings.PORTAL_RATE_WINDOW_SECONDS // 60},
            )
            return render(request, template, context, status=429)
        send_link(request, purpose=purpose, **form.cleaned_data)
        # The same page whether or not the address is known: nothing to probe.
        return render(
            request, "accounts/check_inbox.html",
            {"email": email, "minutes": settings.PORTAL_LINK_MINUTES},
        )
    status = 400 if form.is_bound else 200
    return render(request, template, context, status=status)


def links_off() -> None:
    """PORTAL_EMAIL_LINK_SIGNIN is off: a link sent before still opens nothing."""
    if not settings.PORTAL_EMAIL_LINK_SIGNIN:
        raise Http404


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return redirect("my-keys" if request.user.is_authenticated else "login")


@require_http_methods(["GET", "POST"])
def login_view(request: HttpRequest) -> HttpResponse:
    if request.method == "GET" and request.user.is_authenticated:
        return redirect("my-keys")
    form = LoginForm(request.POST if request.method == "POST" else None)
    return with_provider_policy(
        _link_form(request, form, purpose=Purpose.LOGIN, template="accounts/login.html")
    )


@require_http_methods(["GET", "POST"])
def register_view(request: HttpRequest) -> HttpResponse:
    form = RegisterForm(request.POST if request.method == "POST" else None)
    response = _link_form(request, form, purpose=Purpose.REGISTER,
                          template="accounts/register.html")
    return with_provider_policy(response)


def link_gone(request: HttpRequest) -> HttpResponse:
    return render(request, "accounts/link_invalid.html", status=410)


@never_cache
@require_http_methods(["GET", "POST"])
def login_link(request: HttpRequest, token: str) -> HttpResponse:
    """GET shows a button and uses nothing (mail scanners fetch links); POST signs in."""
    links_off()
    if request.method == "GET":
        link = signin_link_peek(token=token, purpose=Purpose.LOGIN)
        if link is None:
            return link_gone(request)
        return render(request, "accounts/link_confirm.html", {"link": link})
    try:
        user, _link = signin_link_redeem(token=token, purpose=Purpose.LOGIN, ip=client_ip(request))
    except LinkInvalid:
        return link_gone(request)
    link_login(request, user)
    return HttpResponseRedirect(reverse("my-keys"), status=303)


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponseRedirect(reverse("login"), status=303)


@require_POST
def language_set(request: HttpRequest) -> HttpResponse:
    """Django's set_language (the cookie, the safe `next` redirect), and for a signed-in
    person also their stored language, in which the portal's later emails are written."""
    response = set_language(request)
    if request.user.is_authenticated:
        person_language_set(user=request.user, language=request.POST.get(LANGUAGE_QUERY_PARAMETER, ""))
    return response
