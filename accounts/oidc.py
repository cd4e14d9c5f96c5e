"""Sign-in through the company's OpenID Connect provider, with django-allauth speaking the
protocol (discovery, the authorization-code flow with PKCE, the token and userinfo calls).

allauth stops at "this provider says the person is X": from there the portal decides, as
for an emailed link (accounts/services.py `person_for_provider`), signs the person in as a
person (accounts/signin.py `provider_login`) and audits it. allauth's own account flow
(its sign-up, its e-mail addresses, its log-in) is never reached: `pre_social_login` always
answers. DingTalk and Feishu (allauth's `dingtalk` and `feishu` providers, with the portal's
adapters in accounts/platforms.py) come through the same adapter and `person_for_provider`.

Two checks are added to allauth's: the id_token's signature is always checked against the
provider's keys (allauth skips it when the token came straight from the token endpoint, which
the specification allows over TLS; an intranet provider is often plain HTTP), and a nonce sent
with the authorization request must come back in the id_token (allauth sends none)."""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Any

from urllib.parse import urlsplit

import jwt
import requests
from allauth.account.adapter import DefaultAccountAdapter
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter, get_adapter
from allauth.socialaccount.internal import jwtkit
from allauth.socialaccount.models import SocialApp, SocialLogin
from allauth.socialaccount.providers.oauth2.client import OAuth2Error
from allauth.socialaccount.providers.oauth2.views import OAuth2CallbackView, OAuth2LoginView
from allauth.socialaccount.providers.openid_connect.provider import OpenIDConnectProvider
from allauth.socialaccount.providers.openid_connect.views import OpenIDConnectOAuth2Adapter
from django.conf import settings
from django.core.cache import cache
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from accounts.platforms import (
    PLATFORMS,
    PortalDingTalkAdapter,
    PortalFeishuAdapter,
    identity,
    no_address_message,
    platform_name,
    platform_providers,
)
from accounts.services import SignInRefused, person_for_provider, provider_signin_refused
from accounts.signin import provider_login
from keyportal.audit import client_ip

METHOD_OIDC = "oidc"


def oidc_providers() -> list[dict[str, str]]:
    """The OpenID Connect providers that are on (from settings), for the sign-in page."""
    apps = settings.SOCIALACCOUNT_PROVIDERS.get("openid_connect", {}).get("APPS", [])
    return [{"id": app["provider_id"], "name": app["name"]} for app in apps]


def signin_providers() -> list[dict[str, str]]:
    """Every identity provider that is on (OpenID Connect, DingTalk, Feishu), with the
    address its button posts to, for the sign-in pages and the admin."""
    return [
        {**p, "url": reverse("openid_connect_login", args=[p["id"]])} for p in oidc_providers()
    ] + platform_providers()


# A host[:port] that can go into a policy header as it is (no spaces, quotes or ";").
HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def _origin(url: str) -> str:
    """scheme://host[:port] of `url`, or "" for anything that is not a plain http(s) origin
    (the discovery document is the provider's to write, and ends up in a header)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not HOST_PORT.match(parts.netloc):
        return ""
    return f"{parts.scheme}://{parts.netloc}"


def _authorize_origin_key(provider_id: str) -> str:
    return f"keyportal:oidc-authorize-origin:{provider_id}"


def provider_form_origins() -> list[str]:
    """Where the sign-in page's provider buttons lead (for its form-action policy): each
    provider's authorization origin as last discovered, else its discovery URL's origin (the
    same server at Keycloak, Authing, Entra ID and most others). Read from settings and the
    cache, never from the network: the page must render while a provider is down."""
    apps = settings.SOCIALACCOUNT_PROVIDERS.get("openid_connect", {}).get("APPS", [])
    origins = []
    for app in apps:
        origins.append(_origin(app.get("settings", {}).get("server_url", "")))
        origins.append(cache.get(_authorize_origin_key(app["provider_id"])) or "")
    return [o for o in origins if o]


class PortalOIDCAdapter(OpenIDConnectOAuth2Adapter):
    # Set by the callback view from the state stashed in the session at the redirect.
    expected_nonce: str | None = None

    @property
    def openid_config(self) -> dict:
        fetched = hasattr(self, "_openid_config")
        config = super().openid_config
        if fetched:  # read once per request; remembered below at that one time
            return config
        origin = _origin(str(config.get("authorization_endpoint", "")))
        key = _authorize_origin_key(self.provider_id)
        if origin and cache.get(key) != origin:
            cache.set(key, origin, None)  # for the sign-in page's form-action
        return config

    def complete_login(self, request: HttpRequest, app: SocialApp, token: Any, **kwargs: Any):
        response = kwargs["response"]
        if not response.get("id_token"):
            # Without an id_token there is nothing signed saying who this is for.
            raise OAuth2Error("The provider's answer has no id_token.")
        login = super().complete_login(request, app, token, **kwargs)
        data = login.account.extra_data
        userinfo = data.get("userinfo")
        if userinfo is not None and str(userinfo.get("sub")) != str(data["id_token"].get("sub")):
            # OpenID Connect Core 5.3.2: a userinfo answer for another subject is refused.
            raise OAuth2Error("The userinfo answer is for another subject than the id_token.")
        return login

    def _decode_id_token(self, app: SocialApp, id_token: str) -> dict:
        claims = id_token_claims(
            id_token, keys_url=self.openid_config["jwks_uri"],
            issuer=self.openid_config["issuer"], audience=app.client_id,
        )
        nonce = str(claims.get("nonce") or "")
        if not self.expected_nonce or not hmac.compare_digest(nonce, self.expected_nonce):
            raise OAuth2Error("The id_token's nonce is not the one this sign-in sent.")
        return claims


def id_token_claims(id_token: str, *, keys_url: str, issuer: str, audience: str) -> dict:
    """The id_token's claims once its signature (by the provider's published keys), issuer,
    audience and expiry are checked; OAuth2Error otherwise.

    allauth's own check needs a `kid` in the token's header (and fails with a server error
    without one); a provider with a single key may leave it out, so the key is the one named
    by `kid`, or the only signing key the provider publishes. The algorithm is the key's own,
    never the one the token's header asks for (no "none", no HMAC with a public key)."""
    try:
        header = jwt.get_unverified_header(id_token)
        with get_adapter().get_requests_session() as session:
            answer = session.get(keys_url)
            answer.raise_for_status()
            published = answer.json()
        keys = [
            key for key in jwt.PyJWKSet.from_dict(published).keys
            if key.key_type in ("RSA", "EC", "OKP") and key.public_key_use in (None, "sig")
        ]
        kid = header.get("kid")
        if kid is not None:
            keys = [key for key in keys if key.key_id == kid]
        if len(keys) != 1:
            raise OAuth2Error("No single signing key of the provider matches the id_token.")
        key = keys[0]
        claims = jwt.decode(
            id_token, key=key.key, algorithms=[key.algorithm_name], audience=audience,
            issuer=issuer, options={"require": ["iss", "aud", "exp", "sub"]},
        )
    except (jwt.PyJWTError, ValueError, KeyError, requests.RequestException) as e:
        raise OAuth2Error(f"Invalid id_token: {e.__class__.__name__}") from e
    jwtkit.verify_jti(claims)  # an id_token with a jti works once (allauth's replay list)
    return claims


class PortalOIDCProvider(OpenIDConnectProvider):
    """allauth's OpenID Connect provider with the portal's adapter, sending a nonce."""

    oauth2_adapter_class = PortalOIDCAdapter

    def redirect(self, request: HttpRequest, process: Any, next_url: str | None = None,
                 data: Any = None, **kwargs: Any) -> HttpResponse:
        nonce = secrets.token_urlsafe(32)
        auth_params = kwargs.pop("auth_params", None)
        auth_params = dict(self.get_auth_params() if auth_params is None else auth_params)
        auth_params["nonce"] = nonce  # last, so no request parameter can replace it
        # `nonce` lands in the state allauth stashes in the session for the callback.
        return super().redirect(request, process, next_url, data,
                                auth_params=auth_params, nonce=nonce, **kwargs)


class PortalOIDCCallbackView(OAuth2CallbackView):
    def _get_state(self, request: HttpRequest, provider: Any):
        # The state is popped from the session here (it works once); its nonce goes to the
        # adapter that checks the id_token.
        state, response = super()._get_state(request, provider)
        if state is not None:
            self.adapter.expected_nonce = state.get("nonce")  # type: ignore[attr-defined]
        return state, response


class PortalAccountAdapter(DefaultAccountAdapter):
    """allauth's local accounts are never used: people are made by the portal."""

    def is_open_for_signup(self, request: HttpRequest) -> bool:
        return False


class PortalSocialAccountAdapter(DefaultSocialAccountAdapter):
    def is_open_for_signup(self, request: HttpRequest, sociallogin: SocialLogin) -> bool:
        return False

    def pre_social_login(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        """The provider vouched for someone: the portal takes it from here, always."""
        raise ImmediateHttpResponse(_finish(request, sociallogin))

    def on_authentication_error(self, request: HttpRequest, provider: Any, error: Any = None,
                                exception: Any = None, extra_context: Any = None) -> None:
        """A failed or cancelled round trip (a bad id_token, a lost state, the person
        pressed "deny"): audited, and the person is told plainly on the portal's page."""
        # The exception names the failed check (or the provider's error answer), for staff;
        # cut short, as an error answer's body is the provider's to write.
        reason = str(error or "error")
        if exception is not None:
            reason = f"{reason}: {type(exception).__name__}: {str(exception)[:300]}"
        provider_signin_refused(
            provider=provider.sub_id, email="", ip=client_ip(request), reason=reason
        )
        name = platform_name(provider.id) if provider.id in PLATFORMS else provider.name
        raise ImmediateHttpResponse(_refused(
            request, name,
            _("The sign-in with %(provider)s did not complete. Please try again.")
            % {"provider": name},
        ))


def _claims(sociallogin: SocialLogin) -> tuple[dict[str, Any], dict[str, Any]]:
    """All the claims (the verified id_token's win over userinfo's, which is for the same
    subject, checked), and the ones the address comes from: the address and whether it is
    verified are read together from one source (the id_token when it carries an address,
    else userinfo), never an address from one and a "verified" from the other."""
    data = sociallogin.account.extra_data or {}
    id_token, userinfo = data.get("id_token") or {}, data.get("userinfo") or {}
    return {**userinfo, **id_token}, (id_token if "email" in id_token else userinfo)


def _finish(request: HttpRequest, sociallogin: SocialLogin) -> HttpResponse:
    provider = sociallogin.provider
    if provider.id in PLATFORMS:
        return _finish_platform(request, sociallogin)
    claims, address = _claims(sociallogin)
    try:
        user = person_for_provider(
            # allauth's own key for the link: the configured id (PORTAL_OIDC_ID), so two
            # OpenID Connect providers never share links.
            provider=provider.sub_id, provider_name=provider.name, uid=sociallogin.account.uid,
            email=str(address.get("email") or ""), email_verified=address.get("email_verified"),
            name=str(claims.get("name") or ""), claims=claims, method=METHOD_OIDC,
            ip=client_ip(request),
        )
    except SignInRefused as refused:
        return _refused(request, provider.name, refused.message)
    provider_login(request, user, method=METHOD_OIDC)
    return HttpResponseRedirect(reverse("my-keys"), status=303)


def _finish_platform(request: HttpRequest, sociallogin: SocialLogin) -> HttpResponse:
    """DingTalk or Feishu vouched for someone: the address it gives that the portal trusts
    (accounts/platforms.py `identity`) is the identity, then as for OpenID Connect."""
    method = sociallogin.provider.id
    name = platform_name(method)
    who = identity(sociallogin)
    if not who.email:
        provider_signin_refused(provider=method, email="", ip=client_ip(request),
                                reason="no trusted email address")
        return _refused(request, name, no_address_message(method))
    try:
        user = person_for_provider(
            # Neither platform has a "verified" flag: `identity` returns only an address the
            # company vouches for, so it counts as verified.
            provider=method, provider_name=name, uid=sociallogin.account.uid,
            email=who.email, email_verified=True, name=who.name,
            claims=sociallogin.account.extra_data or {}, method=method, ip=client_ip(request),
        )
    except SignInRefused as refused:
        return _refused(request, name, refused.message)
    provider_login(request, user, method=method)
    return HttpResponseRedirect(reverse("my-keys"), status=303)


def _refused(request: HttpRequest, provider_name: str, message: str) -> HttpResponse:
    return render(request, "accounts/signin_refused.html",
                  {"provider": provider_name, "message": message}, status=403)


@never_cache
@require_POST
def oidc_login(request: HttpRequest, provider_id: str) -> HttpResponse:
    """The sign-in page's button: off to the provider. POST only, with the CSRF token, so
    another site cannot start a sign-in in someone's browser."""
    try:
        view = OAuth2LoginView.adapter_view(PortalOIDCAdapter(request, provider_id))
        return view(request)
    except SocialApp.DoesNotExist:
        raise Http404 from None
    except requests.RequestException:
        # The discovery document could not be read (provider down, slow, or answering
        # garbage): a sentence instead of a server error; the emailed link still works.
        name = next((p["name"] for p in oidc_providers() if p["id"] == provider_id), provider_id)
        return render(request, "accounts/signin_refused.html", {
            "provider": name,
            "message": (
                _("%(provider)s cannot be reached right now. Please try again later, "
                  "or sign in with an emailed link.")
                if settings.PORTAL_EMAIL_LINK_SIGNIN else
                _("%(provider)s cannot be reached right now. Please try again later.")
            ) % {"provider": name},
        }, status=503)


@never_cache
@require_GET
def oidc_callback(request: HttpRequest, provider_id: str) -> HttpResponse:
    """Where the provider sends the browser back with a code."""
    try:
        view = PortalOIDCCallbackView.adapter_view(PortalOIDCAdapter(request, provider_id))
        return view(request)
    except SocialApp.DoesNotExist:
        raise Http404 from None


PLATFORM_ADAPTERS = {"dingtalk": PortalDingTalkAdapter, "feishu": PortalFeishuAdapter}


@never_cache
@require_POST
def platform_login(request: HttpRequest, platform: str) -> HttpResponse:
    """The DingTalk or Feishu button: off to the platform (POST only, as oidc_login)."""
    try:
        return OAuth2LoginView.adapter_view(PLATFORM_ADAPTERS[platform])(request)
    except SocialApp.DoesNotExist:  # not configured: the button is not shown either
        raise Http404 from None


@never_cache
@require_GET
def platform_callback(request: HttpRequest, platform: str) -> HttpResponse:
    """Where DingTalk (with `authCode`) or Feishu (with `code`) sends the browser back."""
    try:
        return OAuth2CallbackView.adapter_view(PLATFORM_ADAPTERS[platform])(request)
    except SocialApp.DoesNotExist:
        raise Http404 from None
