"""One currency and one rounding rule everywhere (issue 17, point 4): with CNY as the display
currency, the same usage reads the same on the owner's pages, the staff pages, the admin
lists, the dashboard, the quota bars and the limit email; no dollar amount is left on them
(but in a title saying what it was converted from), and no amount has more than two places
(but the exact figure in a title)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.core import mail
from django.utils import timezone

from pool.models import ApiKey
from tests.usage.conftest import issue, served
from usage.currency import USD, Currency, remember
from usage.limits import limits_enforce
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db

CNY = Currency("CNY", Decimal("7.1"))


@pytest.fixture
def ann_key(db):
    """Ann's key: $0.4218 known (140,600 input tokens at $3 / M), one request on a model with
    no price (so the cost is a lower bound), a daily cost limit of $0.50 (84 % used)."""
    ModelPrice.objects.create(model="priced-model", input=Decimal("3"), output=Decimal("0"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    [held] = issue(1, ["ann@example.com"])
    now = timezone.now()
    served(held.key, at=now, model="priced-model", requests=1, input_tokens=140_600,
           output_tokens=0)
    served(held.key, at=now, model="mystery-model", requests=1, input_tokens=10, output_tokens=0)
    ApiKey.objects.filter(pk=held.key.pk).update(limit_cost_day=Decimal("0.50"), label="ci")
    remember(CNY)
    yield held.key
    remember(USD, seconds=0)


def visible(html: str) -> str:
    """The page without its title attributes (where the exact and the dollar figures live)."""
    return re.sub(r' title="[^"]*"', "", html)


def one_money(html: str) -> None:
    text = visible(html)
    assert not re.search(r"\$\s?\d", text), re.search(r".{60}\$\s?\d.{20}", text)
    assert "USD" not in text
    assert not re.search(r"¥[\d,]+\.\d{3}", text)


def test_the_same_amount_reads_the_same_on_every_page(client, admin_client, ann_key):
    owner = ann_key.owner
    client.force_login(owner)
    pages = {
        "my-keys": client.get("/my-keys"),
        "key": client.get(f"/my-keys/{ann_key.pk}"),
        "staff person": admin_client.get(f"/staff/people/{owner.pk}"),
        "leaderboard": admin_client.get("/staff/leaderboard?period=today"),
        "dashboard": admin_client.get("/admin/"),
    }
    for name, response in pages.items():
        assert response.status_code == 200, name
        html = response.content.decode()
        # $0.4218 known of more: ¥2.99478, a lower bound rounded down.
        assert "≥ ¥2.99<" in html, name
        one_money(html)
    # The exact figure and the dollars stay in the title, the same on the owner's page and
    # the staff's (the issue: "≥ $0.42" to staff, "≥ $0.4218" to its owner).
    title = 'title="Exactly ¥2.994780. $0.421800 at 7.1 CNY per US dollar.'
    assert title in pages["my-keys"].content.decode()
    assert title in pages["staff person"].content.decode()
    # The quota bar: used and limit in yuan too.
    assert "¥2.99 of ¥3.55" in pages["my-keys"].content.decode()


def test_admin_lists_show_the_display_currency(admin_client, ann_key):
    keys = admin_client.get("/admin/pool/apikey/").content.decode()
    people = admin_client.get("/admin/accounts/user/").content.decode()
    rows = admin_client.get("/admin/usage/usagesnapshot/").content.decode()
    for html in (keys, people):
        assert '<td class="field-cost">¥2.99</td>' in html  # the known part, to the cent
    assert '<td class="field-cost_display">¥2.99</td>' in rows
    assert "cost ¥2.99" in rows  # the selection's total above the list
    for html in (keys, people, rows):
        one_money(html)


def test_cost_limit_fields_say_dollars_and_give_the_display_amount(admin_client, ann_key):
    page = admin_client.get(f"/admin/pool/apikey/{ann_key.pk}/change/").content.decode()
    assert "Cost per day (USD)" in page
    assert "In US dollars (USD), as the relays enforce it" in page
    assert "This limit is ¥3.55 there." in page


def test_the_limit_email_uses_the_display_currency(ann_key):
    limits_enforce(now=timezone.now(), reconcile=False)
    [message] = mail.outbox
    assert "80 %" in message.subject
    assert "has used ¥2.99 of its daily cost limit of ¥3.55." in message.body
    assert "$" not in message.body and "USD" not in message.body
