from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.utils.translation import gettext_lazy as _

from accounts import views as accounts_views
from keyportal import openapi_views, person_views
from keyportal import views as keyportal_views

admin.site.site_header = _("Key Portal")
admin.site.site_title = _("Key Portal")
admin.site.index_title = _("Administration")

urlpatterns = [
    path("admin/login/", keyportal_views.admin_login, name="admin-login"),
    path("admin/totp/", keyportal_views.admin_totp, name="admin-totp"),
    path("admin/totp/setup/", keyportal_views.admin_totp_setup, name="admin-totp-setup"),
    path("admin/", admin.site.urls),
    path("my-keys/notifications", person_views.my_notifications, name="my-notifications"),
    path("", include("accounts.urls")),
    path("", include("pool.urls")),
    path("", include("usage.urls")),
    path("", accounts_views.home, name="home"),
    path("api/schema", openapi_views.api_schema, name="api-schema"),
    path("api/docs", openapi_views.api_docs, name="api-docs"),
]
