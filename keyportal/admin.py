from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.debug import sensitive_post_parameters
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import Authenticator
from accounts.totp import totp_remove
from keyportal.audit import client_ip
from keyportal.forms import WebhookAdminForm
from keyportal.models import AuditEvent, Delivery, Webhook
from keyportal.notify import STAFF_EVENTS, webhook_test
from keyportal.services import webhook_save


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


# --- team chat webhooks and their deliveries (keyportal.notify) --------------------------------
# The URL and the signing secret are write-only here: the form never shows them back and the
# lists show the host only. Django's own change history names changed fields, not values.


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    form = WebhookAdminForm
    list_display = ("name", "kind", "host", "owner", "enabled", "alerts", "created_at")
    list_filter = ("kind", "enabled", ("owner", admin.EmptyFieldListFilter))
    search_fields = ("name", "host", "owner__email")
    list_select_related = ("owner",)
    actions = ("send_test",)
    fieldsets = (
        (None, {"fields": ("name", "kind", "new_url", "new_secret", "clear_secret", "enabled",
                           "events")}),
    )

    @method_decorator(sensitive_post_parameters("new_url", "new_secret"))
    def changeform_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        # Django's error reports (and the debug page) then show these fields as stars.
        return super().changeform_view(request, *args, **kwargs)

    @admin.display(description=_("alerts"))
    def alerts(self, obj: Webhook) -> str:
        if obj.owner_id:
            return str(_("the person's limit notices"))
        if not obj.events:
            return str(_("all staff alerts"))
        return ", ".join(str(STAFF_EVENTS.get(e, e)) for e in obj.events)

    def save_model(self, request: HttpRequest, obj: Webhook, form: WebhookAdminForm,
                   change: bool) -> None:
        webhook_save(webhook=obj, url=form.cleaned_data.get("new_url", ""),
                     secret=form.cleaned_data.get("new_secret", ""),
                     clear_secret=form.cleaned_data.get("clear_secret", False))

    @admin.action(description=_("Send a test message"))
    def send_test(self, request: HttpRequest, queryset: QuerySet[Webhook]) -> None:
        count = 0
        for hook in queryset:
            webhook_test(webhook=hook)
            count += 1
        self.message_user(request, ngettext(
            "A test message is on its way to %(count)d webhook; its result shows under "
            "Deliveries in a few seconds.",
            "Test messages are on their way to %(count)d webhooks; their results show under "
            "Deliveries in a few seconds.", count) % {"count": count}, messages.SUCCESS)


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    """The outbox, read-only: what went out, what is retrying and why, what was given up."""

    list_display = ("created_at", "target", "event", "status", "attempts", "last_error",
                    "next_try", "tried_at")
    list_filter = ("status", "event", "created_at")
    list_select_related = ("webhook",)
    search_fields = ("webhook__name", "webhook__host", "event", "subject")
    fields = ("created_at", "target", "event", "subject", "body", "status", "attempts",
              "last_error", "next_try_at", "tried_at", "sent_at")
    readonly_fields = fields
    actions = ("retry_now",)
    show_full_result_count = False

    @admin.display(description=_("webhook"), ordering="webhook__name")
    def target(self, obj: Delivery) -> str:
        if obj.webhook is None:
            return "PORTAL_STAFF_WEBHOOK_URL"
        return f"{obj.webhook.name} ({obj.webhook.host})"

    @admin.display(description=_("next try"), ordering="next_try_at")
    def next_try(self, obj: Delivery) -> Any:
        return obj.next_try_at if obj.status == Delivery.Status.PENDING else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Delivery | None = None) -> bool:
        return False

    @admin.action(description=_("Try again now"), permissions=["view"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        from keyportal.notify import kick

        count = queryset.filter(status__in=[Delivery.Status.PENDING, Delivery.Status.FAILED]
                                ).update(status=Delivery.Status.PENDING, attempts=0,
                                         next_try_at=timezone.now())
        kick()
        self.message_user(request, ngettext(
            "%(count)d delivery will be tried again now.",
            "%(count)d deliveries will be tried again now.", count) % {"count": count})
