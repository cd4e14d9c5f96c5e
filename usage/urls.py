from __future__ import annotations

from django.urls import path

from usage import export, pages, views

urlpatterns = [
    # /my-keys keeps the paths and names it had in pool; it moved here to show usage.
    path("my-keys", pages.my_keys, name="my-keys"),
    path("my-keys/add", pages.key_add, name="key-add"),
    path("my-keys/<int:pk>", pages.key_detail, name="key-detail"),
    path("my-keys/<int:pk>/revoke", pages.key_revoke_view, name="key-revoke"),
    path("my-keys/<int:pk>/rename", pages.key_rename_view, name="key-rename"),
    # Staff pages sit outside /admin/, whose catch-all would swallow them.
    path("staff/leaderboard", pages.staff_leaderboard, name="staff-leaderboard"),
    path("staff/proxy", pages.staff_proxy, name="staff-proxy"),
    path("staff/people/<int:pk>", pages.staff_person, name="staff-person"),
    path("staff/export", export.usage_export, name="usage-export"),
    path("api/user-stats/<str:email>", views.api_user_stats, name="api-user-stats"),
    path("api/all-users-stats", views.api_all_users_stats, name="api-all-users-stats"),
    path("api/sync-usage", views.api_sync_usage, name="api-sync-usage"),
]
