from __future__ import annotations

from django.urls import path

from accounts import views

urlpatterns = [
    path("login", views.login_view, name="login"),
    path("login/<str:token>", views.login_link, name="login-link"),
    path("register", views.register_view, name="register"),
    path("logout", views.logout_view, name="logout"),
    path("i18n/setlang/", views.language_set, name="set_language"),
]
