from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from keyportal.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: staff search and filter the trail; nobody edits or deletes it here."""

    list_display = ("at", "actor_kind", "actor_label", "action", "target_label", "ip")
    list_filter = ("action", "actor_kind", "target_type", "at")
    search_fields = ("actor_label", "target_label", "target_id", "detail", "ip")
    date_hierarchy = "at"
    list_select_related = ()
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
