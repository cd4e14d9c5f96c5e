"""Server-side SVG charts: daily usage stacked by model, drawn as plain <rect>s whose
geometry is computed here and written out by templates/usage/_chart.html.

No chart library and no JavaScript: the Content-Security-Policy forbids inline styles and
scripts, so everything is SVG presentation attributes (x, y, width, height) plus classes
from static/css/charts.css (colours). The SVG has a viewBox and no fixed size, so it scales
to the width of a phone. Each chart carries its data as a table too (the accessible
fallback, and what the tests and the browser read)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal
from typing import Any

from django.http import QueryDict
from django.utils.formats import number_format
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from usage.currency import Currency, display_currency, money
from usage.selectors import ALL_USAGE, CHART_DAYS, Daily, Totals, _add

# The drawing, in viewBox units. 480 wide keeps the axis text legible when a 390 px phone
# scales the whole chart down to ~360 px.
WIDTH, HEIGHT = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 22, 10, 28
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
PALETTE = 10  # colour classes .series-0 ... .series-9 in charts.css
OTHERS = "+others"  # the series the models past the palette are folded into (no model name)
DEFAULT_DAYS = 30
MEASURES = {"tokens": gettext_lazy("Tokens"),
            "cost": gettext_lazy("Cost (%(code)s, known part)"),
            "requests": gettext_lazy("Requests")}


def series_colours(daily: Daily) -> dict[str, str]:
    """The colour class of each series of one page's charts: the palette in the series' own
    order (most tokens first, then by name), so no two series of a page share a colour and a
    model keeps its colour on every chart of the page. (A hash of the model name gave two
    pairs of six models one colour each.) A page draws at most PALETTE series: `fold` puts
    the rest into OTHERS first, which has a grey of its own."""
    colours = {ALL_USAGE: "series-all", OTHERS: "series-others"}
    n = 0
    for name in daily.series:
        if name not in colours:
            colours[name] = f"series-{n}"
            n += 1
    return colours


def fold(daily: Daily, *, keep: int = PALETTE) -> Daily:
    """`daily` with at most `keep` series: the biggest keep-1 and OTHERS for the rest
    (their sum, so each day's and the chart's totals stay the same)."""
    if len(daily.series) <= keep:
        return daily
    shown, rest = daily.series[:keep - 1], set(daily.series[keep - 1:])
    cells: dict[tuple[date, str], Totals] = {}
    for (day, name), t in daily.cells.items():
        key = (day, OTHERS if name in rest else name)
        cells[key] = _add(cells[key], t) if key in cells else t
    others = Totals()
    for name in rest:
        others = _add(others, daily.per_series[name])
    per_series = {name: daily.per_series[name] for name in shown} | {OTHERS: others}
    return replace(daily, series=[*shown, OTHERS], cells=cells, per_series=per_series)


def series_label(name: str) -> str:
    if name == OTHERS:
        return _("other models")
    return _("all usage") if name == ALL_USAGE else name


def _value(t: Totals, measure: str, currency: Currency) -> Decimal:
    if measure == "requests":
        return Decimal(t.requests)
    # Costs are drawn in the display currency, so the axis is round in what it says.
    return Decimal(t.tokens) if measure == "tokens" else currency.convert(t.cost)


def nice_ceiling(top: Decimal) -> tuple[Decimal, Decimal]:
    """A round axis maximum at or above `top` and its tick step: 1, 2 or 5 × 10^k, four steps."""
    if top <= 0:
        return Decimal(1), Decimal("0.25")
    raw = top / 4
    power = Decimal(10) ** math.floor(math.log10(float(raw)))
    for factor in (1, 2, 5, 10):
        step = power * factor
        if step * 4 >= top:
            return step * 4, step
    return power * 40, power * 10  # not reached: 10 × power × 4 >= top always


def compact(value: Decimal, measure: str, *, step: Decimal = Decimal(1),
            currency: Currency | None = None) -> str:
    """An axis label: 0, 500, 12k, 1.5M; ¥0.25, ¥12 (a scale mark in the display currency,
    with the decimals its step needs: amounts themselves go through `money`)."""
    if measure == "cost":
        symbol = (currency or display_currency()).symbol
        places = 0 if step >= 1 else max(2, -step.normalize().as_tuple().exponent)
        return f"{symbol}{value:,.{places}f}"
    for size, suffix in ((Decimal(10) ** 9, "B"), (Decimal(10) ** 6, "M"), (Decimal(1000), "k")):
        if value >= size:
            return f"{(value / size).normalize():f}{suffix}"
    return f"{value.normalize():f}"


@dataclass(frozen=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class DayLabel:
    x: float
    label: str


@dataclass(frozen=True)
class Legend:
    name: str
    label: str
    css: str
    totals: Totals


@dataclass(frozen=True)
class Stacked:
    measure: str
    title: str
    segments: list[Segment]
    ticks: list[Tick]
    day_labels: list[DayLabel]
    total: Decimal
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    baseline: int = HEIGHT - BOTTOM


def _fmt(t: Totals, measure: str, currency: Currency) -> str:
    if measure == "cost":
        return money(t.cost, currency=currency)
    return number_format(t.requests if measure == "requests" else t.tokens, force_grouping=True)


def stacked(daily: Daily, *, measure: str, colours: dict[str, str] | None = None,
            currency: Currency | None = None) -> Stacked:
    """One bar per day, one segment per series stacked bottom-up in `daily.series` order."""
    currency = currency or display_currency()
    colours = {**series_colours(daily), **(colours or {})}  # never a series without one
    top = max((_value(daily.per_day.get(d, Totals()), measure, currency) for d in daily.days),
              default=Decimal(0))
    axis_max, step = nice_ceiling(top)
    if measure != "cost" and step < 1:  # no quarter tokens (or requests) on the axis
        axis_max, step = Decimal(4), Decimal(1)
    slot = PLOT_W / len(daily.days)
    bar = max(slot * 0.8, 1.0)
    scale = PLOT_H / float(axis_max)
    segments = []
    for i, day in enumerate(daily.days):
        y = float(TOP + PLOT_H)
        for name in daily.series:
            cell = daily.cells.get((day, name))
            value = _value(cell, measure, currency) if cell else Decimal(0)
            if value <= 0:
                continue
            height = float(value) * scale
            y -= height
            segments.append(Segment(
                x=round(LEFT + i * slot + (slot - bar) / 2, 2), y=round(y, 2),
                width=round(bar, 2), height=round(height, 2), css=colours[name],
                title=f"{day:%Y-%m-%d} · {series_label(name)}: {_fmt(cell, measure, currency)}",
            ))
    ticks = [Tick(y=round(TOP + PLOT_H - float(step * n) * scale, 2),
                  label=compact(step * n, measure, step=step, currency=currency))
             for n in range(5)]
    every = max(1, math.ceil(len(daily.days) / 6))
    labels = [DayLabel(x=round(LEFT + (i + 0.5) * slot, 2), label=f"{day.month}-{day.day}")
              for i, day in enumerate(daily.days) if (len(daily.days) - 1 - i) % every == 0]
    title = str(MEASURES[measure])
    if measure == "cost":
        title %= {"code": currency.code}
    return Stacked(
        measure=measure, title=title, segments=segments, ticks=ticks,
        day_labels=labels, total=_value(daily.total, measure, currency),
    )


@dataclass(frozen=True)
class DayRow:
    day: date
    series: str
    label: str
    css: str
    totals: Totals


@dataclass(frozen=True)
class Chart:
    """What templates/usage/_chart.html draws: both measures, the legend, the table."""

    id: str
    title: str
    days: int
    daily: Daily
    charts: list[Stacked]
    legend: list[Legend]
    rows: list[DayRow]  # the table: non-empty (day, series) cells, oldest day first
    choices: list[tuple[int, str, bool]]  # (days, link, current) for the picker
    unknown_days: bool  # ?days= was not one of CHART_DAYS: the default is shown

    @property
    def empty(self) -> bool:
        return self.daily.empty


def chart_days(query: QueryDict, default: int = DEFAULT_DAYS) -> tuple[int, bool]:
    """The period asked for with ?days= (`default` without one), and whether the request was
    unusable."""
    raw = query.get("days")
    if raw is None:
        return default, False
    try:
        days = int(raw)
    except ValueError:
        return default, True
    return (days, False) if days in CHART_DAYS else (default, True)


def chart(daily: Daily, *, query: QueryDict, chart_id: str, title: str, unknown_days: bool = False,
          measures: tuple[str, ...] = ("tokens", "cost"),
          colours: dict[str, str] | None = None) -> Chart:
    """`colours`: a page drawing several Chart objects passes one `series_colours()` mapping
    (of the series of all of them, folded alike) so that a model keeps its colour across
    them; by default the colours are this chart's own."""
    daily = fold(daily)
    colours = {**series_colours(daily), **(colours or {})}  # never a series without one
    currency = display_currency()
    choices = []
    for n in CHART_DAYS:
        q = query.copy()
        q["days"] = str(n)
        choices.append((n, f"?{q.urlencode()}", n == len(daily.days)))
    rows = [
        DayRow(day, name, series_label(name), colours[name], daily.cells[(day, name)])
        for day in daily.days for name in daily.series if (day, name) in daily.cells
    ]
    return Chart(
        id=chart_id, title=title, days=len(daily.days), daily=daily,
        charts=[stacked(daily, measure=m, colours=colours, currency=currency) for m in measures],
        legend=[Legend(name, series_label(name), colours[name], daily.per_series[name])
                for name in daily.series],
        rows=rows, choices=choices, unknown_days=unknown_days,
    )


def chart_context(daily_for: Any, *, query: QueryDict, chart_id: str, title: str,
                  default_days: int = DEFAULT_DAYS) -> Chart:
    """The chart for a page: reads ?days= from `query` (`default_days` without one) and calls
    `daily_for(days=...)`. A `title` may name the period as `%(days)s`."""
    days, unknown = chart_days(query, default_days)
    title = title % {"days": days} if "%(days)" in title else title
    return chart(daily_for(days=days), query=query, chart_id=chart_id, title=title,
                 unknown_days=unknown)
