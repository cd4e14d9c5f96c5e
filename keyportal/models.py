"""Infrastructure shared by every app: cross-process leases and the audit log."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Lease(models.Model):
    """A named lock that works across processes and machines on SQLite and PostgreSQL.

    A row per name; whoever moves `holder` from empty (or expired) to itself with one
    conditional UPDATE owns it. The expiry frees a lease whose holder was killed."""

    name = models.CharField(max_length=100, primary_key=True)
    holder = models.CharField(max_length=100, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class AuditEvent(models.Model):
    """One row per action that changed something: who, what, on what, before/after, from
    where, when. Written by the services inside the same transaction as the change, so a row
    exists exactly when the change does; never edited or deleted afterwards."""

    class ActorKind(models.TextChoices):
        PERSON = "person", _("person")
        STAFF = "staff", _("staff")
        SYSTEM = "system", _("system")

    class Action(models.TextChoices):
        SIGN_IN = "sign_in", _("signed in")
        SIGN_IN_REFUSED = "sign_in_refused", _("sign-in refused")
        KEY_ISSUED = "key_issued", _("key issued")
        KEY_REVOKED = "key_revoked", _("key revoked")
        KEY_SUSPENDED = "key_suspended", _("key suspended")
        KEY_RESTORED = "key_restored", _("key restored")
        KEY_EXPIRED = "key_expired", _("key expired")
        LIMITS_CHANGED = "limits_changed", _("limits changed")
        POOL_GENERATED = "pool_generated", _("pool keys generated")
        RECONCILE_RUN = "reconcile_run", _("proxy reconciled")
        TOKEN_CREATED = "token_created", _("API token created")
        TOKEN_REVOKED = "token_revoked", _("API token revoked")
        PRICES_RECOMPUTED = "prices_recomputed", _("cost recomputed")
        PERSON_DEACTIVATED = "person_deactivated", _("person deactivated")
        PERSON_REACTIVATED = "person_reactivated", _("person reactivated")
        ADMIN_LOGIN_THROTTLED = (
            "admin_login_throttled", _("admin sign-in refused (too many failures)")
        )
        TOTP_ENABLED = "totp_enabled", _("authenticator app set up")
        TOTP_DISABLED = "totp_disabled", _("authenticator app removed")
        TOTP_FAILED = "totp_failed", _("wrong authenticator code")
        PRICE_CHANGED = "price_changed", _("model price changed")
        DISPLAY_CURRENCY_CHANGED = "display_currency_changed", _("display currency changed")
        KEY_RENAMED = "key_renamed", _("key renamed")
        PROXY_SETTING_CHANGED = "proxy_setting_changed", _("proxy setting changed")
        PROXY_UPSTREAM_CHANGED = "proxy_upstream_changed", _("proxy upstream account changed")
        PROXY_AUTH_FILE_CHANGED = "proxy_auth_file_changed", _("proxy auth file changed")
        # A staff password was right but the authenticator code is still owed: not a sign-in
        # yet (SIGN_IN is written once the code is right), but worth a trace.
        PASSWORD_ACCEPTED = "password_accepted", _("password accepted, code pending")

    at = models.DateTimeField(_("when"), default=timezone.now, db_index=True)
    actor_kind = models.CharField(_("by"), max_length=8, choices=ActorKind.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("who"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    # What the actor was called at the time, kept if the person is deleted later.
    actor_label = models.CharField(_("who (at the time)"), max_length=254, blank=True)
    action = models.CharField(_("action"), max_length=32, choices=Action.choices, db_index=True)
    target_type = models.CharField(_("on"), max_length=32, blank=True)
    target_id = models.CharField(_("target id"), max_length=64, blank=True)
    # A masked key or an email address: never a secret.
    target_label = models.CharField(_("target"), max_length=254, blank=True)
    before = models.JSONField(_("before"), null=True, blank=True)
    after = models.JSONField(_("after"), null=True, blank=True)
    ip = models.GenericIPAddressField(_("IP address"), null=True, blank=True)
    detail = models.TextField(_("detail"), blank=True)

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit log")
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["target_type", "target_id"], name="audit_target")]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor_label or self.actor_kind} {self.action}"
