"""Sign-in through DingTalk and Feishu (Lark), with django-allauth's `dingtalk` and `feishu`
providers speaking the OAuth round trip. The portal's subclasses only move the platforms'
addresses into settings (Lark's international domain, and local fakes in the tests), follow
the request shapes of Feishu's documentation where allauth 65.22.1 does not, and turn a
garbled answer into a refused sign-in instead of a server error.

Who the person is stays the portal's decision, as for OpenID Connect (accounts/oidc.py
`_finish` then accounts/services.py `person_for_provider`). Neither platform says whether it
verified an address, so `identity` picks the one address that the company, not the person,
vouches for (docs/sign-in.md explains the choice):
- Feishu: `enterprise_email`, the mailbox the company's Feishu tenant issued; the directory's
  `email` only with PORTAL_FEISHU_TRUST_EMAIL.
- DingTalk: `email` of contact/users/me, the account's own address, only with
  PORTAL_DINGTALK_TRUST_EMAIL (the portal cannot tell who set it otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from allauth.socialaccount.adapter import get_adapter
from allauth.socialaccount.models import SocialApp, SocialLogin
from allauth.socialaccount.providers.dingtalk.client import DingTalkOAuth2Client
from allauth.socialaccount.providers.dingtalk.provider import DingTalkProvider
from allauth.socialaccount.providers.dingtalk.views import DingTalkOAuth2Adapter
from allauth.socialaccount.providers.feishu.client import FeishuOAuth2Client
from allauth.socialaccount.providers.feishu.provider import FeishuProvider
from allauth.socialaccount.providers.feishu.views import FeishuOAuth2Adapter
from allauth.socialaccount.providers.oauth2.client import OAuth2Error
from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse
from django.utils.translation import gettext as _

METHOD_DINGTALK = "dingtalk"
METHOD_FEISHU = "feishu"
PLATFORMS = (METHOD_DINGTALK, METHOD_FEISHU)


def platform_name(provider_id: str) -> str:
    """The platform's name as people know it, in the page's language."""
    if provider_id == METHOD_DINGTALK:
        return _("DingTalk")
    if "larksuite" in settings.PORTAL_FEISHU_URL:
        return _("Lark")
    return _("Feishu")


def platform_providers() -> list[dict[str, str]]:
    """DingTalk and Feishu when on (their app id is set), for the sign-in page."""
    return [
        {"id": pid, "name": platform_name(pid), "url": reverse(f"{pid}_login")}
        for pid in PLATFORMS
        if settings.SOCIALACCOUNT_PROVIDERS.get(pid, {}).get("APPS")
    ]


def platform_form_origins() -> list[str]:
    """Where the platforms' buttons lead (the sign-in page's form-action policy)."""
    on = {p["id"] for p in platform_providers()}
    origins = []
    if METHOD_DINGTALK in on:
        origins.append(settings.PORTAL_DINGTALK_LOGIN_URL.rstrip("/"))
    if METHOD_FEISHU in on:
        origins.append(settings.PORTAL_FEISHU_URL)
    return origins


def _json(answer: Any) -> dict:
    """A platform's JSON object, or OAuth2Error (garbage, or a list) for a sentence to the
    person instead of a server error."""
    try:
        data = answer.json()
    except ValueError:
        raise OAuth2Error(f"Not JSON (HTTP {answer.status_code})") from None
    if not isinstance(data, dict):
        raise OAuth2Error("Not a JSON object")
    return data


# --- DingTalk ---------------------------------------------------------------------------------


class PortalDingTalkClient(DingTalkOAuth2Client):
    def get_access_token(self, code: str, pkce_code_verifier: str | None = None) -> dict:
        # POST /v1.0/oauth2/userAccessToken {clientId, clientSecret, code, grantType}; an error
        # is HTTP 400 with {"code", "message"} (allauth raises on it: a RequestException).
        try:
            return super().get_access_token(code, pkce_code_verifier)
        except KeyError as missing:  # accessToken without refreshToken / expireIn
            raise OAuth2Error(f"DingTalk's token answer lacks {missing}") from None
        except ValueError:
            raise OAuth2Error("DingTalk's token answer is not JSON") from None


class PortalDingTalkAdapter(DingTalkOAuth2Adapter):
    client_class = PortalDingTalkClient

    @property
    def authorize_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_DINGTALK_LOGIN_URL.rstrip("/") + "/oauth2/auth"

    @property
    def access_token_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_DINGTALK_API_URL.rstrip("/") + "/v1.0/oauth2/userAccessToken"

    @property
    def profile_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_DINGTALK_API_URL.rstrip("/") + "/v1.0/contact/users/me"

    def complete_login(self, request: HttpRequest, app: SocialApp, token: Any, **kwargs: Any):
        headers = {"x-acs-dingtalk-access-token": token.token}
        with get_adapter().get_requests_session() as session:
            answer = session.get(self.profile_url, headers=headers)
            answer.raise_for_status()
            data = _json(answer)
        if not data.get("openId"):
            raise OAuth2Error("DingTalk's user answer has no openId")
        return self.get_provider().sociallogin_from_response(request, data)


class PortalDingTalkProvider(DingTalkProvider):
    oauth2_adapter_class = PortalDingTalkAdapter


# --- Feishu / Lark ----------------------------------------------------------------------------


class PortalFeishuClient(FeishuOAuth2Client):
    """Feishu's documented request shapes: JSON bodies, and the app_access_token in the
    Authorization header of the token call (allauth sends a form body and the token in it)."""

    def app_access_token(self) -> str:
        url = settings.PORTAL_FEISHU_URL + "/open-apis/auth/v3/app_access_token/internal"
        with get_adapter().get_requests_session() as session:
            answer = session.post(url, json={"app_id": self.consumer_key,
                                             "app_secret": self.consumer_secret})
            answer.raise_for_status()
            data = _json(answer)
        if data.get("code") != 0 or not data.get("app_access_token"):
            raise OAuth2Error(f"Feishu refused the app credentials: {data.get('code')} "
                              f"{str(data.get('msg'))[:200]}")
        return str(data["app_access_token"])

    def get_access_token(self, code: str, pkce_code_verifier: str | None = None) -> dict:
        app_token = self.app_access_token()
        with get_adapter().get_requests_session() as session:
            answer = session.post(
                self.access_token_url,
                json={"grant_type": "authorization_code", "code": code},
                headers={"Authorization": f"Bearer {app_token}"},
            )
            answer.raise_for_status()
            data = _json(answer)
        token = data.get("data")
        if data.get("code") != 0 or not isinstance(token, dict) or not token.get("access_token"):
            raise OAuth2Error(f"Feishu refused the code: {data.get('code')} "
                              f"{str(data.get('msg'))[:200]}")
        return token


class PortalFeishuAdapter(FeishuOAuth2Adapter):
    @property
    def authorize_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_FEISHU_URL + "/open-apis/authen/v1/index"

    @property
    def access_token_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_FEISHU_URL + "/open-apis/authen/v1/access_token"

    @property
    def user_info_url(self) -> str:  # type: ignore[override]
        return settings.PORTAL_FEISHU_URL + "/open-apis/authen/v1/user_info"

    def get_client(self, request: HttpRequest, app: SocialApp) -> PortalFeishuClient:
        return PortalFeishuClient(
            request, app.client_id, app.secret, self.access_token_method,
            self.access_token_url, self.get_callback_url(request, app),
        )

    def complete_login(self, request: HttpRequest, app: SocialApp, token: Any, **kwargs: Any):
        headers = {"Authorization": f"Bearer {token.token}"}
        with get_adapter().get_requests_session() as session:
            answer = session.get(self.user_info_url, headers=headers)
            answer.raise_for_status()
            data = _json(answer)
        user = data.get("data")
        if data.get("code") != 0 or not isinstance(user, dict) or not user.get("open_id"):
            raise OAuth2Error(f"Feishu refused the user info: {data.get('code')} "
                              f"{str(data.get('msg'))[:200]}")
        return self.get_provider().sociallogin_from_response(request, user)


class PortalFeishuProvider(FeishuProvider):
    oauth2_adapter_class = PortalFeishuAdapter


# --- who it is ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlatformIdentity:
    email: str  # "" when the platform gave no address the portal trusts
    name: str
    missing: str  # why there is no address, for the person (when `email` is "")


def identity(sociallogin: SocialLogin) -> PlatformIdentity:
    """The address a DingTalk or Feishu sign-in vouches for (see the module's docstring)."""
    data = sociallogin.account.extra_data or {}
    if sociallogin.provider.id == METHOD_FEISHU:
        name = str(data.get("name") or data.get("en_name") or "")
        email = str(data.get("enterprise_email") or "")
        if not email and settings.PORTAL_FEISHU_TRUST_EMAIL:
            email = str(data.get("email") or "")
        return PlatformIdentity(email=email, name=name, missing=_(
            "%(platform)s gave no company email address for your account, so the portal "
            "cannot tell who you are. Ask your administrator to give you a company mailbox "
            "there."
        ) % {"platform": platform_name(METHOD_FEISHU)})
    name = str(data.get("nick") or "")
    email = str(data.get("email") or "") if settings.PORTAL_DINGTALK_TRUST_EMAIL else ""
    return PlatformIdentity(email=email, name=name, missing=_(
        "%(platform)s gave no email address the portal may trust for your account. Ask your "
        "administrator to set up sign-in with %(platform)s (the app's email permission)."
    ) % {"platform": platform_name(METHOD_DINGTALK)})
