"""Server-side SVG charts: daily usage stacked by model, drawn as plain <rect>s whose
geometry is computed here and written out by templates/usage/_chart.html.

No chart library and no JavaScript: the Content-Security-Policy forbids inline styles and
scripts, so everything is SVG presentation attributes (x, y, width, height) plus classes
from static/css/charts.css (colours). The SVG has a viewBox and no fixed size, so it scales
to the width of a phone. Each chart carries its data as a table too (the accessible
fallback, and what the tests and the browser read)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from django.http import QueryDict
from django.utils.formats import number_format
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from usage.selectors import ALL_USAGE, CHART_DAYS, Daily, Totals

# The drawing, in viewBox units. 480 wide keeps the axis text legible when a 390 px phone
# scales the whole chart down to ~360 px.
WIDTH, HEIGHT = 480, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 22, 10, 28
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
PALETTE = 10  # colour classes .series-0 ... .series-9 in charts.css
DEFAULT_DAYS = 30
MEASURES = {"tokens": gettext_lazy("Tokens"), "cost": gettext_lazy("Cost (USD, known part)"),
            "requests": gettext_lazy("Requests")}


def series_class(name: str) -> str:
    """The colour class of a model: from a hash of its name, so a model has the same colour
    on every chart and page, whatever else is drawn next to it."""
    if name == ALL_USAGE:
        return "series-all"
    return f"series-{zlib.crc32(name.encode()) % PALETTE}"


def series_label(name: str) -> str:
    return _("all usage") if name == ALL_USAGE else name


def _value(t: Totals, measure: str) -> Decimal:
    if measure == "requests":
        return Decimal(t.requests)
    return Decimal(t.tokens) if measure == "tokens" else t.cost


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


def compact(value: Decimal, measure: str) -> str:
    """An axis label: 0, 500, 12k, 1.5M; $0.25, $12."""
    if measure == "cost":
        return f"${value:,.2f}" if value < 10 else f"${value:,.0f}"
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


def _fmt(value: Decimal, measure: str) -> str:
    if measure == "cost":
        return f"${value:,.4f}"
    return number_format(int(value), force_grouping=True)


def stacked(daily: Daily, *, measure: str) -> Stacked:
    """One bar per day, one segment per series stacked bottom-up in `daily.series` order."""
    top = max((_value(daily.per_day.get(d, Totals()), measure) for d in daily.days),
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
            value = _value(cell, measure) if cell else Decimal(0)
            if value <= 0:
                continue
            height = float(value) * scale
            y -= height
            segments.append(Segment(
                x=round(LEFT + i * slot + (slot - bar) / 2, 2), y=round(y, 2),
                width=round(bar, 2), height=round(height, 2), css=series_class(name),
                title=f"{day:%Y-%m-%d} · {series_label(name)}: {_fmt(value, measure)}",
            ))
    ticks = [Tick(y=round(TOP + PLOT_H - float(step * n) * scale, 2),
                  label=compact(step * n, measure)) for n in range(5)]
    every = max(1, math.ceil(len(daily.days) / 6))
    labels = [DayLabel(x=round(LEFT + (i + 0.5) * slot, 2), label=f"{day.month}-{day.day}")
              for i, day in enumerate(daily.days) if (len(daily.days) - 1 - i) % every == 0]
    return Stacked(
        measure=measure, title=str(MEASURES[measure]), segments=segments, ticks=ticks,
        day_labels=labels, total=_value(daily.total, measure),
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


def chart_days(query: QueryDict) -> tuple[int, bool]:
    """The period asked for with ?days=, and whether the request was unusable."""
    raw = query.get("days")
    if raw is None:
        return DEFAULT_DAYS, False
    try:
        days = int(raw)
    except ValueError:
        return DEFAULT_DAYS, True
    return (days, False) if days in CHART_DAYS else (DEFAULT_DAYS, True)


def chart(daily: Daily, *, query: QueryDict, chart_id: str, title: str, unknown_days: bool = False,
          measures: tuple[str, ...] = ("tokens", "cost")) -> Chart:
    choices = []
    for n in CHART_DAYS:
        q = query.copy()
        q["days"] = str(n)
        choices.append((n, f"?{q.urlencode()}", n == len(daily.days)))
    rows = [
        DayRow(day, name, series_label(name), series_class(name), daily.cells[(day, name)])
        for day in daily.days for name in daily.series if (day, name) in daily.cells
    ]
    return Chart(
        id=chart_id, title=title, days=len(daily.days), daily=daily,
        charts=[stacked(daily, measure=m) for m in measures],
        legend=[Legend(name, series_label(name), series_class(name), daily.per_series[name])
                for name in daily.series],
        rows=rows, choices=choices, unknown_days=unknown_days,
    )


def chart_context(daily_for: Any, *, query: QueryDict, chart_id: str, title: str) -> Chart:
    """The chart for a page: reads ?days= from `query` and calls `daily_for(days=...)`."""
    days, unknown = chart_days(query)
    return chart(daily_for(days=days), query=query, chart_id=chart_id, title=title,
                 unknown_days=unknown)
