"""Writes on people: one-time sign-in links and staff API tokens."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.forms import email_domain_allowed
from accounts.models import ApiToken, SignInLink, User, normalize_email, token_digest
from accounts.selectors import mailbox_full, person_by_email, person_email
from keyportal.audit import Action, audit_record

Purpose = SignInLink.Purpose
API_TOKEN_PREFIX = "kpt_"
# An API token's last use is written at most this often: a busy script costs no write per call.
API_TOKEN_TOUCH_SECONDS = 60


class LinkInvalid(Exception):
    """The link is unknown, expired, already used, or its person may not sign in."""


def _link_new(*, email: str, purpose: str, name: str = "", label: str = "") -> str:
    raw = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        # Housekeeping: links a day past their expiry are of no use to anyone.
        SignInLink.objects.filter(expires_at__lt=now - timedelta(days=1)).delete()
        # Only the newest link works: one forwarded, left in an old mail or logged somewhere
        # stops working when the person asks for another.
        _links_retire(email=email, purpose=purpose)
        SignInLink.objects.create(
            token_hash=token_digest(raw),
            email=email,
            purpose=purpose,
            name=name,
            label=label,
            created_at=now,
            expires_at=now + timedelta(minutes=settings.PORTAL_LINK_MINUTES),
        )
    return raw


def _links_retire(*, email: str, purpose: str) -> int:
    """Deletes the person's unused links for `purpose`: a retired link is as unknown as a
    made-up one. Used links stay until housekeeping (they no longer work anyway)."""
    return SignInLink.objects.filter(email=email, purpose=purpose, used_at__isnull=True).delete()[0]


def signin_link_send(
    *,
    email: str,
    purpose: str,
    link_url: Callable[[str, str], str],
    register_url: str,
    login_url: str = "",
    name: str = "",
    label: str = "",
) -> None:
    """Emails a one-time link to `email`; `link_url(purpose, token)` makes it absolute, and
    `register_url` is the absolute address of the registration page.

    The caller answers the same whatever happens here. A sign-in asked for an address with
    no (active) account gets a note pointing at registration instead of a link, so the
    inbox's owner learns what the page must not say.

    The message goes to the address of the person it is for (`person_email`): with +tags
    folded, `ann+ci@x.com` asks for `ann@x.com`'s link, and only that mailbox may receive it
    (where `+` is not a tag, `ann+ci` is someone else's mailbox)."""
    asked = email
    email = person_email(email=email)
    minutes = settings.PORTAL_LINK_MINUTES
    if purpose == Purpose.LOGIN and not User.objects.filter(email=email, is_active=True).exists():
        template, subject, context = (
            "accounts/email/no_account.txt",
            _("Key Portal: no account for this address"),
            {"register_url": register_url},
        )
    elif purpose == Purpose.REGISTER and mailbox_full(email=asked):
        template, subject, context = (
            "accounts/email/mailbox_full.txt",
            _("Key Portal: this mailbox already has an account"),
            {"login_url": login_url, "limit": settings.PORTAL_PEOPLE_PER_MAILBOX},
        )
    else:
        token = _link_new(email=email, purpose=purpose, name=name, label=label)
        template = f"accounts/email/{purpose}_link.txt"
        subject = (
            _("Key Portal: your sign-in link")
            if purpose == Purpose.LOGIN
            else _("Key Portal: confirm your registration")
        )
        context = {"url": link_url(purpose, token), "minutes": minutes}
    send_mail(subject, render_to_string(template, context), None, [email])


def person_language_set(*, user: User, language: str) -> bool:
    """Remembers the language `user` reads the portal in, so that emails sent later without a
    request (limit warnings, expiry notices) are written in it. False for an unknown code."""
    if language not in dict(settings.LANGUAGES):
        return False
    if user.language != language:
        User.objects.filter(pk=user.pk).update(language=language)
        user.language = language
    return True


def signin_link_peek(*, token: str, purpose: str) -> SignInLink | None:
    """The usable link for `token`, without using it (e-mail scanners fetch links too)."""
    link = SignInLink.objects.filter(token_hash=token_digest(token), purpose=purpose).first()
    return link if link is not None and link.usable else None


def person_get_or_create(*, email: str, name: str = "") -> User:
    """The person with this address, created (with the staff's defaults for new people) when
    there is none; safe when two requests create the same person at the same moment. A +tag
    is folded into its mailbox's person (`person_email`)."""
    email = person_email(email=email)
    user = User.objects.filter(email=email).first()
    if user is not None:
        return user
    try:
        with transaction.atomic():
            return User.objects.create_user(email, name=name)
    except IntegrityError:  # created by a concurrent request a moment ago
        return User.objects.get(email=email)


def signin_link_redeem(
    *, token: str, purpose: str, ip: str | None = None
) -> tuple[User, SignInLink]:
    """Uses the link once and returns its person (created by a registration link).

    The conditional UPDATE is the "once": of two requests racing with one link, exactly one
    changes the row. Raised errors roll the use back, so nothing is half done."""
    now = timezone.now()
    digest = token_digest(token)
    with transaction.atomic():
        used = SignInLink.objects.filter(
            token_hash=digest, purpose=purpose, used_at__isnull=True, expires_at__gt=now
        ).update(used_at=now)
        if used != 1:
            raise LinkInvalid
        link = SignInLink.objects.get(token_hash=digest)
        _links_retire(email=link.email, purpose=purpose)
        if purpose == Purpose.REGISTER:
            if mailbox_full(email=link.email):  # filled since this link was sent
                raise LinkInvalid
            user = person_get_or_create(email=link.email, name=link.name)
        else:
            user = User.objects.filter(email=link.email).first()
        if user is None or not user.is_active:
            raise LinkInvalid
        if link.name and not user.name:
            user.name = link.name
            user.save(update_fields=["name"])
        audit_record(action=Action.SIGN_IN, actor=user, target=user, ip=ip,
                     detail=f"{link.purpose} link", after={"method": "link"})
    return user, link


# --- Sign-in through an identity provider (accounts/oidc.py) ---------------------------------


class SignInRefused(Exception):
    """The provider vouched for someone the portal will not sign in; `message` says why, in
    words for the person (nothing was created)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def provider_signin_refused(
    *, provider: str, email: str, reason: str, ip: str | None = None, user: User | None = None
) -> None:
    """Audits a refused provider sign-in (its own row: nothing else is written)."""
    audit_record(action=Action.SIGN_IN_REFUSED, actor=None, target=user,
                 target_label=email or provider, ip=ip, detail=f"{provider}: {reason}",
                 after={"method": "provider", "provider": provider})


def person_for_provider(
    *,
    provider: str,
    provider_name: str,
    uid: str,
    email: str,
    email_verified: object,
    name: str = "",
    claims: dict | None = None,
    method: str,
    ip: str | None = None,
) -> User:
    """The person an identity provider vouched for, created on their first sign-in.

    The identity is the provider's email, and only when the provider says it verified it
    (`email_verified` true): an unverified address could be anyone's, and the address is what
    the portal's people are. It is folded like an emailed link's (case, +tags), the domain
    allow-list applies, and a new person starts with the staff's defaults, as by registration.
    A deactivated person stays out. The person's link to the provider account (allauth's
    SocialAccount, by `provider` and the provider's subject `uid`) is written or moved to
    them: the email decides who it is, so a subject whose address changed at the provider
    follows its address. Refusals are audited and raise SignInRefused; nothing is created."""
    from allauth.socialaccount.models import SocialAccount

    def refuse(message: str, reason: str, user: User | None = None) -> SignInRefused:
        provider_signin_refused(provider=provider, email=email, reason=reason, ip=ip, user=user)
        return SignInRefused(message)

    email = normalize_email(email)
    # Providers send a JSON boolean; some older ones the string "true".
    if not email or email_verified not in (True, "true", "True"):
        message = (
            _("%(provider)s did not confirm that this email address is yours, so the portal "
              "cannot sign you in with it. Ask your administrator to verify your address "
              "there, or sign in with an emailed link.")
            if settings.PORTAL_EMAIL_LINK_SIGNIN else  # no link to offer instead
            _("%(provider)s did not confirm that this email address is yours, so the portal "
              "cannot sign you in with it. Ask your administrator to verify your address "
              "there.")
        )
        raise refuse(message % {"provider": provider_name}, "email missing or not verified")
    if not email_domain_allowed(email):
        raise refuse(
            _("Only addresses at %(domains)s can use this portal.")
            % {"domains": ", ".join(settings.PORTAL_ALLOWED_EMAIL_DOMAINS)},
            "domain not allowed",
        )
    existing = person_by_email(email=email)
    if existing is not None and not existing.is_active:
        raise refuse(_("This account is deactivated. Ask your administrator."),
                     "person deactivated", user=existing)
    if existing is None and mailbox_full(email=email):
        raise refuse(
            _("This mailbox already has an account. Sign in with an emailed link.")
            if settings.PORTAL_EMAIL_LINK_SIGNIN else
            _("This mailbox already has an account. Ask your administrator."),
            "mailbox already has an account",
        )
    with transaction.atomic():
        user = existing or person_get_or_create(email=email, name=name[:150])
        SocialAccount.objects.update_or_create(
            provider=provider, uid=uid[:191],
            defaults={"user": user, "extra_data": claims or {}, "last_login": timezone.now()},
        )
        audit_record(action=Action.SIGN_IN, actor=user, target=user, ip=ip,
                     detail=f"{method}: {provider_name}",
                     after={"method": method, "provider": provider})
    return user


# --- API tokens -----------------------------------------------------------------------------


def api_token_new() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def api_token_authenticate(*, raw: str) -> ApiToken | None:
    """The live token for `raw` (not revoked, its staff person active), or None."""
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=token_digest(raw), revoked_at__isnull=True)
        .first()
    )
    if token is None or not (token.user.is_active and token.user.is_staff):
        return None
    now = timezone.now()
    if token.last_used_at is None or token.last_used_at < now - timedelta(
        seconds=API_TOKEN_TOUCH_SECONDS
    ):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def api_tokens_revoke(*, ids: list[int], by: User | None = None, ip: str | None = None) -> int:
    with transaction.atomic():
        live = list(ApiToken.objects.select_for_update().filter(pk__in=ids, revoked_at__isnull=True))
        ApiToken.objects.filter(pk__in=[t.pk for t in live]).update(revoked_at=timezone.now())
        for token in live:
            audit_record(action=Action.TOKEN_REVOKED, actor=by, target=token, ip=ip)
        return len(live)
