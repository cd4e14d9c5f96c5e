"""The display currency: which currency pages show costs in (storage stays USD).

Pages read it through `display_currency()`, which keeps it in process memory for a minute:
the `{% cost %}` tag is called many times per page, and pages pin their query counts, so a
read per page (or per tag) is not affordable for a value that changes a few times a year.
A staff change is seen at once by the process that saved it and within CACHE_SECONDS by the
others."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

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
