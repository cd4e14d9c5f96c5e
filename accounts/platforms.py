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
- DingTalk: `org_email`, the company mailbox in the organisation's directory entry (looked up
  with the app's credentials); `email` of contact/users/me, the account's own address, only
  with PORTAL_DINGTALK_TRUST_EMAIL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
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
    urls = []
    if METHOD_DINGTALK in on:
        urls.append(settings.PORTAL_DINGTALK_LOGIN_URL)
    if METHOD_FEISHU in on:
        urls.append(settings.PORTAL_FEISHU_URL)
        # open.feishu.cn's authorization page sends the browser on to accounts.feishu.cn (and
        # Lark's likewise), still within the button's form navigation.
        if "://open." in settings.PORTAL_FEISHU_URL:
            urls.append(settings.PORTAL_FEISHU_URL.replace("://open.", "://accounts.", 1))
    # Only scheme://host[:port] goes into the header, whatever else the setting holds.
    parts = [urlsplit(url) for url in urls]
    return [f"{p.scheme}://{p.netloc}" for p in parts
            if p.scheme in ("http", "https") and re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", p.netloc)]


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
            if not data.get("openId") or not data.get("unionId"):
                raise OAuth2Error("DingTalk's user answer has no openId or unionId")
            data["org"] = _dingtalk_org_member(session, app, str(data["unionId"]))
        return self.get_provider().sociallogin_from_response(request, data)


# The organisation's directory entry (with its company mailbox, org_email) of the person who
# signed in: contact/users/me only has the account's own address. DingTalk's errcode for "no
# such person in this organisation" (someone from outside the company consented).
DINGTALK_NOT_A_MEMBER = 60121
ORG_FIELDS = ("userid", "name", "org_email", "email", "active")


def _dingtalk_org_member(session: Any, app: SocialApp, union_id: str) -> dict | None:
    """The person's entry in the app's organisation (ORG_FIELDS), None when not a member.

    Three calls with the app's own credentials (an internal app's Client ID and secret are its
    AppKey and AppSecret): the app's access token, then the person's userid from their
    unionId, then their entry. The app needs the directory read permission
    (通讯录个人信息读权限 / 成员信息读权限); without it the sign-in fails, audited with
    DingTalk's errcode. The app token travels in the URL of the two directory calls, so no
    URL goes into an error message."""
    api = settings.PORTAL_DINGTALK_API_URL.rstrip("/")
    oapi = settings.PORTAL_DINGTALK_OAPI_URL.rstrip("/")
    try:
        answer = session.post(f"{api}/v1.0/oauth2/accessToken",
                              json={"appKey": app.client_id, "appSecret": app.secret})
        data = _json(answer)
        if answer.status_code != 200 or not data.get("accessToken"):
            raise OAuth2Error(f"DingTalk refused the app credentials: {data.get('code')}")
        app_token = {"access_token": str(data["accessToken"])}
        answer = session.post(f"{oapi}/topapi/user/getbyunionid", params=app_token,
                              json={"unionid": union_id})
        data = _json(answer)
        if data.get("errcode") == DINGTALK_NOT_A_MEMBER:
            return None
        user_id = (data.get("result") or {}).get("userid") if data.get("errcode") == 0 else None
        if not user_id:
            raise OAuth2Error(f"DingTalk's user id lookup failed: errcode {data.get('errcode')} "
                              f"{str(data.get('errmsg'))[:200]}")
        answer = session.post(f"{oapi}/topapi/v2/user/get", params=app_token,
                              json={"userid": user_id, "language": "en_US"})
        data = _json(answer)
        entry = data.get("result")
        if data.get("errcode") != 0 or not isinstance(entry, dict):
            raise OAuth2Error(f"DingTalk's directory lookup failed: errcode "
                              f"{data.get('errcode')} {str(data.get('errmsg'))[:200]}")
    except requests.RequestException as e:
        raise OAuth2Error(f"DingTalk's directory could not be read: {type(e).__name__}") from None
    return {k: entry[k] for k in ORG_FIELDS if k in entry}


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


def identity(sociallogin: SocialLogin) -> PlatformIdentity:
    """The address a DingTalk or Feishu sign-in vouches for (see the module's docstring)."""
    data = sociallogin.account.extra_data or {}
    if sociallogin.provider.id == METHOD_FEISHU:
        email = str(data.get("enterprise_email") or "")
        if not email and settings.PORTAL_FEISHU_TRUST_EMAIL:
            email = str(data.get("email") or "")
        return PlatformIdentity(email=email, name=str(data.get("name") or data.get("en_name") or ""))
    org = data.get("org") or {}
    email = str(org.get("org_email") or "")
    if not email and settings.PORTAL_DINGTALK_TRUST_EMAIL:
        email = str(data.get("email") or "")
    return PlatformIdentity(email=email, name=str(org.get("name") or data.get("nick") or ""))


def no_address_message(provider_id: str) -> str:
    return _(
        "%(platform)s gave no company email address for your account, so the portal "
        "cannot tell who you are. Ask your administrator to give you a company mailbox "
        "there."
    ) % {"platform": platform_name(provider_id)}
