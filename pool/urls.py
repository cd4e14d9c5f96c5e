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
    path("my-keys/new-key", views.key_shown_page, name="key-shown"),
]

# --- staff pages that run the proxy (issue 11; pool/staff_views.py) ---
from pool import staff_views  # noqa: E402

urlpatterns += [
    path("staff/proxy/settings", staff_views.proxy_settings, name="staff-proxy-settings"),
    path("staff/proxy/upstreams", staff_views.upstream_list, name="staff-proxy-upstreams"),
    path("staff/proxy/upstreams/<slug:kind>/add", staff_views.upstream_add,
         name="staff-proxy-upstream-add"),
    path("staff/proxy/upstreams/<slug:kind>/<int:index>/edit", staff_views.upstream_edit,
         name="staff-proxy-upstream-edit"),
    path("staff/proxy/upstreams/<slug:kind>/<int:index>/toggle", staff_views.upstream_toggle,
         name="staff-proxy-upstream-toggle"),
    path("staff/proxy/upstreams/<slug:kind>/<int:index>/delete", staff_views.upstream_delete,
         name="staff-proxy-upstream-delete"),
    path("staff/proxy/auth-files", staff_views.auth_files, name="staff-proxy-auth-files"),
    path("staff/proxy/auth-files/delete", staff_views.auth_file_delete,
         name="staff-proxy-auth-file-delete"),
]
