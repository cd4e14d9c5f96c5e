from __future__ import annotations

from django.urls import path

from pool import views

urlpatterns = [
    path("api/key-pool-status", views.api_key_pool_status, name="api-key-pool-status"),
]
