from __future__ import annotations

from django import forms
from django.conf import settings
from django.utils.translation import gettext_lazy as _

from accounts.models import User, normalize_email

# What the users table can hold (254, RFC 5321's path limit); Django's form field would allow
# 320, and PostgreSQL would then refuse the row with an error instead of a message.
EMAIL_MAX_LENGTH: int = User._meta.get_field("email").max_length or 254


def email_domain_allowed(email: str) -> bool:
    allowed = settings.PORTAL_ALLOWED_EMAIL_DOMAINS
    return not allowed or email.rsplit("@", 1)[-1] in allowed


class EmailField(forms.EmailField):
    """An address in its stored form, at a domain the portal accepts."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("max_length", EMAIL_MAX_LENGTH)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def clean(self, value: str | None) -> str:
        email = normalize_email(super().clean(value) or "")
        if email and not email_domain_allowed(email):
            raise forms.ValidationError(
                _("Only addresses at %(domains)s can use this portal.")
                % {"domains": ", ".join(settings.PORTAL_ALLOWED_EMAIL_DOMAINS)},
                code="domain",
            )
        return email


class LoginForm(forms.Form):
    email = EmailField(
        label=_("Email address"),
        widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True}),
    )


class RegisterForm(forms.Form):
    email = EmailField(
        label=_("Email address"),
        widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True}),
    )
    name = forms.CharField(
        label=_("Your name"),
        max_length=150,
        required=False,
        widget=forms.TextInput(attrs={"autocomplete": "name"}),
    )
    label = forms.CharField(
        label=_("Key label"),
        max_length=100,
        required=False,
        help_text=_("Where you will use the key, e.g. “laptop” or “CI”."),
    )


class LdapLoginForm(forms.Form):
    """The company-account (LDAP / Active Directory) sign-in on /login."""

    # Prefixed: the page also holds the emailed-link form, whose field ids must not collide.
    prefix = "ldap"
    username = forms.CharField(
        label=_("Username"), max_length=256, strip=True,
        widget=forms.TextInput(attrs={"autocomplete": "username"}),
    )
    password = forms.CharField(
        label=_("Password"), max_length=1024, strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )
