"""Reads on people shared by several callers."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Q

from accounts.models import User, mailbox_email, normalize_email


def person_email(*, email: str) -> str:
    """The address that names the person for `email`, existing or to be: a person stored under
    exactly this address keeps it (people who joined with a +tag before folding was turned on
    go on signing in as before), otherwise the mailbox's address (`mailbox_email`)."""
    email = normalize_email(email)
    if User.objects.filter(email=email).exists():
        return email
    return mailbox_email(email)


def mailbox_people(*, email: str) -> int:
    """How many people the mailbox of `email` holds: its own address and, with +tags folded,
    any `base+tag@` address stored before folding was on."""
    box = mailbox_email(normalize_email(email))
    if not settings.PORTAL_FOLD_PLUS_ADDRESSING:  # "+" is an ordinary character: one address
        return User.objects.filter(email=box).count()
    local, _at, domain = box.rpartition("@")
    return User.objects.filter(
        Q(email=box) | (Q(email__startswith=f"{local}+") & Q(email__endswith=f"@{domain}"))
    ).count()


def mailbox_full(*, email: str) -> bool:
    """Registering `email` would add a person to a mailbox already at its cap."""
    if User.objects.filter(email=person_email(email=email)).exists():
        return False  # registering again just signs that person in
    return mailbox_people(email=email) >= settings.PORTAL_PEOPLE_PER_MAILBOX


def person_by_email(*, email: str) -> User | None:
    return User.objects.filter(email=person_email(email=email)).first()
