from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, Max, OuterRef, QuerySet, Subquery, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from accounts.models import Limits, User
from keyportal.admin_site import back_to
from keyportal.audit import Action, audit_form_changes, audit_record, client_ip
from pool.admin import ApiKeyAdmin, PersonKeysAdmin
from pool.models import ApiKey
from pool.services import keys_reconcile_in_request, relays_reconcile_quietly
from usage.currency import Currency, remember
from usage.limits import limits_release
from usage.models import (
    DisplayCurrency, LimitNotice, ModelPrice, QuarantinedRecord, SyncRun, UsageBatch,
    UsageSnapshot,
)
from usage.pricing import PriceBook
from usage.selectors import usage_totals
from usage.services import SyncBusy, SyncFailed, usage_cost_recompute, usage_sync

# How long "Sync now" may read usage before it stops and answers (see sync_view).
SYNC_NOW_SECONDS = 30


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
        "cached_tokens", "cache_creation_tokens", "output_tokens", "total_tokens",
        "incomplete_requests", "cost_display",
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


PRICE_FIELDS = ("model", "input", "output", "cache_read", "cache_write", "source", "taken_on")
UNPRICED_PERIODS = {"7": 7, "30": 30, "90": 90, "all": None}


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("model", "input", "output", "cache_read", "cache_write", "taken_on", "source")
    list_editable = ("input", "output", "cache_read", "cache_write")
    search_fields = ("model",)
    list_filter = ("taken_on",)
    actions = ("recompute_cost",)
    change_list_template = "admin/usage/modelprice/change_list.html"

    # Every change to a price is audited: it changes what people are told they spent.
    def save_model(self, request: HttpRequest, obj: ModelPrice, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # A new price: every field filled in counts as changed (from nothing).
        audit_form_changes(request=request, obj=obj, form=form, fields=PRICE_FIELDS,
                           action=Action.PRICE_CHANGED)

    def delete_model(self, request: HttpRequest, obj: ModelPrice) -> None:
        _audit_price_deleted(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ModelPrice]) -> None:
        for obj in queryset:
            _audit_price_deleted(request, obj)
        super().delete_queryset(request, queryset)

    def get_urls(self) -> list[URLPattern]:
        unpriced = path("unpriced/", self.admin_site.admin_view(self.unpriced_view),
                        name="usage_modelprice_unpriced")
        return [unpriced, *super().get_urls()]

    def unpriced_view(self, request: HttpRequest) -> HttpResponse:
        """Models seen in usage whose cost is unknown, with how much they were used: one
        grouped query over the requests that had no price when they were counted, then the
        price book says which still have none (the rest were priced since: recompute)."""
        period = request.GET.get("period", "30")
        if period not in UNPRICED_PERIODS:
            period = "30"
        days = UNPRICED_PERIODS[period]
        rows = UsageSnapshot.objects.filter(cost__isnull=True)
        if days is not None:
            rows = rows.filter(hour__gte=timezone.now() - timedelta(days=days))
        seen = list(
            rows.values("model").annotate(
                requests=Sum("requests"), tokens=Sum("total_tokens"), keys=Count(
                    "api_key_id", distinct=True), last_seen=Max("hour"),
            ).order_by("-tokens", "model")
        )
        book = PriceBook.load()
        add_url = reverse("admin:usage_modelprice_add")
        unpriced, priced_since = [], []
        for row in seen:
            if book.price_for(row["model"]) is None:
                row["add_url"] = f"{add_url}?{urlencode({'model': row['model']})}"
                unpriced.append(row)
            else:
                priced_since.append(row)
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta,
            "title": _("Unpriced models seen"), "unpriced": unpriced,
            "priced_since": priced_since, "period": period,
            "periods": [("7", _("7 days")), ("30", _("30 days")), ("90", _("90 days")),
                        ("all", _("all time"))],
        }
        return TemplateResponse(request, "admin/usage/modelprice/unpriced.html", context)

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


def _audit_price_deleted(request: HttpRequest, obj: ModelPrice) -> None:
    before = {name: str(getattr(obj, name) or "") for name in PRICE_FIELDS}
    audit_record(action=Action.PRICE_CHANGED, actor=request.user, target=obj,
                 ip=client_ip(request), before=before, after=None)


@admin.register(DisplayCurrency)
class DisplayCurrencyAdmin(admin.ModelAdmin):
    """One row: the currency pages show costs in, and its rate. Storage stays USD."""

    fields = ("code", "rate", "rate_source")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: DisplayCurrency, form: Any,
                   change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_form_changes(request=request, obj=obj, form=form, fields=("code", "rate"),
                           action=Action.DISPLAY_CURRENCY_CHANGED)
        remember(Currency(obj.code, obj.rate))  # this process shows it at once

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        current, _created = DisplayCurrency.objects.get_or_create(id=1)
        return HttpResponseRedirect(
            reverse("admin:usage_displaycurrency_change", args=[current.pk])
        )


@admin.register(SyncRun)
class SyncRunAdmin(ReadOnlyAdmin):
    list_display = (
        "started_at", "ok", "mode", "records_read", "records_stored", "records_foreign",
        "records_unissued", "records_quarantined", "records_incomplete", "people",
        "duration_ms", "message",
    )
    list_filter = ("ok", "mode")
    search_fields = ("message",)
    date_hierarchy = "started_at"
    show_full_result_count = False

    def get_urls(self) -> list[URLPattern]:
        sync = path("sync/", self.admin_site.admin_view(self.sync_view), name="usage_syncrun_sync")
        return [sync, *super().get_urls()]

    def sync_view(self, request: HttpRequest) -> HttpResponse:
        """"Sync now" (here and on the admin index's checklist): the same service as
        `manage.py sync_usage`, limits included, bounded so that the page answers."""
        back = back_to(request, reverse("admin:usage_syncrun_changelist"))
        if request.method != "POST":  # admin_view has let staff only in
            return HttpResponseRedirect(back)
        # A first sync on a busy proxy could pop for minutes: the pass stops after the pop in
        # hand once SYNC_NOW_SECONDS have gone (each call to the proxy is bounded by
        # CLIPROXY_TIMEOUT), and the next sync counts the rest.
        stop = threading.Event()
        timer = threading.Timer(SYNC_NOW_SECONDS, stop.set)
        timer.daemon = True
        timer.start()
        try:
            report = usage_sync(stop=stop)
        except SyncBusy:
            self.message_user(request, _(
                "Another usage sync is running right now (sync_usage --follow, cron, or another "
                "click), so this one did not start; its result shows under Usage syncs."),
                messages.WARNING)
        except SyncFailed as exc:
            self.message_user(request, _("The usage sync failed: %(error)s") % {"error": exc},
                              messages.ERROR)
        else:
            level = messages.SUCCESS if report.ok else messages.WARNING
            self.message_user(
                request,
                _("Read %(read)d usage records, stored %(stored)d.")
                % {"read": report.result.read, "stored": report.result.stored}, level,
            )
            if report.message:
                self.message_user(request, report.message, level)
            if report.stopped:
                self.message_user(request, _(
                    "The sync stopped after %(s)d seconds so that this page could answer; the "
                    "next sync counts the rest.") % {"s": SYNC_NOW_SECONDS}, messages.INFO)
            for line in report.limits.lines() if report.limits else []:
                self.message_user(request, line, messages.INFO)
        finally:
            timer.cancel()
        return HttpResponseRedirect(back)


@admin.register(QuarantinedRecord)
class QuarantinedRecordAdmin(ReadOnlyAdmin):
    """Usage records the sync set aside (the rest of their batch was counted), with why. The
    record's client key is masked; `key` names the portal key when it was one."""

    list_display = ("created_at", "source", "reason", "key", "batch_id", "record_start")
    list_filter = ("source", "reason", ("created_at", admin.DateFieldListFilter))
    search_fields = ("reason", "record", "key_hash")
    date_hierarchy = "created_at"
    show_full_result_count = False
    fields = ("created_at", "source", "reason", "key", "batch_id", "record")

    def get_queryset(self, request: HttpRequest) -> QuerySet[QuarantinedRecord]:
        keys = ApiKey.objects.filter(key_hash=OuterRef("key_hash"))
        return super().get_queryset(request).annotate(
            key_prefix=Subquery(keys.values("prefix")[:1]),
            key_last4=Subquery(keys.values("last4")[:1]),
        )

    @admin.display(description=_("portal key"))
    def key(self, obj: QuarantinedRecord) -> str:
        last4 = getattr(obj, "key_last4", None)
        return f"{obj.key_prefix}…{last4}" if last4 else "—"

    @admin.display(description=_("record (start)"))
    def record_start(self, obj: QuarantinedRecord) -> str:
        return obj.record[:120] + ("…" if len(obj.record) > 120 else "")


@admin.register(UsageBatch)
class UsageBatchAdmin(ReadOnlyAdmin):
    """Each /usage-queue pop as it was stored; the body itself (sealed) is dropped once the
    batch is counted, and counted batches are dropped after USAGE_BATCH_KEEP_DAYS."""

    list_display = ("id", "created_at", "size", "record_count", "quarantined", "applied_at",
                    "spool", "error")
    list_filter = (("applied_at", admin.EmptyFieldListFilter),)
    # A spool file's name finds its batches (a cut answer's file is named in its reason).
    search_fields = ("error", "spool")
    date_hierarchy = "created_at"
    show_full_result_count = False
    exclude = ("raw", "rows")


@admin.register(LimitNotice)
class LimitNoticeAdmin(ReadOnlyAdmin):
    """The 80 % / 100 % emails that went out, one row per subject, limit, window, threshold."""

    list_display = ("sent_at", "subject", "limit", "threshold", "window_start")
    list_filter = ("limit", "threshold", ("sent_at", admin.DateFieldListFilter))
    search_fields = ("subject", "limit")
    date_hierarchy = "sent_at"
    show_full_result_count = False


# --- people and keys, with their usage -------------------------------------------------------
# accounts and pool register their admins without usage (dependencies run usage -> pool ->
# accounts); usage re-registers them here with totals. Each total is a correlated subquery,
# computed for the rows of the page only, and no GROUP BY reaches the count query.


def _usage_of(**owner: object) -> dict[str, Subquery]:
    rows = UsageSnapshot.objects.filter(**owner).order_by().values(*owner)
    return {
        "tokens_total": Subquery(rows.annotate(s=Sum("total_tokens")).values("s")),
        "cost_known": Subquery(rows.annotate(s=Sum("cost")).values("s")),
    }


class UsageColumns:
    """The `tokens` and `cost` columns of a list annotated by `_usage_of`."""

    @admin.display(description=_("tokens"), ordering="tokens_total")
    def tokens(self, obj: object) -> int:
        return getattr(obj, "tokens_total", None) or 0

    @admin.display(description=_("known cost (USD)"), ordering="cost_known")
    def cost(self, obj: object) -> str:
        cost: Decimal | None = getattr(obj, "cost_known", None)
        return "—" if cost is None else f"{cost:.2f}"


class LimitsReleased:
    """Raising or removing a limit in the admin brings the keys it held back at once: they
    are judged again in the admin's transaction (each change audited), and the proxy gets
    them back as soon as that commits, within the page's proxy budget (or at the next sync
    or reconcile when it is slow). Without this they waited for midnight while the quota
    bars already showed 0 %."""

    def _limits_changed(self, request: HttpRequest, form: Any, **whose: Any) -> None:
        if not any(name in form.changed_data for name in Limits.LIMIT_FIELDS):
            return
        done = limits_release(now=timezone.now(), by=request.user, ip=client_ip(request),
                              **whose)
        if done.moved:
            self.message_user(request, ngettext(  # type: ignore[attr-defined]
                "%(n)d suspended key is now held by another limit, until that one resets.",
                "%(n)d suspended keys are now held by another limit, until that one resets.",
                done.moved) % {"n": done.moved}, messages.INFO)
        if not done.released:
            # A relay that enforces limits itself (claude-relay-service) takes a lowered one
            # now, not at the next reconcile: it then refuses the request after the crossing
            # one, before any sync. Pushes only what differs from what it holds (nothing for
            # CLIProxyAPI, which has no limits of its own).
            transaction.on_commit(relays_reconcile_quietly)
            return
        self.message_user(request, ngettext(  # type: ignore[attr-defined]
            "%(n)d key suspended by a limit is active again: it returns to the proxy now.",
            "%(n)d keys suspended by a limit are active again: they return to the proxy now.",
            done.released) % {"n": done.released}, messages.SUCCESS)

        def proxy_follows() -> None:
            if keys_reconcile_in_request() is None:
                self.message_user(request, _(  # type: ignore[attr-defined]
                    "The proxy could not be reached: it follows at the next reconcile or sync."
                ), messages.WARNING)

        # After the commit: a reconcile inside the admin's transaction would not see the keys
        # as active on another connection, or push keys for a change rolled back later.
        transaction.on_commit(proxy_follows)


admin.site.unregister(User)


@admin.register(User)
class PersonAdmin(LimitsReleased, UsageColumns, PersonKeysAdmin):
    list_display = (*PersonKeysAdmin.list_display[:2], "key_count", "tokens", "cost",
                    *PersonKeysAdmin.list_display[2:])

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        keys = ApiKey.objects.filter(owner=OuterRef("pk")).order_by().values("owner")
        return super().get_queryset(request).annotate(
            key_count=Subquery(keys.annotate(n=Count("pk")).values("n")),
            **_usage_of(api_key__owner=OuterRef("pk")),
        )

    @admin.display(description=_("keys"), ordering="key_count")
    def key_count(self, obj: User) -> int:
        return getattr(obj, "key_count", None) or 0

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change:
            self._limits_changed(request, form, person=obj)


admin.site.unregister(ApiKey)


@admin.register(ApiKey)
class KeyAdmin(LimitsReleased, UsageColumns, ApiKeyAdmin):
    list_display = (*ApiKeyAdmin.list_display, "tokens", "cost")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change:
            self._limits_changed(request, form, key=obj)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).annotate(**_usage_of(api_key=OuterRef("pk")))
