from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.models import Group
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import Authenticator
from accounts.totp import totp_remove
from keyportal.audit import client_ip
from keyportal.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: staff search and filter the trail; nobody edits or deletes it here."""

    # Fits the admin's column at 1280 px: who and what are clipped with the whole text in
    # their title (the kind of actor too); every field is whole on the row's own page.
    list_display = ("at", "actor_short", "action", "target_short", "ip_short")
    list_filter = ("action", "actor_kind", "target_type", "at")
    search_fields = ("actor_label", "target_label", "target_id", "detail", "ip")
    date_hierarchy = "at"
    list_select_related = ()
    show_full_result_count = False

    @admin.display(description=_("actor"), ordering="actor_label")
    def actor_short(self, obj: AuditEvent) -> str:
        title = f"{obj.get_actor_kind_display()}: {obj.actor_label}"
        return format_html('<span class="clip" title="{}">{}</span>', title,
                           obj.actor_label or obj.get_actor_kind_display())

    @admin.display(description=_("target"), ordering="target_label")
    def target_short(self, obj: AuditEvent) -> str:
        return format_html('<span class="clip-wide" title="{}">{}</span>', obj.target_label,
                           obj.target_label)

    @admin.display(description=_("IP address"), ordering="ip")
    def ip_short(self, obj: AuditEvent) -> str:
        if not obj.ip:
            return "—"
        return format_html('<span class="clip ip" title="{}">{}</span>', obj.ip, obj.ip)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False


# --- Django's groups ---------------------------------------------------------------------------
# The portal grants nothing through groups (staff are staff, people hold keys): the sidebar
# entry only invited staff to build something that changes nothing.

try:
    admin.site.unregister(Group)
except admin.sites.NotRegistered:
    pass


# --- authenticator apps (django-otp's TOTP devices) ------------------------------------------
# otp_totp's own admin can show a device's secret and QR code to any staff member; this one
# lists devices and lets staff remove a colleague's (a lost phone), audited, and nothing else.
# Setting one up happens on the staff member's own page (/admin/totp/setup/).

try:
    admin.site.unregister(TOTPDevice)
except admin.sites.NotRegistered:
    pass


@admin.register(Authenticator)
class AuthenticatorAdmin(admin.ModelAdmin):
    list_display = ("user", "confirmed", "created_at", "last_used_at")
    list_filter = ("confirmed",)
    search_fields = ("user__email",)
    list_select_related = ("user",)
    fields = ("user", "confirmed", "created_at", "last_used_at")
    readonly_fields = fields
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Authenticator | None = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: Authenticator) -> None:
        totp_remove(user=obj.user, by=request.user, ip=client_ip(request))


# --- allauth's models ---------------------------------------------------------------------------
# allauth only carries the identity provider's round trip (accounts/oidc.py): providers come
# from settings (no SocialApp rows), its e-mail addresses are not the portal's (User.email is),
# and provider tokens are not kept. Which provider a person uses shows on their page.
from allauth.account.models import EmailAddress, EmailConfirmation  # noqa: E402
from allauth.socialaccount.models import SocialAccount, SocialApp, SocialToken  # noqa: E402

for _model in (EmailAddress, EmailConfirmation, SocialAccount, SocialApp, SocialToken):
    try:
        admin.site.unregister(_model)
    except admin.sites.NotRegistered:
        pass
