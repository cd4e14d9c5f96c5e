from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import URLPattern, path, reverse
from django.utils.translation import gettext_lazy as _

from keyportal.audit import client_ip
from pool.models import ApiKey
from pool.selectors import pool_status
from pool.services import keys_reconcile, pool_generate
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
        "masked", "owner", "label", "status", "proxy_state", "created_at", "issued_at",
        "last_used_at",
    )
    list_filter = ("status", "proxy_state")
    search_fields = ("owner__email", "owner__name", "label", "last4")
    list_select_related = ("owner",)
    date_hierarchy = "created_at"
    fields = (
        "masked", "owner", "label", "status", "proxy_state", "created_at", "issued_at",
        "last_used_at", "revoked_at",
    )
    readonly_fields = (
        "masked", "owner", "status", "proxy_state", "created_at", "issued_at", "last_used_at",
        "revoked_at",
    )
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
        return super().get_queryset(request).defer("value")
