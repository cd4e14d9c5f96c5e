"""Reads on people shared by several callers."""

from __future__ import annotations

from accounts.models import User, mailbox_email, normalize_email


def person_email(*, email: str) -> str:
    """The address that names the person for `email`, existing or to be: a person stored under
    exactly this address keeps it (people who joined with a +tag before folding was turned on
    go on signing in as before), otherwise the mailbox's address (`mailbox_email`)."""
    email = normalize_email(email)
    if User.objects.filter(email=email).exists():
        return email
    return mailbox_email(email)


def person_by_email(*, email: str) -> User | None:
    return User.objects.filter(email=person_email(email=email)).first()
