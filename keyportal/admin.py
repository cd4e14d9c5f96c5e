from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.models import Group
from django.http import HttpRequest
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import Authenticator
from accounts.totp import totp_remove
from keyportal.audit import client_ip
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
