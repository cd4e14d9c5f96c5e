from __future__ import annotations

from django.urls import path

from accounts import ldap, oidc, views

urlpatterns = [
    path("login", views.login_view, name="login"),
    # Before login/<token>, which would take "ldap" for a link's token.
    path("login/ldap", ldap.ldap_login, name="ldap-login"),
    path("login/<str:token>", views.login_link, name="login-link"),
    path("register", views.register_view, name="register"),
    path("logout", views.logout_view, name="logout"),
    path("i18n/setlang/", views.language_set, name="set_language"),
    # Only the two addresses of the OpenID Connect round trip, under the names allauth's
    # provider reverses; none of allauth's own account pages.
    path("auth/oidc/<str:provider_id>/login/", oidc.oidc_login, name="openid_connect_login"),
    path("auth/oidc/<str:provider_id>/login/callback/", oidc.oidc_callback,
         name="openid_connect_callback"),
    # DingTalk and Feishu, under the names allauth's adapters reverse ("<id>_callback").
    path("auth/dingtalk/login/", oidc.platform_login, {"platform": "dingtalk"},
         name="dingtalk_login"),
    path("auth/dingtalk/login/callback/", oidc.platform_callback, {"platform": "dingtalk"},
         name="dingtalk_callback"),
    path("auth/feishu/login/", oidc.platform_login, {"platform": "feishu"}, name="feishu_login"),
    path("auth/feishu/login/callback/", oidc.platform_callback, {"platform": "feishu"},
         name="feishu_callback"),
]
