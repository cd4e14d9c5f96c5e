"""How usage numbers read on the pages: cost never shows an unknown as 0, and is shown in the
display currency staff chose (usage/currency.py); it is stored and summed in USD."""

from __future__ import annotations

from decimal import Decimal

from django import template
from django.utils.formats import number_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

from usage.currency import USD, display_currency, money, money_exact
from usage.selectors import Totals

register = template.Library()


@register.simple_tag
def cost(totals: Totals) -> SafeString:
    """`$1.23` (usage.currency.money: to the cent, `< $0.01` below one, the exact figure in a
    title); `≥ $1.23` with a title when part of the usage has no price; `unknown` with a title
    when none of it has. In another display currency (`¥8.73`), a title also gives the dollars
    it was converted from and the rate."""
    status = totals.cost_status
    if status == "unknown":
        return format_html(
            '<span class="cost-unknown" title="{}">{}</span>',
            _("No price is known for the models used."), _("unknown"),
        )
    currency = display_currency()
    amount = money(totals.cost, currency=currency, lower_bound=status == "partial")
    notes = []
    exact = money_exact(totals.cost, currency=currency)
    if exact is not None:  # the cent rounding hid something: the title keeps it
        notes.append(_("Exactly %(amount)s.") % {"amount": exact})
    if not currency.is_usd:
        notes.append(_("%(usd)s at %(rate)s %(code)s per US dollar.") % {
            "usd": money_exact(totals.cost, currency=USD) or money(totals.cost, currency=USD),
            "rate": f"{currency.rate.normalize():f}", "code": currency.code,
        })
    if status == "partial":
        if totals.unpriced_requests:
            notes.append(
                _("%(n)s requests used models without a known price; their cost is not "
                  "included.") % {"n": totals.unpriced_requests}
            )
        if totals.incomplete_requests:
            notes.append(
                _("The proxy lost part of the token counts of %(n)s requests (a known gap of "
                  "some proxy versions); their cost is counted from what it reported.")
                % {"n": totals.incomplete_requests}
            )
        return format_html(
            '<span class="cost-partial" title="{}">≥ {}</span>', " ".join(notes), amount
        )
    if notes:
        return format_html('<span class="{}" title="{}">{}</span>',
                           "cost-exact" if currency.is_usd else "cost-converted", " ".join(notes),
                           amount)
    return format_html("{}", amount)


@register.filter
def key_totals(key: object) -> Totals:
    """A keys_with_usage() row's annotations as Totals, for the cost tag."""
    return Totals(
        key.total_requests, key.total_tokens,  # type: ignore[attr-defined]
        key.total_cost or Decimal(0), key.unpriced_requests,  # type: ignore[attr-defined]
        key.incomplete_requests, key.uncached_input,  # type: ignore[attr-defined]
        key.cache_read, key.cache_write,  # type: ignore[attr-defined]
    )


@register.filter
def grouped(value: int) -> str:
    """12,345 (in the reader's locale): token counts are long."""
    return number_format(value, force_grouping=True)


@register.filter
def row_totals(row: object) -> Totals:
    """One UsageSnapshot row as Totals: a NULL cost is unknown, not free."""
    unknown = row.cost is None  # type: ignore[attr-defined]
    return Totals(
        row.requests, row.total_tokens,  # type: ignore[attr-defined]
        Decimal(0) if unknown else row.cost,  # type: ignore[attr-defined]
        row.requests if unknown else 0,  # type: ignore[attr-defined]
        row.incomplete_requests, row.input_tokens,  # type: ignore[attr-defined]
        row.cached_tokens, row.cache_creation_tokens,  # type: ignore[attr-defined]
    )


@register.simple_tag
def window_cost(amount: Decimal, unpriced: int) -> SafeString:
    """A window's known cost, `≥` when `unpriced` requests had no price, `unknown` when none
    of the cost is known (as the cost tag)."""
    priced = 1 if amount or not unpriced else 0
    return cost(Totals(unpriced + priced, 0, amount, unpriced))



@register.simple_tag(name="money")
def money_tag(usd: Decimal | None) -> str:
    """A plain amount stored in USD (a limit, a sum) in the display currency, by the one
    rounding rule; `—` for none."""
    return "—" if usd is None else money(usd)


@register.filter
def commands(text: str) -> SafeString:
    """`text` escaped, with each `command` in backticks shown as code: the checklist's lines
    name shell commands inside translated sentences."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: leave the text as it is
        return format_html("{}", text)
    return format_html_join("", "{}", ((format_html("<code>{}</code>", p) if i % 2 else p,)
                                        for i, p in enumerate(parts)))
