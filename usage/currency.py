"""The display currency: which currency pages show costs in (storage stays USD).

Pages read it through `display_currency()`, which keeps it in process memory for a minute:
the `{% cost %}` tag is called many times per page, and pages pin their query counts, so a
read per page (or per tag) is not affordable for a value that changes a few times a year.
A staff change is seen at once by the process that saved it and within CACHE_SECONDS by the
others."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from usage.models import DisplayCurrency

CACHE_SECONDS = 60.0
SYMBOLS = {"USD": "$", "CNY": "¥", "EUR": "€"}


@dataclass(frozen=True, slots=True)
class Currency:
    code: str
    rate: Decimal  # units per US dollar

    @property
    def symbol(self) -> str:
        return SYMBOLS.get(self.code, self.code + " ")

    @property
    def is_usd(self) -> bool:
        return self.code == "USD"

    def convert(self, usd: Decimal) -> Decimal:
        return usd if self.is_usd else usd * self.rate


USD = Currency("USD", Decimal(1))


class _Memo:
    value: Currency | None = None
    expires: float = 0.0


def display_currency() -> Currency:
    now = time.monotonic()
    if _Memo.value is None or now >= _Memo.expires:
        row = DisplayCurrency.objects.filter(id=1).values_list("code", "rate").first()
        remember(Currency(row[0], row[1]) if row else USD)
    assert _Memo.value is not None
    return _Memo.value


def remember(currency: Currency, *, seconds: float = CACHE_SECONDS) -> None:
    """Puts `currency` in this process's memory (after a save, and for tests)."""
    _Memo.value = currency
    _Memo.expires = time.monotonic() + seconds


# --- the one rounding rule ---------------------------------------------------------------------
# Every amount a person or staff member reads (pages, the admin, chart axes and tooltips, quota
# bars, emails) is written by `money()`: converted to the display currency first, then rounded
# to the cent, half up, as a bill would be. Four places for small amounts and two for large
# ones put 2 and 4 decimals in one column and showed one amount as $0.42 and $0.4218 on two
# pages; a bill shows cents. What rounding hides is not lost: a usage under one cent reads
# "< $0.01" (never a "free" $0.00), `money_exact()` gives the full figure for a title, and the
# CSV export keeps full precision in its own columns (docs/money-and-charts.md).
CENT = Decimal("0.01")
EXACT = Decimal("0.000001")


def money(usd: Decimal, *, currency: Currency | None = None, lower_bound: bool = False) -> str:
    """`usd` (a stored amount, always US dollars) as shown: `¥14.20`, `$1,234.50`, `< $0.01`.
    A `lower_bound` (the known part of a cost, shown after "≥") is rounded down instead, so
    that "≥" stays true: `$0.006` known of more is `$0.00`, `$0.4218` is `$0.42`."""
    currency = currency or display_currency()
    amount = currency.convert(Decimal(usd))
    rounded = amount.quantize(CENT, rounding=ROUND_DOWN if lower_bound else ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    if 0 < amount < CENT and not lower_bound:
        return f"< {currency.symbol}0.01"
    return f"{sign}{currency.symbol}{abs(rounded):,.2f}"


def money_exact(usd: Decimal, *, currency: Currency | None = None) -> str | None:
    """The amount to the millionth (`$0.023100`) when the cent rounding of `money()` changed
    it; None when `money()` already shows it whole."""
    currency = currency or display_currency()
    amount = currency.convert(Decimal(usd))
    if amount == amount.quantize(CENT):
        return None
    return f"{currency.symbol}{amount.quantize(EXACT, rounding=ROUND_HALF_UP):,f}"
