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


class Upstream(models.Model):
    """A relay the portal hands out keys for: the CLIProxyAPI, claude-relay-service or Claude
    Code Hub a team runs. Staff add them in the admin; the environment can declare one of
    each kind (CLIPROXY_*, CRS_*, CCH_*), kept here as a row whose address and credentials
    are read from the environment each time (`from_environment`), never stored.

    A portal has at most one CLIProxyAPI: its keys are the pool's, and keys with no upstream
    are its keys (every key made before upstreams existed). Each claude-relay-service and
    Claude Code Hub key names its upstream."""

    class Kind(models.TextChoices):
        CLIPROXYAPI = "cliproxyapi", "CLIProxyAPI"
        CRS = "crs", "claude-relay-service"
        CCH = "cch", "Claude Code Hub"

    name = models.CharField(_("name"), max_length=60, unique=True)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    management_url = models.URLField(
        _("management URL"), help_text=_("Where the portal reaches its admin API, e.g. "
                                         "http://127.0.0.1:3000.")
    )
    public_url = models.URLField(
        _("public URL"), blank=True,
        help_text=_("The address people's tools use; empty: the management URL."),
    )
    username = models.CharField(
        _("admin username"), max_length=150, blank=True,
        help_text=_("claude-relay-service only: the admin account the portal signs in with."),
    )
    # The management key (CLIProxyAPI), the admin password (claude-relay-service) or the
    # admin token (Claude Code Hub), sealed in the database like pool keys.
    secret = SealedValueField(_("secret"), null=True, blank=True)
    open_to_everyone = models.BooleanField(
        _("open to everyone"), default=True,
        help_text=_("People can add keys here. Off: only the people listed below can."),
    )
    open_to = models.ManyToManyField(
        settings.AUTH_USER_MODEL, verbose_name=_("open to"), blank=True,
        related_name="upstreams_opened",
    )
    enabled = models.BooleanField(
        _("enabled"), default=True,
        help_text=_("Off: no new keys here and no usage read; existing keys stay as they are."),
    )
    from_environment = models.BooleanField(_("from the environment"), default=False,
                                           editable=False)
    # What the usage reader remembers between syncs (cursors per key), written in the same
    # transaction as the usage it read: see usage.services.relay_usage_sync.
    usage_cursor = models.JSONField(default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        verbose_name = _("upstream")
        verbose_name_plural = _("upstreams")
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=Q(kind="cliproxyapi"),
                name="upstream_one_cliproxyapi",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_cliproxyapi(self) -> bool:
        return self.kind == self.Kind.CLIPROXYAPI


class UpstreamAccount(models.Model):
    """A person's own account at an upstream that has people (a Claude Code Hub user),
    created with their first key there."""

    upstream = models.ForeignKey(Upstream, on_delete=models.CASCADE, related_name="accounts")
    person = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                               related_name="upstream_accounts")
    remote_id = models.CharField(_("id at the upstream"), max_length=64)
    # The limits last pushed to the upstream for this person (see pool.upstreams.relays).
    pushed = models.JSONField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = _("upstream account")
        verbose_name_plural = _("upstream accounts")
        constraints = [
            models.UniqueConstraint(fields=["upstream", "person"],
                                    name="upstreamaccount_one_per_person"),
        ]


# The CLIProxyAPI's keys (the pool's): no upstream (made before upstreams existed, or the
# environment's proxy without a row yet) or the CLIProxyAPI row.
ON_CLIPROXYAPI = Q(upstream__isnull=True) | Q(upstream__kind="cliproxyapi")


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
    # Empty: the CLIProxyAPI's (the pool's) key. Keys of other upstreams are made there when
    # they are issued (pool.upstreams), never pooled.
    upstream = models.ForeignKey(
        Upstream, verbose_name=_("upstream"), on_delete=models.PROTECT, null=True, blank=True,
        related_name="keys",
    )
    # The key's id at its upstream (a claude-relay-service key's UUID, a Claude Code Hub key's
    # number); empty for CLIProxyAPI keys, which the proxy knows by value.
    remote_id = models.CharField(_("id at the upstream"), max_length=64, blank=True,
                                 editable=False)
    # What was last pushed to the upstream for this key (on/off and limits): reconcile pushes
    # again only what differs (pool.upstreams.relays).
    pushed = models.JSONField(null=True, blank=True, editable=False)
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
