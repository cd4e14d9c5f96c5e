"""The keys people use at the proxy, from the pool they are generated into to revocation."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from accounts.models import Limits
from pool.fields import SealedValueField


def key_digest(value: str) -> str:
    """SHA-256 of a key's full value: what the portal keeps once the key is handed out, and
    how usage the proxy reports (with plaintext keys) is matched to keys."""
    return hashlib.sha256(value.encode()).hexdigest()


class ApiKey(Limits):
    class Status(models.TextChoices):
        POOL = "pool", _("in the pool")
        ACTIVE = "active", _("active")
        SUSPENDED = "suspended", _("suspended")
        EXPIRED = "expired", _("expired")
        REVOKED = "revoked", _("revoked")

    class ProxyState(models.TextChoices):
        UNPUSHED = "unpushed", _("not yet at the proxy")
        PUSHED = "pushed", _("at the proxy")
        REMOVAL_PENDING = "removal_pending", _("removal pending")
        REMOVED = "removed", _("removed from the proxy")
        MISSING = "missing", _("missing at the proxy")

    class SuspendedFor(models.TextChoices):
        KEY_TOKENS_DAY = "key_tokens_day", _("this key's daily token limit")
        KEY_TOKENS_MONTH = "key_tokens_month", _("this key's monthly token limit")
        KEY_COST_DAY = "key_cost_day", _("this key's daily cost limit")
        KEY_COST_MONTH = "key_cost_month", _("this key's monthly cost limit")
        PERSON_TOKENS_DAY = "person_tokens_day", _("your daily token limit")
        PERSON_TOKENS_MONTH = "person_tokens_month", _("your monthly token limit")
        PERSON_COST_DAY = "person_cost_day", _("your daily cost limit")
        PERSON_COST_MONTH = "person_cost_month", _("your monthly cost limit")
        STAFF = "staff", _("staff")
        # Every key of a person whose account is deactivated (is_active off); they come back
        # when the person is active again (pool.services.person_set_active, keys_lifecycle).
        PERSON_INACTIVE = "person_inactive", _("your account is deactivated")

    # The statuses whose keys belong in the proxy's list; every other key must be absent.
    WANTED_AT_PROXY = (Status.POOL, Status.ACTIVE)
    # Keys that may come back on their own (a limit window resets, staff extend an expiry).
    RETURNABLE = (Status.SUSPENDED, Status.EXPIRED)

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("owner"),
        on_delete=models.PROTECT,  # keys carry usage history: revoke them, never lose them
        null=True,
        blank=True,
        related_name="api_keys",
    )
    label = models.CharField(_("label"), max_length=100, blank=True)
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.POOL
    )
    proxy_state = models.CharField(
        _("at the proxy"), max_length=16, choices=ProxyState.choices, default=ProxyState.UNPUSHED
    )
    # The full key exists only while the key sits unissued in the pool; issuing clears it. It
    # is sealed in the database (pool.fields), so a backup reveals no key handed out later.
    value = SealedValueField(null=True, blank=True, editable=False)
    key_hash = models.CharField(_("SHA-256"), max_length=64, unique=True, editable=False)
    prefix = models.CharField(_("prefix"), max_length=32, editable=False)
    last4 = models.CharField(_("last 4"), max_length=4, editable=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    issued_at = models.DateTimeField(_("issued"), null=True, blank=True)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)
    expires_at = models.DateTimeField(
        _("expires"), null=True, blank=True, help_text=_("Empty: the key does not expire.")
    )
    expiry_notified_at = models.DateTimeField(null=True, blank=True, editable=False)
    suspended_for = models.CharField(
        _("suspended for"), max_length=24, choices=SuspendedFor.choices, blank=True
    )
    suspended_until = models.DateTimeField(
        _("suspended until"), null=True, blank=True,
        help_text=_("When the limit's window resets and the key comes back on its own."),
    )
    # While a key is suspended or expired it is off the proxy; to bring it back the portal
    # needs its value, which it keeps only as a hash. Reconcile reads the value from the
    # proxy's own list as it removes the key and keeps it here encrypted (pool/escrow.py,
    # a key that is not in the database) until the key returns or is revoked.
    escrow = models.TextField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "proxy_state"], name="apikey_status_proxy")]
        constraints = [
            models.CheckConstraint(
                condition=~Q(status="pool") | (Q(owner__isnull=True) & Q(value__isnull=False)),
                name="apikey_pool_keys_are_unowned_and_whole",
            ),
            models.CheckConstraint(
                condition=Q(value__isnull=True) | Q(status="pool"),
                name="apikey_only_pool_keys_keep_their_value",
            ),
            models.CheckConstraint(
                condition=~Q(status__in=["active", "suspended", "expired"])
                | Q(owner__isnull=False),
                name="apikey_issued_keys_have_an_owner",
            ),
            models.CheckConstraint(
                # Kept while off the proxy, and while a restored key waits to be pushed back.
                condition=Q(escrow__isnull=True) | Q(status__in=["active", "suspended", "expired"]),
                name="apikey_escrow_only_for_issued_keys",
            ),
        ]

    def __str__(self) -> str:
        return self.masked

    @property
    def masked(self) -> str:
        """The only form a key is ever shown in after it is issued, to anyone."""
        return f"{self.prefix}…{self.last4}"

    @property
    def wanted_at_proxy(self) -> bool:
        return self.status in self.WANTED_AT_PROXY
