from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import URLPattern, path, reverse
from django.utils.translation import gettext_lazy as _

from accounts.admin import HasLimitsFilter
from accounts.models import Limits
from keyportal.audit import audit_form_changes, client_ip
from pool.models import ApiKey
from pool.selectors import pool_status
from pool.services import (
    key_resume,
    key_revoke,
    key_suspend,
    keys_reconcile,
    keys_reconcile_in_request,
    pool_generate,
)
from pool.upstream import ProxyClient, UpstreamError


class GenerateForm(forms.Form):
    count = forms.IntegerField(
        label=_("How many keys"), min_value=1, max_value=10_000, initial=50,
        help_text=_("They are pushed to the proxy in one write."),
    )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are always shown masked: the full value of a pool key never reaches a page."""

    list_display = (
        "masked", "owner", "label", "status", "suspended_for", "proxy_state", "created_at",
        "issued_at", "last_used_at",
    )
    list_filter = (
        "status", "proxy_state", "suspended_for", HasLimitsFilter,
        ("expires_at", admin.EmptyFieldListFilter), ("owner", admin.EmptyFieldListFilter),
    )
    search_fields = ("owner__email", "owner__name", "label", "last4")
    list_select_related = ("owner",)
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": (
            "masked", "owner", "label", "status", "suspended_for", "suspended_until",
            "proxy_state", "created_at", "issued_at", "last_used_at", "revoked_at",
        )}),
        (_("Expiry and limits of this key (empty: none)"), {
            "fields": ("expires_at", *Limits.LIMIT_FIELDS),
        }),
    )
    readonly_fields = (
        "masked", "owner", "status", "suspended_for", "suspended_until", "proxy_state",
        "created_at", "issued_at", "last_used_at", "revoked_at",
    )
    actions = ("revoke_keys", "suspend_keys", "resume_keys")
    show_full_result_count = False

    @admin.display(description=_("key"), ordering="last4")
    def masked(self, obj: ApiKey) -> str:
        return obj.masked

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # keys come from the pool ("Generate pool keys")

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # keys carry usage history; they are revoked, never deleted

    def get_urls(self) -> list[URLPattern]:
        own = [
            path("generate/", self.admin_site.admin_view(self.generate_view), name="pool_apikey_generate"),
            path("reconcile/", self.admin_site.admin_view(self.reconcile_view), name="pool_apikey_reconcile"),
        ]
        return own + super().get_urls()

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "pool_status": pool_status()}
        return super().changelist_view(request, extra_context)

    def _require_change(self, request: HttpRequest) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied

    def _back(self) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:pool_apikey_changelist"))

    def generate_view(self, request: HttpRequest) -> HttpResponse:
        self._require_change(request)
        form = GenerateForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                with ProxyClient.from_settings() as client:
                    report = pool_generate(
                        count=form.cleaned_data["count"], client=client, by=request.user,
                        ip=client_ip(request),
                    )
            except UpstreamError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                for line in report.lines():
                    self.message_user(request, line, messages.SUCCESS)
            return self._back()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "form": form,
            "title": _("Generate pool keys"),
            "pool_status": pool_status(),
        }
        return render(request, "admin/pool/apikey/generate.html", context)

    def reconcile_view(self, request: HttpRequest) -> HttpResponse:
        self._require_change(request)
        if request.method != "POST":
            return self._back()
        try:
            with ProxyClient.from_settings() as client:
                report = keys_reconcile(client=client, by=request.user, ip=client_ip(request))
        except UpstreamError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            level = messages.SUCCESS if report.changed else messages.INFO
            for line in report.lines():
                self.message_user(request, line, level)
        return self._back()

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).defer("value", "escrow")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_form_changes(
            request=request, obj=obj, form=form, fields=("expires_at", *Limits.LIMIT_FIELDS)
        )

    def _each(self, request: HttpRequest, queryset: QuerySet[ApiKey], change: Any, done: str) -> None:
        moved = sum(bool(change(key)) for key in queryset)
        if moved:
            keys_reconcile_in_request()  # the proxy follows now if quick, else at the next run
        self.message_user(request, done % {"n": moved}, messages.SUCCESS if moved else messages.INFO)

    @admin.action(description=_("Revoke the selected keys"), permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        ip = client_ip(request)
        self._each(request, queryset, lambda k: key_revoke(key=k, by=request.user, ip=ip),
                   _("%(n)d keys revoked."))

    @admin.action(description=_("Suspend the selected keys (until resumed)"), permissions=["change"])
    def suspend_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        ip = client_ip(request)
        self._each(
            request, queryset,
            lambda k: key_suspend(key=k, reason=ApiKey.SuspendedFor.STAFF, by=request.user, ip=ip),
            _("%(n)d keys suspended."),
        )

    @admin.action(description=_("Resume the selected suspended keys"), permissions=["change"])
    def resume_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        ip = client_ip(request)
        self._each(request, queryset, lambda k: key_resume(key=k, by=request.user, ip=ip),
                   _("%(n)d keys resumed."))
