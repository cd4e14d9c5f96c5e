"""Which price applies to a model name, and what a bundle of tokens costs at it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from usage.models import COST_PLACES, ModelPrice

MILLION = Decimal(1_000_000)
QUANTUM = Decimal(1).scaleb(-COST_PLACES)


@dataclass(frozen=True, slots=True)
class Price:
    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal


class PriceBook:
    """The price table in memory for one sync or recompute. See ModelPrice for the rule:
    exact name first, then the longest `prefix*`, case-insensitively; otherwise unknown."""

    def __init__(self, prices: Iterable[ModelPrice]) -> None:
        self._exact: dict[str, Price] = {}
        prefixes: list[tuple[str, Price]] = []
        for p in prices:
            price = Price(p.input, p.output, p.cache_read, p.cache_write)
            name = p.model.strip().lower()
            if name.endswith("*"):
                prefixes.append((name[:-1], price))
            else:
                self._exact[name] = price
        self._prefixes = sorted(prefixes, key=lambda item: len(item[0]), reverse=True)
        self._found: dict[str, Price | None] = {}

    @classmethod
    def load(cls) -> PriceBook:
        return cls(ModelPrice.objects.all())

    def price_for(self, model: str) -> Price | None:
        if model in self._found:
            return self._found[model]
        name = model.strip().lower()
        price = self._exact.get(name)
        if price is None:
            price = next((p for prefix, p in self._prefixes if name.startswith(prefix)), None)
        self._found[model] = price
        return price


def cost_of(
    price: Price | None, *, uncached: int, cache_read: int, cache_write: int, output: int
) -> Decimal | None:
    """USD for a token split (usage.accounting: uncached input, cache read, cache write, and
    output with its reasoning), each part at its own price; None when the price is unknown
    (never 0 for "unknown"). Linear, so the cost of a row's sums equals the sum of its
    requests' costs, and a recompute from a row matches ingest."""
    if price is None:
        return None
    usd = (
        uncached * price.input
        + cache_read * price.cache_read
        + cache_write * price.cache_write
        + output * price.output
    ) / MILLION
    return usd.quantize(QUANTUM)
