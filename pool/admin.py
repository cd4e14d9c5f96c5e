from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.conf import settings
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from accounts.admin import HasLimitsFilter, UserAdmin
from accounts.models import Limits, User
from keyportal.admin_site import back_to
from keyportal.audit import audit_form_changes, client_ip
from pool.models import ApiKey, Upstream, UpstreamAccount
from pool.selectors import health_within, pool_status, upstream_probes_forget
from pool.services import (
    PersonKeysReport,
    key_resume,
    key_revoke,
    key_suspend,
    keys_reconcile,
    keys_reconcile_in_request,
    person_set_active,
    pool_generate,
)
from pool.upstream import ProxyClient, UpstreamError
from pool.upstreams.base import Health
from pool.upstreams.registry import (
    PUBLIC_URL_SETTINGS, cliproxyapi_in_use, driver_for, endpoint, environment_sync,
    public_url_from_environment,
)
from pool.upstreams.relays import relays_reconcile


class GenerateForm(forms.Form):
    count = forms.IntegerField(
        label=_("How many keys"), min_value=1, max_value=10_000, initial=50,
        help_text=_("They are pushed to the proxy in one write."),
    )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are always shown masked: the full value of a pool key never reaches a page."""

    list_display = (
        "masked", "owner", "label", "upstream_name", "status", "suspended_for", "proxy_state",
        "created_at", "issued_at", "last_used_at",
    )
    list_filter = (
        "status", "upstream", "proxy_state", "suspended_for", HasLimitsFilter,
        ("expires_at", admin.EmptyFieldListFilter), ("owner", admin.EmptyFieldListFilter),
    )
    search_fields = ("owner__email", "owner__name", "label", "last4")
    list_select_related = ("owner", "upstream")
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": (
            "masked", "owner", "label", "upstream_name", "status", "suspended_for",
            "suspended_until", "proxy_state", "created_at", "issued_at", "last_used_at",
            "revoked_at",
        )}),
        (_("Expiry and limits of this key (empty: none)"), {
            "fields": ("expires_at", *Limits.LIMIT_FIELDS),
        }),
    )
    readonly_fields = (
        "masked", "owner", "upstream_name", "status", "suspended_for", "suspended_until",
        "proxy_state", "created_at", "issued_at", "last_used_at", "revoked_at",
    )
    actions = ("revoke_keys", "suspend_keys", "resume_keys")
    show_full_result_count = False

    @admin.display(description=_("key"), ordering="last4")
    def masked(self, obj: ApiKey) -> str:
        return obj.masked

    @admin.display(description=_("upstream"), ordering="upstream__name")
    def upstream_name(self, obj: ApiKey) -> str:
        # No upstream: a key of the CLIProxyAPI (the pool's), made before upstreams existed.
        return obj.upstream.name if obj.upstream_id else "CLIProxyAPI"

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
        # A portal on relays only has no pool: no pool line, no "Generate pool keys".
        extra_context = {**(extra_context or {}), "pool_status": pool_status(),
                         "has_pool": cliproxyapi_in_use()}
        return super().changelist_view(request, extra_context)

    def _require_change(self, request: HttpRequest) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied

    def _back(self, request: HttpRequest | None = None) -> HttpResponseRedirect:
        default = reverse("admin:pool_apikey_changelist")
        return HttpResponseRedirect(back_to(request, default) if request else default)

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
            return self._back(request)
        # Each relay that makes its own keys, then the CLIProxyAPI's list (when there is one),
        # as reconcile_keys does.
        try:
            for relay in relays_reconcile():
                level = messages.SUCCESS if relay.changed else messages.INFO
                for line in relay.lines():
                    self.message_user(request, line, messages.WARNING if relay.errors else level)
        except UpstreamError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        if not cliproxyapi_in_use():
            return self._back(request)
        try:
            with ProxyClient.from_settings() as client:
                report = keys_reconcile(client=client, by=request.user, ip=client_ip(request))
        except UpstreamError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            level = messages.SUCCESS if report.changed else messages.INFO
            for line in report.lines():
                self.message_user(request, line, level)
        return self._back(request)

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
        # key_resume refuses these: a deactivated person's keys come back with the person.
        held = queryset.filter(status=ApiKey.Status.SUSPENDED, owner__is_active=False).count()
        self._each(request, queryset, lambda k: key_resume(key=k, by=request.user, ip=ip),
                   _("%(n)d keys resumed."))
        if held:
            self.message_user(request, ngettext(
                "%(n)d key was not resumed: its owner's account is deactivated. Reactivate the "
                "person to bring their keys back.",
                "%(n)d keys were not resumed: their owners' accounts are deactivated. Reactivate "
                "the people to bring their keys back.", held) % {"n": held}, messages.WARNING)


# --- people ----------------------------------------------------------------------------------
# The person admin is accounts' own, registered again here with what `active` means for keys
# (dependencies run usage -> pool -> accounts, so accounts cannot know about keys); usage
# registers it once more with usage totals, on top of this class.

admin.site.unregister(User)


@admin.register(User)
class PersonKeysAdmin(UserAdmin):
    """Unticking `active` (or the deactivate action) suspends all the person's keys and
    takes them off the proxy at once; ticking it again brings back the keys suspended that
    way, from escrow. A key revoked meanwhile stays revoked, a key held by a limit waits for
    its window."""

    actions = ("deactivate_people", "reactivate_people")
    # A read-only field rather than an inline: an inline's management form would be required
    # in every save of the person form (scripts and tests post it without one).
    readonly_fields = (*UserAdmin.readonly_fields, "upstream_accounts")
    fieldsets = (
        (UserAdmin.fieldsets[0][0], {**UserAdmin.fieldsets[0][1], "fields": (
            *UserAdmin.fieldsets[0][1]["fields"], "upstream_accounts")}),
        *UserAdmin.fieldsets[1:],
    )

    @admin.display(description=_("accounts at upstreams"))
    def upstream_accounts(self, obj: User | None) -> str:
        """The person's own accounts at relays with people (Claude Code Hub)."""
        if obj is None or obj.pk is None:
            return "—"
        rows = list(UpstreamAccount.objects.filter(person=obj).select_related("upstream")
                    .order_by("upstream__name"))
        if not rows:
            return _("none")
        return format_html_join(", ", "{} ({} {})",
                                ((a.upstream.name, _("id"), a.remote_id) for a in rows))

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        if "is_active" in form.base_fields:
            form.base_fields["is_active"].help_text = _(
                "Unticking it suspends all of this person's keys at the proxy at once and stops "
                "sign-in; ticking it again brings back the keys suspended that way."
            )
        return form

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        if change and "is_active" in form.changed_data:
            # In the admin's transaction: the person, their keys and the audit rows commit
            # together with the rest of the form.
            report = person_set_active(
                person=obj, active=obj.is_active, by=request.user, ip=client_ip(request)
            )
            self._keys_followed(request, report)
        super().save_model(request, obj, form, change)

    @admin.action(description=_("Deactivate the selected people (their keys stop working)"),
                  permissions=["change"])
    def deactivate_people(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        if queryset.filter(pk=request.user.pk).exists():
            self.message_user(request, _("You cannot deactivate yourself; you were left out."),
                              messages.WARNING)
            queryset = queryset.exclude(pk=request.user.pk)
        self._set_active(request, queryset, active=False)

    @admin.action(description=_("Reactivate the selected people (their keys come back)"),
                  permissions=["change"])
    def reactivate_people(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        self._set_active(request, queryset, active=True)

    def _set_active(self, request: HttpRequest, queryset: QuerySet[User], *, active: bool) -> None:
        ip = client_ip(request)
        total, people = PersonKeysReport(), 0
        for person in queryset:
            report = person_set_active(person=person, active=active, by=request.user, ip=ip)
            people += report.changed
            total.suspended += report.suspended
            total.restored += report.restored
            total.expired += report.expired
        done = (ngettext("%(n)d person reactivated.", "%(n)d people reactivated.", people)
                if active else
                ngettext("%(n)d person deactivated.", "%(n)d people deactivated.", people))
        self.message_user(request, done % {"n": people},
                          messages.SUCCESS if people else messages.INFO)
        self._keys_followed(request, total)

    def _keys_followed(self, request: HttpRequest, report: PersonKeysReport) -> None:
        """Tells staff what happened to the keys, and lets the proxy follow once the change
        is committed (at once outside a transaction): a reconcile before the commit would
        find the keys unchanged, or take keys off the proxy for a change rolled back later."""
        if report.suspended:
            self.message_user(request, ngettext(
                "%(n)d key suspended: it leaves the proxy now.",
                "%(n)d keys suspended: they leave the proxy now.", report.suspended,
            ) % {"n": report.suspended}, messages.SUCCESS)
        if report.restored:
            self.message_user(request, ngettext(
                "%(n)d key active again: it returns to the proxy now.",
                "%(n)d keys active again: they return to the proxy now.", report.restored,
            ) % {"n": report.restored}, messages.SUCCESS)
        if report.expired:
            self.message_user(request, ngettext(
                "%(n)d key expired while its owner was deactivated and stays off the proxy.",
                "%(n)d keys expired while their owners were deactivated and stay off the proxy.",
                report.expired,
            ) % {"n": report.expired}, messages.INFO)
        if not report.keys_moved:
            return

        def proxy_follows() -> None:
            if keys_reconcile_in_request() is None:
                self.message_user(request, _(
                    "The proxy could not be reached: it follows at the next reconcile or sync."
                ), messages.WARNING)

        transaction.on_commit(proxy_follows)


# --- upstreams --------------------------------------------------------------------------------


class UpstreamForm(forms.ModelForm):
    """An upstream as staff add or edit it. The secret (management key, admin password or
    admin token) is write-only: never shown back, left as it is when the field is blank."""

    secret_new = forms.CharField(
        label=_("Secret"), required=False, strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text=_("CLIProxyAPI: its management key; claude-relay-service: the admin "
                    "password; Claude Code Hub: its ADMIN_TOKEN. Stored sealed and never shown "
                    "again; leave it blank to keep the one stored."),
    )

    # An address typed without a scheme is taken as http:// (relays on a LAN rarely have
    # TLS); anything but http(s) is refused below.
    management_url = forms.URLField(
        label=Upstream._meta.get_field("management_url").verbose_name, assume_scheme="http",
        help_text=Upstream._meta.get_field("management_url").help_text, required=False)
    public_url = forms.URLField(
        label=Upstream._meta.get_field("public_url").verbose_name, assume_scheme="http",
        help_text=Upstream._meta.get_field("public_url").help_text, required=False)

    class Meta:
        model = Upstream
        fields = ("name", "kind", "management_url", "public_url", "username", "open_to_everyone",
                  "open_to", "enabled")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.from_environment and "public_url" in self.fields:
            # Shown only while the environment leaves it unset (UpstreamAdmin): say which
            # variable would win, so nobody wonders later why a value typed here is ignored.
            self.fields["public_url"].help_text = _(
                "The address people's tools use, e.g. https://relay.example.com. %(name)s is "
                "not set in the environment, so this one counts (%(name)s wins once set); "
                "empty: the management URL.") % {"name": PUBLIC_URL_SETTINGS[self.instance.kind]}

    def _url(self, name: str) -> str:
        value = (self.cleaned_data.get(name) or "").strip().rstrip("/")
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise forms.ValidationError(_("Give an http:// or https:// address."), code="scheme")
        return value

    def clean_management_url(self) -> str:
        value = self._url("management_url")
        if not value and not self.instance.from_environment:
            raise forms.ValidationError(_("Give the address the portal reaches its admin API "
                                          "at."), code="required")
        return value or self.instance.management_url

    def clean_public_url(self) -> str:
        return self._url("public_url")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        kind = data.get("kind") or self.instance.kind
        if self.instance.from_environment:
            return data  # address and credentials come from the environment (read-only here)
        if kind == Upstream.Kind.CLIPROXYAPI:
            others = Upstream.objects.filter(kind=kind).exclude(pk=self.instance.pk)
            if others.exists() or settings.CLIPROXY_URL:
                self.add_error("kind", _(
                    "The portal has a CLIProxyAPI already (%(where)s): a portal has at most one, "
                    "whose keys are the pool's. Add claude-relay-service or Claude Code Hub "
                    "upstreams instead, or edit that one.") % {
                    "where": others.first().name if others.exists() else "CLIPROXY_URL"})
        if kind == Upstream.Kind.CRS and not data.get("username"):
            self.add_error("username", _("claude-relay-service needs the admin username the "
                                         "portal signs in with."))
        if not self.instance.secret and not data.get("secret_new"):
            self.add_error("secret_new", _("Give the secret: the portal cannot sign in there "
                                           "without it."))
        return data

    def save(self, commit: bool = True) -> Upstream:
        upstream = super().save(commit=False)
        if self.cleaned_data.get("secret_new") and not upstream.from_environment:
            upstream.secret = self.cleaned_data["secret_new"]
        if commit:
            upstream.save()
            self.save_m2m()
        return upstream


@admin.register(Upstream)
class UpstreamAdmin(admin.ModelAdmin):
    """The relays keys are made at. The environment's ones (CLIPROXY_*, CRS_*, CCH_*) show
    their address from the environment and cannot be edited here but for their name, who
    they are open to and whether they are enabled."""

    form = UpstreamForm
    list_display = ("name", "kind", "management_address", "public_address", "open_to_whom",
                    "enabled", "from_environment", "key_count")
    list_filter = ("kind", "enabled", "from_environment")
    search_fields = ("name",)
    filter_horizontal = ("open_to",)
    ENVIRONMENT_FIELDS = ("kind", "management_address", "public_address_environment",
                          "username_shown", "environment_note")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Upstream]:
        return super().get_queryset(request).annotate(
            # distinct: the two joins multiply each other's rows.
            n_keys=Count("keys", filter=~Q(keys__status=ApiKey.Status.REVOKED), distinct=True),
            n_open=Count("open_to", distinct=True),
        )

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict | None = None) -> HttpResponse:
        environment_sync()  # the environment's upstreams are listed from their first visit
        return super().changelist_view(request, extra_context)

    def _environment_fields(self, obj: Upstream) -> tuple[str, ...]:
        # The public URL of an environment upstream is staff's to set here (no shell step)
        # unless the environment sets it: then the environment's value wins and is shown.
        if public_url_from_environment(obj.kind):
            return self.ENVIRONMENT_FIELDS
        return tuple("public_url" if name == "public_address_environment" else name
                     for name in self.ENVIRONMENT_FIELDS)

    def get_fieldsets(self, request: HttpRequest, obj: Upstream | None = None) -> Any:
        if obj is not None and obj.from_environment:
            return ((None, {"fields": ("name", *self._environment_fields(obj))}),
                    (_("Who may add keys here"), {"fields": ("open_to_everyone", "open_to",
                                                            "enabled")}))
        return ((None, {"fields": ("name", "kind", "management_url", "public_url", "username",
                                   "secret_new", "secret_state")}),
                (_("Who may add keys here"), {"fields": ("open_to_everyone", "open_to",
                                                        "enabled")}))

    def get_readonly_fields(self, request: HttpRequest, obj: Upstream | None = None) -> Any:
        if obj is not None and obj.from_environment:
            return tuple(n for n in self._environment_fields(obj) if n != "public_url")
        # A kind never changes once keys may exist there: they were made by that kind.
        return ("secret_state",) if obj is None else ("kind", "secret_state")

    def has_delete_permission(self, request: HttpRequest, obj: Upstream | None = None) -> bool:
        if obj is not None and obj.from_environment:
            return False  # it comes back from the environment: unset the variables instead
        return super().has_delete_permission(request, obj)

    @admin.display(description=_("management URL"))
    def management_address(self, obj: Upstream) -> str:
        return endpoint(obj).management_url or "—"

    @admin.display(description=_("public URL"))
    def public_address(self, obj: Upstream) -> str:
        return endpoint(obj).public_url or "—"

    @admin.display(description=_("public URL"))
    def public_address_environment(self, obj: Upstream) -> str:
        return _("%(url)s (set by %(name)s in the environment, which wins)") % {
            "url": endpoint(obj).public_url, "name": PUBLIC_URL_SETTINGS[obj.kind]}

    @admin.display(description=_("admin username"))
    def username_shown(self, obj: Upstream) -> str:
        return endpoint(obj).username or "—"

    @admin.display(description=_("secret"))
    def secret_state(self, obj: Upstream) -> str:
        return _("stored (sealed)") if obj.pk and obj.secret else _("none")

    @admin.display(description=_("where it is set"))
    def environment_note(self, obj: Upstream) -> str:
        names = {Upstream.Kind.CLIPROXYAPI: "CLIPROXY_URL, CLIPROXY_PUBLIC_URL, "
                 "CLIPROXY_MANAGEMENT_KEY",
                 Upstream.Kind.CRS: "CRS_URL, CRS_PUBLIC_URL, CRS_ADMIN_USERNAME, "
                 "CRS_ADMIN_PASSWORD",
                 Upstream.Kind.CCH: "CCH_URL, CCH_PUBLIC_URL, CCH_ADMIN_TOKEN"}
        return _("Its address and credentials come from the environment (%(names)s): change "
                 "them there and restart the portal.") % {"names": names.get(obj.kind, "")}

    @admin.display(description=_("open to"))
    def open_to_whom(self, obj: Upstream) -> str:
        if obj.open_to_everyone:
            return _("everyone")
        n = getattr(obj, "n_open", 0)
        return ngettext("%(n)d person", "%(n)d people", n) % {"n": n}

    @admin.display(description=_("keys"), ordering="n_keys")
    def key_count(self, obj: Upstream) -> int:
        return getattr(obj, "n_keys", 0)

    def save_model(self, request: HttpRequest, obj: Upstream, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        upstream_probes_forget()  # the index's checklist asks the upstreams afresh
        # Said, never blocking: an upstream may be saved before it runs.
        health = upstream_health_now(obj)
        self.message_user(
            request,
            (_("%(name)s answers: %(detail)s.") if health.ok else
             _("%(name)s does not answer as expected: %(detail)s (saved all the same).")) % {
                "name": obj.name, "detail": health.detail.rstrip(".。")},
            messages.SUCCESS if health.ok else messages.WARNING,
        )


def upstream_health_now(upstream: Upstream) -> Health:
    """The upstream's health from its driver, never raising (a driver missing or failing is
    reported as a sentence). A relay is asked in a worker thread, waited for within a page's
    budget; the CLIProxyAPI in this thread (its client reads and writes the shared cache,
    which is the database, inside the admin's transaction) with its own 5 s budget."""
    if not upstream.is_cliproxyapi:
        return health_within(upstream, budget=settings.PORTAL_REQUEST_PROXY_BUDGET)
    try:
        driver = driver_for(upstream)
        try:
            return driver.health()
        finally:
            driver.close()
    except Exception as exc:  # a save must go through whatever the driver does
        return Health(False, _("the portal could not ask it (%(error)s)")
                      % {"error": type(exc).__name__})
