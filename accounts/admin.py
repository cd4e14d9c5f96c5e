from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.auth.forms import UserChangeForm as BaseUserChangeForm
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from accounts.models import ApiToken, LimitDefaults, Limits, User, normalize_email
from accounts.ldap import PROVIDER_LDAP, ldap_enabled
from accounts.oidc import signin_providers
from accounts.services import api_token_new, api_tokens_revoke
from keyportal.audit import Action, audit_form_changes, audit_record, client_ip


class UserCreationForm(forms.ModelForm):
    """Staff add people by email; a password is only for people who will use the admin."""

    password1 = forms.CharField(
        label=_("Password"),
        widget=forms.PasswordInput,
        required=False,
        help_text=_("Leave empty for people who only sign in by emailed link."),
    )

    class Meta:
        model = User
        fields = ("email", "name", "is_staff")

    def clean_email(self) -> str:
        email = normalize_email(self.cleaned_data["email"])
        if User.objects.filter(email=email).exists():
            raise forms.ValidationError(_("A person with this email address already exists."))
        return email

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("is_staff") and not cleaned.get("password1"):
            self.add_error("password1", _("Staff need a password to sign in to the admin."))
        return cleaned

    def save(self, commit: bool = True) -> User:
        user = super().save(commit=False)
        for name, value in LimitDefaults.for_new_person().items():
            setattr(user, name, value)
        if self.cleaned_data.get("password1"):
            user.set_password(self.cleaned_data["password1"])
        else:
            user.set_unusable_password()
        if commit:
            user.save()
        return user


class UserChangeForm(BaseUserChangeForm):
    class Meta:
        model = User
        fields = "__all__"

    def clean_email(self) -> str:
        return normalize_email(self.cleaned_data["email"])


class HasLimitsFilter(admin.SimpleListFilter):
    """People or keys with at least one limit set, or none at all."""

    title = _("limits")
    parameter_name = "limits"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("some limit set")), ("no", _("no limit"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        any_limit = Q()
        for name in Limits.LIMIT_FIELDS:
            any_limit |= Q(**{f"{name}__isnull": False})
        if self.value() == "yes":
            return queryset.filter(any_limit)
        if self.value() == "no":
            return queryset.exclude(any_limit)
        return queryset


class SignInProviderFilter(admin.SimpleListFilter):
    """People linked to an identity provider (any, or one of those configured)."""

    title = _("signs in with")
    parameter_name = "provider"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        # From settings, not from the rows: the filter costs the list page no query.
        return [("any", _("an identity provider")), ("none", _("emailed link only"))] + [
            (p["id"], p["name"]) for p in signin_providers()
        ] + ([(PROVIDER_LDAP, _("company directory (LDAP)"))] if ldap_enabled() else [])

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "any":
            return queryset.filter(socialaccount__isnull=False).distinct()
        if value == "none":
            return queryset.filter(socialaccount__isnull=True)
        if value:
            return queryset.filter(socialaccount__provider=value).distinct()
        return queryset


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    form = UserChangeForm
    add_form = UserCreationForm
    ordering = ("email",)
    list_display = ("email", "name", "is_staff", "is_active", "date_joined", "last_login")
    list_filter = (
        "is_staff", "is_superuser", "is_active", HasLimitsFilter, SignInProviderFilter,
        "date_joined",
    )
    search_fields = ("email", "name")
    show_full_result_count = False
    readonly_fields = ("date_joined", "last_login", "usage_page", "signin_methods")
    fieldsets = (
        (None, {"fields": (
            "email", "name", "language", "password", "usage_page", "signin_methods",
        )}),
        (_("Limits (empty: none)"), {"fields": Limits.LIMIT_FIELDS}),
        (
            _("Permissions"),
            {"fields": ("is_active", "is_staff", "is_superuser", "user_permissions")},
        ),
        (_("Dates"), {"fields": ("last_login", "date_joined")}),
    )
    # Permissions and superuser mean something only for people who use the admin (groups are
    # not used: keyportal/admin.py):
    # a person who only holds keys sees (and staff edit) active and staff. Ticking staff and
    # saving brings the rest back.
    PERMISSIONS_OF_STAFF_ONLY = ("is_superuser", "user_permissions")

    def get_fieldsets(self, request: HttpRequest, obj: User | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.is_staff or obj.is_superuser:
            return fieldsets
        return [
            (title, {**options, "fields": tuple(
                f for f in options["fields"] if f not in self.PERMISSIONS_OF_STAFF_ONLY)})
            for title, options in fieldsets
        ]

    @admin.display(description=_("usage"))
    def usage_page(self, obj: User) -> str:
        if obj.pk is None:
            return "—"
        # By URL name: the page lives in usage, which accounts does not import.
        return format_html('<a href="{}">{}</a>', reverse("staff-person", args=[obj.pk]),
                           _("Usage, keys, quota and audit rows of this person"))
    @admin.display(description=_("sign-in methods"))
    def signin_methods(self, obj: User) -> str:
        """The emailed link (always), the password (staff with one) and each identity
        provider the person signed in with, with their subject there and the last time."""
        if obj.pk is None:
            return "—"
        names = {p["id"]: p["name"] for p in signin_providers()}
        names[PROVIDER_LDAP] = str(_("company directory (LDAP)"))
        methods = [str(_("emailed link"))] if settings.PORTAL_EMAIL_LINK_SIGNIN else []
        if obj.is_staff and obj.has_usable_password():
            methods.append(str(_("password (admin)")))
        for account in obj.socialaccount_set.order_by("provider", "uid"):
            when = date_format(timezone.localtime(account.last_login), "Y-m-d H:i")
            methods.append(
                str(_("%(provider)s (subject %(uid)s, last %(when)s)")) % {
                    "provider": names.get(account.provider, account.provider),
                    "uid": account.uid, "when": when,
                }
            )
        return "; ".join(methods)

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change:
            audit_form_changes(request=request, obj=obj, form=form, fields=Limits.LIMIT_FIELDS)

    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "name", "is_staff", "password1")}),)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Staff create tokens here; the token is shown once, on the page right after adding."""

    list_display = ("name", "user", "masked", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "user__email", "last4")
    list_select_related = ("user",)
    fields = ("user", "name", "masked", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("masked", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_tokens",)

    @admin.display(description=_("token"))
    def masked(self, obj: ApiToken) -> str:
        return obj.masked if obj.last4 else "—"

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple:
        # A token's owner and purpose are fixed once it exists: revoke and make a new one.
        return self.readonly_fields + (("user", "name") if obj else ())

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if not change:
            raw = api_token_new()
            obj.set_token(raw)
            request.new_api_token = raw  # type: ignore[attr-defined]  # for response_add only
        super().save_model(request, obj, form, change)
        if not change:  # the admin's add view runs in one transaction: row and audit together
            audit_record(action=Action.TOKEN_CREATED, actor=request.user, target=obj,
                         ip=client_ip(request), after={"for": obj.user.email})

    def response_add(self, request: HttpRequest, obj: ApiToken, *args: Any) -> HttpResponse:
        raw = getattr(request, "new_api_token", None)
        if raw is None:
            return super().response_add(request, obj, *args)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("API token created"),
            "token": raw,
            "obj": obj,
        }
        response = TemplateResponse(request, "accounts/admin/apitoken_created.html", context)
        add_never_cache_headers(response)
        return response

    @admin.action(description=_("Revoke the selected tokens"))
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        n = api_tokens_revoke(
            ids=list(queryset.values_list("id", flat=True)), by=request.user, ip=client_ip(request)
        )
        self.message_user(request, _("%(n)d tokens revoked.") % {"n": n}, messages.SUCCESS)


@admin.register(LimitDefaults)
class LimitDefaultsAdmin(admin.ModelAdmin):
    """One row: the limits and key lifetime every new person starts with."""

    fieldsets = (
        (_("Limits for new people (empty: none)"), {"fields": Limits.LIMIT_FIELDS}),
        (_("Keys"), {"fields": ("key_valid_days",)}),
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: LimitDefaults, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_form_changes(
            request=request, obj=obj, form=form, fields=(*Limits.LIMIT_FIELDS, "key_valid_days")
        )

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        defaults = LimitDefaults.current()
        return HttpResponseRedirect(
            reverse("admin:accounts_limitdefaults_change", args=[defaults.pk])
        )
