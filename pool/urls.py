from __future__ import annotations

from django.urls import path

from pool import views

urlpatterns = [
    path("register/<str:token>", views.register_confirm, name="register-link"),
    path("api/register-key", views.api_register_key, name="api-register-key"),
    path("api/my-keys", views.api_my_keys, name="api-my-keys"),
    path("api/revoke-key", views.api_revoke_key, name="api-revoke-key"),
    path("api/rename-key", views.api_rename_key, name="api-rename-key"),
    path("api/key-pool-status", views.api_key_pool_status, name="api-key-pool-status"),
    path("my-keys/test-key", views.key_test, name="key-test"),
]
