from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

admin.site.site_header = "Key Portal"
admin.site.site_title = "Key Portal"
admin.site.index_title = "Administration"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("pool.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False), name="home"),
]
