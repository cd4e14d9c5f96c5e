from __future__ import annotations

from django.urls import path

from usage import views

urlpatterns = [
    path("api/user-stats/<str:email>", views.api_user_stats, name="api-user-stats"),
    path("api/all-users-stats", views.api_all_users_stats, name="api-all-users-stats"),
    path("api/sync-usage", views.api_sync_usage, name="api-sync-usage"),
]
