"""One person per mailbox: +tags are folded into the base address (PORTAL_FOLD_PLUS_ADDRESSING),
links go to the base address, people already stored with a +tag keep theirs."""

from __future__ import annotations

import pytest
from django.core import mail

from accounts.models import SignInLink, User, mailbox_email
from accounts.selectors import person_by_email, person_email
from accounts.services import signin_link_redeem
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
Purpose = SignInLink.Purpose


def redeem(purpose: str) -> User:
    token = emailed_path().rsplit("/", 1)[-1]
    user, _link = signin_link_redeem(token=token, purpose=purpose)
    return user


@pytest.mark.parametrize(
    ("email", "folded"),
    [
        ("alice+p1@example.com", "alice@example.com"),
        ("alice+p1+p2@example.com", "alice@example.com"),
        ("alice@example.com", "alice@example.com"),
        ("+only@example.com", "+only@example.com"),
    ],
)
def test_mailbox_email_folds_the_tag(settings, email, folded):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    assert mailbox_email(email) == folded


def test_tags_register_one_person_and_links_go_to_the_base_address(client, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    people = set()
    for tag in ("p1", "p2", "p3"):
        answer = client.post("/register", {"email": f"Alice+{tag}@example.com", "label": "x"})
        assert answer.status_code == 200
        assert mail.outbox[-1].to == ["alice@example.com"]
        people.add(redeem(Purpose.REGISTER).pk)
    assert len(people) == 1
    assert list(User.objects.values_list("email", flat=True)) == ["alice@example.com"]


def test_signing_in_with_a_tag_reaches_the_base_person(client, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    alice = User.objects.create_user("alice@example.com")
    client.post("/login", {"email": "alice+laptop@example.com"})
    assert mail.outbox[-1].to == ["alice@example.com"]
    assert redeem(Purpose.LOGIN) == alice


def test_a_person_stored_with_a_tag_keeps_signing_in_with_it(client, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    old = User.objects.create_user("carol+old@example.com")
    client.post("/login", {"email": "carol+old@example.com"})
    assert mail.outbox[-1].to == ["carol+old@example.com"]
    assert redeem(Purpose.LOGIN) == old
    assert person_by_email(email="Carol+Old@example.com") == old
    # a new tag for the same mailbox does not make a third identity
    assert person_email(email="carol+new@example.com") == "carol@example.com"


def test_with_folding_off_a_tag_is_its_own_person(client, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = False
    client.post("/register", {"email": "dave+x@example.com", "label": ""})
    assert mail.outbox[-1].to == ["dave+x@example.com"]
    assert redeem(Purpose.REGISTER).email == "dave+x@example.com"


def test_the_email_rate_limit_counts_the_mailbox_not_the_tag(client, settings):
    settings.PORTAL_FOLD_PLUS_ADDRESSING = True
    settings.PORTAL_RATE_PER_EMAIL = 2
    for n in range(2):
        answer = client.post("/register", {"email": f"eve+{n}@example.com"},
                             REMOTE_ADDR=f"192.0.2.{n}")
        assert answer.status_code == 200
    refused = client.post("/register", {"email": "eve+9@example.com"}, REMOTE_ADDR="192.0.2.9")
    assert refused.status_code == 429
    assert len(mail.outbox) == 2


def test_a_mailbox_at_its_cap_gets_no_new_person(client, settings):
    """People stored with a +tag before folding was on count against their mailbox's cap."""
    settings.PORTAL_PEOPLE_PER_MAILBOX = 2
    User.objects.create_user("ann+p1@example.com")
    User.objects.create_user("ann+p2@example.com")

    answer = client.post("/register", {"email": "ann+p3@example.com", "name": "Ann",
                                       "label": "laptop"})

    assert answer.status_code == 200  # the page says the same as always
    assert mail.outbox[-1].to == ["ann@example.com"]
    assert "already has 2 accounts" in mail.outbox[-1].body
    assert "/login" in mail.outbox[-1].body and "/register/" not in mail.outbox[-1].body
    assert User.objects.count() == 2


def test_a_link_sent_before_the_mailbox_filled_makes_no_person(client, settings):
    settings.PORTAL_PEOPLE_PER_MAILBOX = 1
    client.post("/register", {"email": "bob@example.com", "name": "Bob", "label": "x"})
    link = emailed_path()
    User.objects.create_user("bob+old@example.com")  # e.g. staff added one meanwhile

    answer = client.post(link)

    assert b"no longer works" in answer.content
    assert not User.objects.filter(email="bob@example.com").exists()


def test_below_the_cap_and_for_existing_people_registration_works(client, settings):
    from pool.models import ApiKey
    from pool.services import pool_keys_create

    settings.PORTAL_PEOPLE_PER_MAILBOX = 1
    pool_keys_create(count=2)
    ApiKey.objects.update(proxy_state=ApiKey.ProxyState.PUSHED)
    client.post("/register", {"email": "cy@example.com", "name": "Cy", "label": "x"})
    assert "/register/" in mail.outbox[-1].body
    client.post(emailed_path())
    assert User.objects.filter(email="cy@example.com").exists()
    client.post("/register", {"email": "cy+ci@example.com", "name": "Cy", "label": "y"})
    assert "/register/" in mail.outbox[-1].body  # the same person: a link, no refusal
