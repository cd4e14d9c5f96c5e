"""The display currency: staff set it (audited) and the {% cost %} tag shows costs in it with
its symbol, while storage and sums stay in USD. The CSV side is in test_export_presets.py."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.template import Context, Template

from keyportal.models import AuditEvent
from usage import currency as currency_module
from usage.currency import USD, Currency, display_currency, money, money_exact, remember
from usage.models import DisplayCurrency
from usage.selectors import Totals

pytestmark = pytest.mark.django_db


def shown(totals: Totals) -> str:
    return Template("{% load usage_tags %}{% cost totals %}").render(Context({"totals": totals}))


def test_usd_is_the_default_rounded_to_the_cent_with_the_exact_figure_in_a_title():
    assert shown(Totals(3, 100, Decimal("2.5"), 0)) == "$2.50"  # whole: no title
    assert shown(Totals(3, 100, Decimal("12.3456"), 0)) == \
        '<span class="cost-exact" title="Exactly $12.345600.">$12.35</span>'
    assert shown(Totals(3, 100, Decimal("0.01234"), 0)).endswith(">$0.01</span>")
    assert shown(Totals(3, 100, Decimal("0.004"), 0)).endswith(">&lt; $0.01</span>")
    assert shown(Totals(3, 100, Decimal(0), 0)) == "$0.00"


def test_one_rounding_rule_two_places_half_up_and_lower_bounds_down():
    cny = Currency("CNY", Decimal("7.1"))
    assert [money(Decimal(v), currency=USD) for v in ("0.4218", "0.425", "1234.5", "0.0049")] \
        == ["$0.42", "$0.43", "$1,234.50", "< $0.01"]
    assert money(Decimal("0.4218"), currency=cny) == "¥2.99"  # converted, then rounded
    # A lower bound ("≥") never rounds up past what is known.
    assert money(Decimal("0.4258"), currency=USD, lower_bound=True) == "$0.42"
    assert money(Decimal("0.006"), currency=USD, lower_bound=True) == "$0.00"
    assert money_exact(Decimal("0.4218"), currency=USD) == "$0.421800"
    assert money_exact(Decimal("0.42"), currency=USD) is None


def test_cny_shows_yuan_with_the_dollars_in_a_title():
    remember(Currency("CNY", Decimal("7.1")))
    html = shown(Totals(3, 100, Decimal("2"), 0))
    assert ">¥14.20<" in html and 'title="$2.00 at 7.1 CNY per US dollar."' in html
    assert "$" not in html.split("title=")[0]


def test_partial_and_unknown_costs_keep_their_meaning_in_another_currency():
    remember(Currency("CNY", Decimal("7.1")))
    partial = shown(Totals(5, 100, Decimal("0.5"), 2))
    assert 'class="cost-partial"' in partial and "≥ ¥3.55" in partial
    assert "2 requests used models without a known price" in partial
    unknown = shown(Totals(5, 100, Decimal(0), 5))
    assert "unknown" in unknown and "¥" not in unknown


def test_the_setting_is_read_once_then_kept_in_memory(django_assert_num_queries):
    DisplayCurrency.objects.create(id=1, code="CNY", rate=Decimal("7.2"))
    remember(USD, seconds=0)  # expired: the next read asks the database
    with django_assert_num_queries(1):
        assert display_currency() == Currency("CNY", Decimal("7.2"))
        assert display_currency().symbol == "¥"
    with django_assert_num_queries(0):
        shown(Totals(1, 1, Decimal(1), 0))


def test_no_row_means_usd(django_assert_num_queries):
    remember(USD, seconds=0)
    with django_assert_num_queries(1):
        assert display_currency() is USD


def test_staff_change_the_currency_audited_and_seen_at_once(admin_client):
    response = admin_client.get("/admin/usage/displaycurrency/")
    assert response.status_code == 302  # one row: the list goes to its form
    response = admin_client.post("/admin/usage/displaycurrency/1/change/", {
        "code": "CNY", "rate": "7.1", "rate_source": "bank of the month",
    })
    assert response.status_code == 302
    assert currency_module._Memo.value == Currency("CNY", Decimal("7.1"))
    event = AuditEvent.objects.get(action="display_currency_changed")
    assert event.before == {"code": "USD", "rate": "1.000000"}
    assert event.after == {"code": "CNY", "rate": "7.1"}


def test_a_rate_of_zero_is_refused(admin_client):
    admin_client.get("/admin/usage/displaycurrency/")
    response = admin_client.post("/admin/usage/displaycurrency/1/change/", {
        "code": "CNY", "rate": "0", "rate_source": "",
    })
    assert response.status_code == 200  # the form again, with the error
    assert DisplayCurrency.objects.get().code == "USD"
    assert not AuditEvent.objects.filter(action="display_currency_changed").exists()
