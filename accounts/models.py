"""Who people are. The identity is a normalised email address; staff also have a password."""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django_otp.plugins.otp_totp.models import TOTPDevice


def normalize_email(raw: str) -> str:
    """The one form an address is stored and looked up in: trimmed and lower-cased.

    Mail servers treat the local part case-insensitively in practice, and two accounts for
    Ann@x.com and ann@x.com would be a support ticket, not a feature."""
    return raw.strip().lower()


def mailbox_email(email: str) -> str:
    """The mailbox a normalised address delivers to: with PORTAL_FOLD_PLUS_ADDRESSING on,
    `ann+ci@x.com` is `ann@x.com`, so one mailbox cannot register as many people by
    inventing tags. Off: the address as it is (for mail servers where `+` is an ordinary
    character and `ann+ci` is somebody else)."""
    if not settings.PORTAL_FOLD_PLUS_ADDRESSING:
        return email
    local, at, domain = email.rpartition("@")
    base = local.split("+", 1)[0]
    if not at or not base:  # "+tag@x.com": nothing to fold into
        return email
    return f"{base}@{domain}"


class Limits(models.Model):
    """Usage limits: tokens and cost per day and per month, each optional (empty: no limit).
    People, keys and the defaults for new people all carry them; day and month follow the
    portal's TIME_ZONE."""

    limit_tokens_day = models.PositiveBigIntegerField(
        _("tokens per day"), null=True, blank=True
    )
    limit_tokens_month = models.PositiveBigIntegerField(
        _("tokens per month"), null=True, blank=True
    )
    limit_cost_day = models.DecimalField(
        _("cost per day (USD)"), max_digits=12, decimal_places=2, null=True, blank=True,
        validators=[MinValueValidator(0)],
    )
    limit_cost_month = models.DecimalField(
        _("cost per month (USD)"), max_digits=12, decimal_places=2, null=True, blank=True,
        validators=[MinValueValidator(0)],
    )

    LIMIT_FIELDS = ("limit_tokens_day", "limit_tokens_month", "limit_cost_day", "limit_cost_month")

    class Meta:
        abstract = True

    def limits(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.LIMIT_FIELDS}

    @property
    def has_limits(self) -> bool:
        return any(v is not None for v in self.limits().values())


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        if not email or not email.strip():
            raise ValueError("An email address is required.")
        extra = {**LimitDefaults.for_new_person(), **extra}
        user = self.model(email=normalize_email(email), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()  # people sign in by emailed link
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.update(is_staff=True, is_superuser=True)
        return self.create_user(email, password, **extra)

    def get_by_natural_key(self, username: str | None) -> User:
        return self.get(email=normalize_email(username or ""))


class User(AbstractBaseUser, PermissionsMixin, Limits):
    email = models.EmailField(_("email address"), unique=True)
    name = models.CharField(_("name"), max_length=150, blank=True)
    is_active = models.BooleanField(_("active"), default=True)
    is_staff = models.BooleanField(
        _("staff"), default=False, help_text=_("Can sign in to the admin with a password.")
    )
    date_joined = models.DateTimeField(_("joined"), default=timezone.now)
    language = models.CharField(
        _("language"), max_length=16, blank=True, choices=settings.LANGUAGES,
        help_text=_("The portal's emails to this person (limit warnings, notices) are written "
                    "in it. Set by the language switch; empty: the portal's default."),
    )

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    class Meta:
        verbose_name = _("person")
        verbose_name_plural = _("people")
        ordering = ["email"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(email=Lower("email")), name="user_email_is_normalised"
            ),
        ]

    def __str__(self) -> str:
        return self.email

    @property
    def email_language(self) -> str:
        """The language to write to this person in, when no request tells it."""
        return self.language or settings.LANGUAGE_CODE

    def clean(self) -> None:
        super().clean()
        self.email = normalize_email(self.email)

    def get_full_name(self) -> str:
        return self.name or self.email

    def get_short_name(self) -> str:
        return self.name or self.email.split("@", 1)[0]


def token_digest(raw: str) -> str:
    """SHA-256 of a sign-in link's token or an API token: all the database ever holds."""
    return hashlib.sha256(raw.encode()).hexdigest()


class SignInLink(models.Model):
    """A one-time emailed link. Only the token's hash is stored; the link works once, until
    `expires_at`. A registration link also carries what the form asked for (name, label)."""

    class Purpose(models.TextChoices):
        LOGIN = "login", _("sign in")
        REGISTER = "register", _("registration")

    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    email = models.EmailField(_("email address"))
    purpose = models.CharField(_("purpose"), max_length=16, choices=Purpose.choices)
    name = models.CharField(_("name"), max_length=150, blank=True)
    label = models.CharField(_("label"), max_length=100, blank=True)
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    expires_at = models.DateTimeField(_("expires"))
    used_at = models.DateTimeField(_("used"), null=True, blank=True)

    class Meta:
        verbose_name = _("sign-in link")
        verbose_name_plural = _("sign-in links")
        indexes = [models.Index(fields=["expires_at"], name="signinlink_expires")]

    def __str__(self) -> str:
        return f"{self.get_purpose_display()} {self.email}"

    @property
    def usable(self) -> bool:
        return self.used_at is None and self.expires_at > timezone.now()


class ApiToken(models.Model):
    """A staff API token for automation (`Authorization: Bearer <token>`). It acts as its
    staff `user`; only a hash and the last 4 characters are kept, so a lost token is revoked
    and replaced, never shown again."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("acts as"),
        on_delete=models.CASCADE,
        related_name="api_tokens",
        limit_choices_to={"is_staff": True, "is_active": True},
    )
    name = models.CharField(_("name"), max_length=100, help_text=_("What the token is for."))
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    last4 = models.CharField(_("last 4"), max_length=4, editable=False)
    created_at = models.DateTimeField(_("created"), default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True, editable=False)

    class Meta:
        verbose_name = _("API token")
        verbose_name_plural = _("API tokens")
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.masked})"

    @property
    def masked(self) -> str:
        return f"…{self.last4}"

    def set_token(self, raw: str) -> None:
        self.token_hash = token_digest(raw)
        self.last4 = raw[-4:]


class LimitDefaults(Limits):
    """What new people start with, set by staff in the admin (one row)."""

    key_valid_days = models.PositiveIntegerField(
        _("new keys expire after (days)"), null=True, blank=True,
        help_text=_("Empty: new keys do not expire."),
    )
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("limits for new people")
        verbose_name_plural = _("limits for new people")
        constraints = [
            models.CheckConstraint(condition=models.Q(id=1), name="limitdefaults_single_row")
        ]

    def __str__(self) -> str:
        return str(_("Limits for new people"))

    @classmethod
    def current(cls) -> LimitDefaults:
        return cls.objects.get_or_create(id=1)[0]

    @classmethod
    def for_new_person(cls) -> dict[str, Any]:
        defaults = cls.objects.filter(id=1).first()
        return defaults.limits() if defaults else {}


class Authenticator(TOTPDevice):
    """A staff member's authenticator app (django-otp's TOTP device), under the portal's own
    name and app in the admin (accounts/totp.py does the work)."""

    class Meta:
        proxy = True
        verbose_name = _("authenticator app")
        verbose_name_plural = _("authenticator apps")
