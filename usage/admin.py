from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from usage.models import ModelPrice, SyncRun, UsageSnapshot
from usage.selectors import usage_totals
from usage.services import usage_cost_recompute


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the sync writes: staff read them, nobody edits them by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(UsageSnapshot)
class UsageSnapshotAdmin(ReadOnlyAdmin):
    list_display = (
        "hour", "owner_email", "key", "model", "requests", "failures", "input_tokens",
        "output_tokens", "total_tokens", "cost_display",
    )
    list_filter = ("model", "api_key__status", ("hour", admin.DateFieldListFilter))
    search_fields = ("api_key__owner__email", "api_key__owner__name", "model")
    list_select_related = ("api_key", "api_key__owner")
    date_hierarchy = "hour"
    show_full_result_count = False
    change_list_template = "usage/admin/usagesnapshot_change_list.html"

    @admin.display(description=_("owner"), ordering="api_key__owner__email")
    def owner_email(self, obj: UsageSnapshot) -> str:
        owner = obj.api_key.owner
        return owner.email if owner else _("(nobody: pool key)")

    @admin.display(description=_("key"))
    def key(self, obj: UsageSnapshot) -> str:
        return obj.api_key.masked

    @admin.display(description=_("cost (USD)"), ordering="cost")
    def cost_display(self, obj: UsageSnapshot) -> str:
        return _("unknown") if obj.cost is None else f"{obj.cost:.4f}"

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        # Totals of what the filters and search selected, summed by the database.
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None:
            response.context_data["usage_totals"] = usage_totals(changelist.queryset)
        return response


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("model", "input", "output", "cache_read", "cache_write", "taken_on", "source")
    list_editable = ("input", "output", "cache_read", "cache_write")
    search_fields = ("model",)
    list_filter = ("taken_on",)
    actions = ("recompute_cost",)

    @admin.action(description=_("Recompute the cost of past usage of the selected models"))
    def recompute_cost(self, request: HttpRequest, queryset: QuerySet[ModelPrice]) -> None:
        names = list(UsageSnapshot.objects.values_list("model", flat=True).distinct().order_by())
        # A price entry may be a prefix; recompute every used model it could now match, and
        # let the price book decide (a model may also move to or from another entry).
        patterns = [p.model.lower() for p in queryset]
        models = [
            m for m in names
            if any(m.lower() == p or (p.endswith("*") and m.lower().startswith(p[:-1]))
                   for p in patterns)
        ]
        changed = usage_cost_recompute(models=models)
        self.message_user(
            request,
            ngettext("Cost recomputed: %(n)d usage row changed.",
                     "Cost recomputed: %(n)d usage rows changed.", changed) % {"n": changed},
            messages.SUCCESS,
        )


@admin.register(SyncRun)
class SyncRunAdmin(ReadOnlyAdmin):
    list_display = (
        "started_at", "ok", "mode", "records_read", "records_stored", "records_foreign",
        "records_unissued", "people", "duration_ms", "message",
    )
    list_filter = ("ok", "mode")
    date_hierarchy = "started_at"
