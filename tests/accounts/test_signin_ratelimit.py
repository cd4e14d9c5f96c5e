"""Sign-in and registration rate limits behind a proxy, and the order they are counted in."""

from __future__ import annotations

import pytest
from django.core import mail
from django.test import RequestFactory

from keyportal.audit import audit_record, client_ip
from keyportal.models import AuditEvent
from tests.accounts.mailbox import emailed_path

pytestmark = pytest.mark.django_db
NGINX = "10.0.0.1"


@pytest.mark.parametrize("url", ["/login", "/register"])
def test_behind_a_trusted_proxy_each_client_has_its_own_budget(client, settings, url):
    settings.PORTAL_TRUSTED_PROXIES = [NGINX]
    settings.PORTAL_RATE_PER_IP = 2
    for n in range(2):
        answer = client.post(url, {"email": f"a{n}@example.com"}, REMOTE_ADDR=NGINX,
                             HTTP_X_FORWARDED_FOR="203.0.113.1")
        assert answer.status_code == 200
    refused = client.post(url, {"email": "a9@example.com"}, REMOTE_ADDR=NGINX,
                          HTTP_X_FORWARDED_FOR="203.0.113.1")
    assert refused.status_code == 429
    other = client.post(url, {"email": "b@example.com"}, REMOTE_ADDR=NGINX,
                        HTTP_X_FORWARDED_FOR="203.0.113.2")
    assert other.status_code == 200


def test_a_client_cannot_forge_its_way_past_the_limit(client, settings):
    settings.PORTAL_TRUSTED_PROXIES = [NGINX]
    settings.PORTAL_RATE_PER_IP = 1
    # nginx appends what it saw; what the client wrote before stays on the left
    client.post("/login", {"email": "a@example.com"}, REMOTE_ADDR=NGINX,
                HTTP_X_FORWARDED_FOR="1.1.1.1, 203.0.113.1")
    forged = client.post("/login", {"email": "b@example.com"}, REMOTE_ADDR=NGINX,
                         HTTP_X_FORWARDED_FOR="2.2.2.2, 203.0.113.1")
    assert forged.status_code == 429
    # and from an untrusted address the header means nothing at all
    client.post("/login", {"email": "c@example.com"}, REMOTE_ADDR="198.51.100.9",
                HTTP_X_FORWARDED_FOR="3.3.3.3")
    assert client.post("/login", {"email": "d@example.com"}, REMOTE_ADDR="198.51.100.9",
                       HTTP_X_FORWARDED_FOR="4.4.4.4").status_code == 429


def test_without_the_setting_everyone_behind_the_proxy_shares_one_budget(client, settings):
    settings.PORTAL_TRUSTED_PROXIES = []
    settings.PORTAL_RATE_PER_IP = 1
    client.post("/login", {"email": "a@example.com"}, REMOTE_ADDR=NGINX,
                HTTP_X_FORWARDED_FOR="203.0.113.1")
    assert client.post("/login", {"email": "b@example.com"}, REMOTE_ADDR=NGINX,
                       HTTP_X_FORWARDED_FOR="203.0.113.2").status_code == 429


@pytest.mark.parametrize("url", ["/login", "/register"])
def test_a_refused_address_does_not_spend_the_victims_email_budget(client, settings, ann, url):
    settings.PORTAL_RATE_PER_IP = 2
    settings.PORTAL_RATE_PER_EMAIL = 3
    attacker = "198.51.100.66"
    for _ in range(20):
        client.post(url, {"email": "ann@example.com"}, REMOTE_ADDR=attacker)
    sent_to_attacker = len(mail.outbox)
    assert sent_to_attacker == 2
    # Ann, from her own address, still has her email's budget left (3 - 2 already spent)
    mine = client.post(url, {"email": "ann@example.com"}, REMOTE_ADDR="192.0.2.10")
    assert mine.status_code == 200 and len(mail.outbox) == 3


def test_the_audit_log_records_the_forwarded_client(settings):
    settings.PORTAL_TRUSTED_PROXIES = [NGINX]
    request = RequestFactory().post("/", REMOTE_ADDR=NGINX, HTTP_X_FORWARDED_FOR="203.0.113.5")
    event = audit_record(action=AuditEvent.Action.LIMITS_CHANGED, ip=client_ip(request))
    assert AuditEvent.objects.get(pk=event.pk).ip == "203.0.113.5"


def test_a_locked_email_still_signs_in_with_the_link_already_in_its_inbox(client, settings, ann):
    settings.PORTAL_RATE_PER_IP = 100
    settings.PORTAL_RATE_PER_EMAIL = 3
    for n in range(10):  # someone asks for Ann's link over and over, from many addresses
        client.post("/login", {"email": "ann@example.com"}, REMOTE_ADDR=f"198.51.100.{n}")
    assert len(mail.outbox) == 3
    assert client.post("/login", {"email": "ann@example.com"},
                       REMOTE_ADDR="192.0.2.10").status_code == 429  # the email is locked

    # The newest link Ann has (refused requests sent none and retired none) signs her in.
    answer = client.post(emailed_path(-1), REMOTE_ADDR="192.0.2.10")

    assert answer.status_code == 303 and answer["Location"] == "/my-keys"
    assert client.get("/my-keys").status_code == 200
