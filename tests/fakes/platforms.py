"""Fakes of DingTalk's and Feishu's sign-in endpoints on 127.0.0.1, answering in the formats
their documentation gives, and refusing requests whose shape differs from it (so a test that
signs in also proves the portal asks as the platform expects). One server plays both
platforms' hosts (login.dingtalk.com and api.dingtalk.com; open.feishu.cn).

DingTalk ("new" OAuth 2.0 sign-in of internal apps):
- browser: GET https://login.dingtalk.com/oauth2/auth?redirect_uri&response_type=code
  &client_id&scope=openid corpid&state&prompt=consent, back with `authCode` and `state`
  https://open.dingtalk.com/document/orgapp/tutorial-obtaining-user-personal-information
- POST https://api.dingtalk.com/v1.0/oauth2/userAccessToken, JSON {clientId, clientSecret,
  code, grantType: "authorization_code"} -> {accessToken, refreshToken, expireIn, corpId};
  an error is HTTP 400 {code, message}
  https://open.dingtalk.com/document/orgapp/obtain-user-token
- GET https://api.dingtalk.com/v1.0/contact/users/me, header x-acs-dingtalk-access-token
  -> {nick, avatarUrl, mobile, openId, unionId, email, stateCode} (email only with the app's
  email permission) https://open.dingtalk.com/document/orgapp/dingtalk-retrieve-user-information
- POST https://api.dingtalk.com/v1.0/oauth2/accessToken, JSON {appKey, appSecret} ->
  {accessToken, expireIn} (the internal app's own token)
  https://open.dingtalk.com/document/orgapp/obtain-the-access_token-of-an-internal-app
- POST https://oapi.dingtalk.com/topapi/user/getbyunionid?access_token=, JSON {unionid} ->
  {errcode: 0, errmsg, result: {contact_type, userid}}; errcode 60121 when the person is not
  in the organisation https://open.dingtalk.com/document/orgapp/query-a-user-by-the-union-id
- POST https://oapi.dingtalk.com/topapi/v2/user/get?access_token=, JSON {userid, language} ->
  {errcode: 0, errmsg, result: {userid, unionid, name, email, org_email, active, ...}}
  https://open.dingtalk.com/document/orgapp/query-user-details

Feishu (web app sign-in, "login pre-authorization code"):
- browser: GET https://open.feishu.cn/open-apis/authen/v1/index?app_id&redirect_uri&state,
  back with `code` and `state` https://open.feishu.cn/document/ukTMukTMukTM/ukzN4UjL5cDO14SO3gTN
- POST /open-apis/auth/v3/app_access_token/internal, JSON {app_id, app_secret} ->
  {code: 0, msg, app_access_token, expire, tenant_access_token}
  https://open.feishu.cn/document/ukTMukTMukTM/ukDNz4SO0MjL5QzM/auth-v3/auth/app_access_token_internal
- POST /open-apis/authen/v1/access_token, header Authorization: Bearer <app_access_token>,
  JSON {grant_type: "authorization_code", code} -> {code: 0, msg, data: {access_token,
  token_type, expires_in, refresh_token, refresh_expires_in, name, open_id, union_id, email,
  enterprise_email, ...}}
  https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/authen-v1/authen/access_token
- GET /open-apis/authen/v1/user_info, header Authorization: Bearer <user_access_token> ->
  {code: 0, msg, data: {name, en_name, avatar_url, open_id, union_id, email,
  enterprise_email, user_id, mobile, tenant_key, employee_no}}
  https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/authen-v1/user_info/get
Feishu answers its errors with a non-zero `code` (HTTP 200 or 4xx)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.fakes.relay_http import FakeRelayServer

DINGTALK_ID, DINGTALK_SECRET = "dingappkey", "ding-app-secret"
FEISHU_ID, FEISHU_SECRET = "cli_a1b2c3", "feishu-app-secret"


class FakePlatforms(FakeRelayServer):
    malformed_body = b'{"code": 0, "data": {'

    def __init__(self) -> None:
        self.codes: dict[str, dict[str, Any]] = {}  # authorization code -> the person
        self.tokens: dict[str, dict[str, Any]] = {}  # user access token -> the person
        self.app_tokens: set[str] = set()
        self.directory_errcode = 0
        self.requests: list[tuple[str, str]] = []
        # Who signs in when a real browser reaches the authorization page (it consents at
        # once, as for someone who consented before).
        self.browser_person: dict[str, Any] = {}
        super().__init__()

    def _handler(self) -> Any:
        base, fake = super()._handler(), self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:
                if urlsplit(self.path).path in ("/oauth2/auth", "/open-apis/authen/v1/index"):
                    back = fake.consent(f"{fake.url}{self.path}", **fake.browser_person)
                    self.send_response(302)
                    self.send_header("Location", back)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._serve()

        return Handler

    # -- the browser at the platform --

    def consent(self, authorize_url: str, **person: Any) -> str:
        """The person consents at the platform; returns where it sends the browser back."""
        parts = urlsplit(authorize_url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        assert authorize_url.startswith(self.url), authorize_url
        code = secrets.token_urlsafe(12)
        self.codes[code] = person
        if parts.path == "/oauth2/auth":  # DingTalk
            assert query["client_id"] == DINGTALK_ID and query["response_type"] == "code"
            assert set(query["scope"].split()) >= {"openid"} and query["prompt"] == "consent"
            back = {"authCode": code, "state": query["state"]}
        else:
            assert parts.path == "/open-apis/authen/v1/index", parts.path
            assert query["app_id"] == FEISHU_ID
            back = {"code": code, "state": query["state"]}
        return f"{query['redirect_uri']}?{urlencode(back)}"

    # -- the platforms' APIs --

    def route(self, method: str, path: str, query: dict[str, str], body: Any,
              headers: Any) -> tuple[int, Any]:
        self.requests.append((method, path))
        if path == "/v1.0/oauth2/userAccessToken" and method == "POST":
            return self._dingtalk_token(body, headers)
        if path == "/v1.0/contact/users/me" and method == "GET":
            person = self.tokens.get(headers.get("x-acs-dingtalk-access-token") or "")
            if person is None:
                return 401, {"code": "InvalidAuthentication", "message": "不合法的token"}
            return 200, {k: v for k, v in person.items() if v is not None and k != "org"}
        if path == "/v1.0/oauth2/accessToken" and method == "POST":
            if not _json_request(headers) or not isinstance(body, dict):
                return 400, {"code": "MissingParameter", "message": "body must be JSON"}
            if (body.get("appKey"), body.get("appSecret")) != (DINGTALK_ID, DINGTALK_SECRET):
                return 400, {"code": "invalidClientIdOrSecret", "message": "无效的appKey或appSecret"}
            token = secrets.token_hex(16)
            self.app_tokens.add(token)
            return 200, {"accessToken": token, "expireIn": 7200}
        if path.startswith("/topapi/") and method == "POST":
            return self._dingtalk_directory(path, query, body, headers)
        if path == "/open-apis/auth/v3/app_access_token/internal" and method == "POST":
            return self._feishu_app_token(body, headers)
        if path == "/open-apis/authen/v1/access_token" and method == "POST":
            return self._feishu_token(body, headers)
        if path == "/open-apis/authen/v1/user_info" and method == "GET":
            person = self.tokens.get(_bearer(headers))
            if person is None:
                return 400, {"code": 99991668, "msg": "Invalid access token for authorization."}
            return 200, {"code": 0, "msg": "success",
                         "data": {k: v for k, v in person.items() if v is not None}}
        return 404, {"code": 404, "msg": "not found"}

    def _dingtalk_token(self, body: Any, headers: Any) -> tuple[int, Any]:
        if not _json_request(headers) or not isinstance(body, dict):
            return 400, {"code": "MissingParameter", "message": "body must be JSON"}
        if (body.get("clientId"), body.get("clientSecret")) != (DINGTALK_ID, DINGTALK_SECRET):
            return 400, {"code": "invalidClientIdOrSecret", "message": "无效的clientId或者clientSecret"}
        if body.get("grantType") != "authorization_code":
            return 400, {"code": "invalidGrantType", "message": "grantType invalid"}
        person = self.codes.pop(str(body.get("code")), None)
        if person is None:
            return 400, {"code": "invalidAuthCode", "message": "authCode不合法"}
        token = secrets.token_hex(16)
        self.tokens[token] = person
        return 200, {"accessToken": token, "refreshToken": secrets.token_hex(16),
                     "expireIn": 7200, "corpId": "ding0123456789"}

    def _dingtalk_directory(self, path: str, query: dict[str, str], body: Any,
                            headers: Any) -> tuple[int, Any]:
        if query.get("access_token") not in self.app_tokens:
            return 200, {"errcode": 40014, "errmsg": "不合法的access_token"}
        if self.directory_errcode:  # the app lacks the directory permission, say
            return 200, {"errcode": self.directory_errcode, "errmsg": "没有调用该接口的权限"}
        if not _json_request(headers) or not isinstance(body, dict):
            return 200, {"errcode": 40035, "errmsg": "缺少参数 json"}
        # The latest sign-in first: a test's person wins over earlier tests' with the same ids.
        people = list(reversed(self.tokens.values()))
        members = [p["org"] for p in people if p.get("org")]
        if path == "/topapi/user/getbyunionid":
            person = next((p for p in people if p.get("unionId") == body.get("unionid")), {})
            if person.get("org"):
                return 200, {"errcode": 0, "errmsg": "ok", "request_id": "r1", "result": {
                    "contact_type": 0, "userid": person["org"]["userid"]}}
            return 200, {"errcode": 60121, "errmsg": "找不到该用户", "request_id": "r1"}
        if path == "/topapi/v2/user/get":
            for org in members:
                if org["userid"] == body.get("userid"):
                    return 200, {"errcode": 0, "errmsg": "ok", "request_id": "r2",
                                 "result": {**org, "dept_id_list": [1], "admin": False}}
            return 200, {"errcode": 60121, "errmsg": "找不到该用户", "request_id": "r2"}
        return 404, {"errcode": 404, "errmsg": "not found"}

    def _feishu_app_token(self, body: Any, headers: Any) -> tuple[int, Any]:
        if not _json_request(headers) or not isinstance(body, dict):
            return 400, {"code": 9499, "msg": "Bad Request"}
        if (body.get("app_id"), body.get("app_secret")) != (FEISHU_ID, FEISHU_SECRET):
            return 200, {"code": 10014, "msg": "app secret invalid"}
        token = "a-" + secrets.token_hex(16)
        self.app_tokens.add(token)
        return 200, {"code": 0, "msg": "ok", "app_access_token": token, "expire": 7200,
                     "tenant_access_token": "t-" + secrets.token_hex(16)}

    def _feishu_token(self, body: Any, headers: Any) -> tuple[int, Any]:
        if _bearer(headers) not in self.app_tokens:
            return 400, {"code": 99991663, "msg": "Invalid access token for authorization."}
        if not _json_request(headers) or not isinstance(body, dict):
            return 400, {"code": 9499, "msg": "Bad Request"}
        if body.get("grant_type") != "authorization_code":
            return 400, {"code": 20001, "msg": "invalid grant_type"}
        person = self.codes.pop(str(body.get("code")), None)
        if person is None:
            return 400, {"code": 20003, "msg": "invalid code"}
        token = "u-" + secrets.token_hex(16)
        self.tokens[token] = person
        return 200, {"code": 0, "msg": "success", "data": {
            "access_token": token, "token_type": "Bearer", "expires_in": 6900,
            "refresh_token": "ur-" + secrets.token_hex(16), "refresh_expires_in": 2591700,
            **{k: v for k, v in person.items() if v is not None},
        }}


def _bearer(headers: Any) -> str:
    value = headers.get("Authorization") or ""
    return value[len("Bearer "):] if value.startswith("Bearer ") else ""


def _json_request(headers: Any) -> bool:
    return (headers.get("Content-Type") or "").startswith("application/json")


@contextmanager
def fake_platforms() -> Iterator[FakePlatforms]:
    fake = FakePlatforms().start()
    try:
        yield fake
    finally:
        fake.stop()
