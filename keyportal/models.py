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


# --- team chat notifications (issue 17, point 6) ----------------------------------------------
# Imported from pool: the same sealing as pool keys and upstream secrets (pool/escrow.py, a
# leaf module that imports no model), so a copy of the database alone reveals no webhook.
from pool.fields import SealedValueField  # noqa: E402


class Webhook(models.Model):
    """Where alerts go besides email: a team chat robot or a JSON endpoint. Staff webhooks
    (no owner) take staff alerts; a person's own webhook takes their limit notices.

    `url` and `secret` are secrets: a chat robot's URL alone lets anyone post into the team's
    chat. They are sealed in the database, never shown back (the admin form is write-only),
    and lists show `host` only."""

    class Kind(models.TextChoices):
        DINGTALK = "dingtalk", _("DingTalk robot")
        FEISHU = "feishu", _("Feishu / Lark bot")
        WECOM = "wecom", _("WeCom group robot")
        SLACK = "slack", _("Slack incoming webhook")
        JSON = "json", _("Generic JSON")

    name = models.CharField(_("name"), max_length=100)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    url = SealedValueField(_("webhook URL"))
    secret = SealedValueField(_("signing secret"), blank=True, default="")
    # The URL's host, kept apart so that lists never open (or show) the sealed URL.
    host = models.CharField(_("host"), max_length=255, editable=False)
    enabled = models.BooleanField(_("enabled"), default=True)
    # Staff alert names (keyportal.notify.STAFF_EVENTS) this webhook takes; empty: all.
    events = models.JSONField(_("events"), default=list, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("person"), null=True, blank=True,
        on_delete=models.CASCADE, related_name="webhooks",
        help_text=_("Empty for a staff webhook; a person's own webhook takes their limit notices."),
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    class Meta:
        verbose_name = _("webhook")
        verbose_name_plural = _("webhooks")
        ordering = ["name", "pk"]
        constraints = [
            # A person has at most one webhook (their page edits it in place).
            models.UniqueConstraint(fields=["owner"], name="webhook_one_per_person",
                                    condition=models.Q(owner__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.host})"


class Delivery(models.Model):
    """The outbox: one row per webhook and alert, written where the alert is raised and sent
    by a worker outside the caller's path (keyportal.notify). A row with no webhook is for
    PORTAL_STAFF_WEBHOOK_URL, which stays in the environment and is never stored."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        SENDING = "sending", _("sending")
        SENT = "sent", _("sent")
        FAILED = "failed", _("failed")

    webhook = models.ForeignKey(Webhook, verbose_name=_("webhook"), null=True, blank=True,
                                on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(_("event"), max_length=64)
    subject = models.CharField(_("subject"), max_length=255)
    body = models.TextField(_("text"))
    data = models.JSONField(_("data"), default=dict, blank=True)  # never a secret
    status = models.CharField(_("status"), max_length=8, choices=Status.choices,
                              default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(_("attempts"), default=0)
    next_try_at = models.DateTimeField(_("next try"), default=timezone.now)
    # While SENDING: when the claim lapses (a worker killed mid-send frees its rows).
    claimed_until = models.DateTimeField(null=True, blank=True)
    # In words, without the URL or the secret ("connection refused", "HTTP 500", ...).
    last_error = models.CharField(_("last error"), max_length=300, blank=True)
    tried_at = models.DateTimeField(_("last try"), null=True, blank=True)
    created_at = models.DateTimeField(_("created"), default=timezone.now, db_index=True)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)

    class Meta:
        verbose_name = _("delivery")
        verbose_name_plural = _("deliveries")
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["status", "next_try_at"], name="delivery_due")]

    def __str__(self) -> str:
        return f"{self.event} #{self.pk}"
