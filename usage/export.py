"""CSV export for staff: usage per day (in the portal's TIME_ZONE), person, key and model.

The answer is streamed: the database groups the hourly rows (one output row per key, model
and day, whatever the number of hours behind it) and a server-side cursor hands them over
in chunks, so a year of usage never sits in the portal's memory (bench/export.py measures it).

The file starts with a UTF-8 byte order mark: Excel on Windows reads a CSV without one in the
machine's ANSI code page, which garbles Chinese names. Cost is in USD (what is stored); when
staff set a display currency, a second cost column gives it at their rate.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET

from keyportal.api import api_token_of, staff_page_or_token
from usage.currency import Currency, display_currency
from usage.models import UsageSnapshot

CHUNK_ROWS = 2000  # rows per database fetch and per chunk written to the client
MAX_DAYS = 3660  # ten years: a typo in the year is caught instead of scanning everything
# Dates the export can turn into times: the day after the last one, and local midnight in
# UTC, must still be datetimes (9999-12-31 + 1 day overflowed into a 500).
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(9998, 12, 31)

BOM = "\ufeff"
COLUMNS = (
    gettext_lazy("date"), gettext_lazy("email"), gettext_lazy("name"), gettext_lazy("key label"),
    gettext_lazy("key"), gettext_lazy("upstream"), gettext_lazy("model"), gettext_lazy("requests"), gettext_lazy("failures"),
    gettext_lazy("uncached input tokens"), gettext_lazy("cache read tokens"),
    gettext_lazy("cache write tokens"), gettext_lazy("output tokens"),
    gettext_lazy("total tokens"), gettext_lazy("cost (USD)"),
    gettext_lazy("requests without a price"), gettext_lazy("incomplete requests"),
)

PRESETS = {
    "today": gettext_lazy("Today"),
    "last-7-days": gettext_lazy("Last 7 days"),
    "this-month": gettext_lazy("This month"),
    "last-month": gettext_lazy("Last month"),
}


def preset_range(preset: str, *, today: date) -> tuple[date, date]:
    """The first and last day (both included) of a preset, counted from `today` (a local
    date in the portal's time zone)."""
    if preset == "today":
        return today, today
    if preset == "last-7-days":
        return today - timedelta(days=6), today
    if preset == "this-month":
        return today.replace(day=1), today
    if preset == "last-month":
        last = today.replace(day=1) - timedelta(days=1)
        return last.replace(day=1), last
    raise ValueError(f"unknown preset {preset!r}")


class ExportForm(forms.Form):
    """`from` and `to` (inclusive), or a `preset` that sets both, as query parameters: `from`
    is a keyword in Python, so the fields are added by name. Unbound, the form offers the
    last 7 days."""

    def __init__(self, *args: Any, today: date, **kwargs: Any) -> None:
        start, end = preset_range("last-7-days", today=today)
        super().__init__(*args, initial={"from": start, "to": end}, **kwargs)
        self.today = today
        self.fields["from"] = forms.DateField(
            label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"})
        )
        self.fields["to"] = forms.DateField(
            label=_("To (included)"), required=False,
            widget=forms.DateInput(attrs={"type": "date"}),
        )
        self.fields["preset"] = forms.ChoiceField(
            label=_("Period"), required=False, choices=[("", "—"), *PRESETS.items()],
            widget=forms.HiddenInput,
        )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("preset"):
            cleaned["from"], cleaned["to"] = preset_range(cleaned["preset"], today=self.today)
            return cleaned
        for name in ("from", "to"):
            if name not in self.errors and cleaned.get(name) is None:
                self.add_error(name, self.fields[name].error_messages["required"])
        for name in ("from", "to"):
            day = cleaned.get(name)
            if day is not None and not FIRST_DAY <= day <= LAST_DAY:
                self.add_error(name, _("Dates out of range: choose days from %(first)s to "
                                       "%(last)s.") % {"first": FIRST_DAY, "last": LAST_DAY})
                cleaned[name] = None
        start, end = cleaned.get("from"), cleaned.get("to")
        if start and end:
            if end < start:
                self.add_error("to", _("The end date is before the start date."))
            elif (end - start).days >= MAX_DAYS:
                self.add_error("to", _("Choose at most %(n)d days.") % {"n": MAX_DAYS})
        return cleaned


def usage_by_day(*, start: date, end: date) -> QuerySet[UsageSnapshot, dict[str, Any]]:
    """Usage per local day and key from `start` to `end` (inclusive), grouped and summed by
    the database. A row belongs to the local day its UTC hour starts in."""
    zone = timezone.get_default_timezone()
    since = datetime.combine(start, time.min, tzinfo=zone)
    until = datetime.combine(end + timedelta(days=1), time.min, tzinfo=zone)
    return (
        UsageSnapshot.objects.filter(hour__gte=since, hour__lt=until)
        .annotate(day=TruncDate("hour", tzinfo=zone))
        .values(
            "day", "api_key_id", "api_key__owner__email", "api_key__owner__name",
            "api_key__label", "api_key__prefix", "api_key__last4", "api_key__upstream__name",
            "model",
        )
        .annotate(
            requests_sum=Sum("requests"), failures_sum=Sum("failures"),
            input_sum=Sum("input_tokens"), output_sum=Sum("output_tokens"),
            read_sum=Sum("cached_tokens"), write_sum=Sum("cache_creation_tokens"),
            incomplete_sum=Sum("incomplete_requests"),
            total_sum=Sum("total_tokens"),
            cost_sum=Sum("cost"),  # NULL only when no request of the day had a known price
            unpriced=Sum("requests", filter=Q(cost__isnull=True)),
        )
        .order_by("day", "api_key__owner__email", "api_key_id", "model")
    )


def _cell(text: str | None) -> str:
    """Names and labels are typed by people: a leading = + - @ would make a spreadsheet run
    them as a formula, so such a value is quoted as text."""
    text = text or ""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class _Buffer:
    """What csv.writer writes to; the text is collected and handed out per chunk."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def take(self) -> str:
        text, self.parts = "".join(self.parts), []
        return text


def csv_lines(
    rows: QuerySet[UsageSnapshot, dict[str, Any]], *, currency: Currency | None = None
) -> Iterator[str]:
    """The CSV, BOM first. `currency`: a display currency other than USD adds its column."""
    extra = currency is not None and not currency.is_usd
    buffer = _Buffer()
    buffer.write(BOM)
    writer = csv.writer(buffer)
    header = [str(c) for c in COLUMNS]
    if extra:
        header.append(_("cost (%(code)s)") % {"code": currency.code})
    writer.writerow(header)
    for n, row in enumerate(rows.iterator(chunk_size=CHUNK_ROWS), 1):
        cost = row["cost_sum"]
        line = [
            row["day"].isoformat(),
            _cell(row["api_key__owner__email"]),
            _cell(row["api_key__owner__name"]),
            _cell(row["api_key__label"]),
            f"{row['api_key__prefix']}…{row['api_key__last4']}",  # masked, as everywhere
            # No upstream: the CLIProxyAPI's key (the pool's).
            _cell(row["api_key__upstream__name"] or "CLIProxyAPI"),
            _cell(row["model"]),  # the proxy reports it; a client can choose what it says
            row["requests_sum"], row["failures_sum"], row["input_sum"], row["read_sum"],
            row["write_sum"], row["output_sum"], row["total_sum"],
            "" if cost is None else f"{cost:.6f}",
            row["unpriced"] or 0, row["incomplete_sum"] or 0,
        ]
        if extra:
            line.append("" if cost is None else f"{currency.convert(cost):.6f}")
        writer.writerow(line)
        if n % CHUNK_ROWS == 0:
            yield buffer.take()
    yield buffer.take()


@require_GET
@staff_page_or_token
def usage_export(request: HttpRequest) -> HttpResponse:
    """The form; with valid dates, the CSV. Bad dates answer 400 with the form and nothing
    streamed. A staff API token caller gets the CSV the same way, and bad or missing dates as
    JSON 400 (`error`, and `fields` with each field's messages)."""
    today = timezone.localdate()
    form = ExportForm(request.GET or None, today=today)
    # Scripts get bad dates as JSON: a token caller, or anyone asking for JSON before HTML.
    wants_json = api_token_of(request) is not None or (
        request.get_preferred_type(["text/html", "application/json"]) == "application/json")
    if wants_json and not form.is_valid():
        return JsonResponse({
            "error": _("Give the period as ?from=YYYY-MM-DD&to=YYYY-MM-DD (both included), or "
                       "as ?preset= one of %(presets)s.") % {"presets": ", ".join(PRESETS)},
            "fields": {name: [str(m) for m in errors] for name, errors in form.errors.items()},
        }, status=400)
    if not form.is_valid():
        context = {
            **admin.site.each_context(request), "form": form, "title": _("Export usage"),
            "presets": [(key, label, *preset_range(key, today=today))
                        for key, label in PRESETS.items()],
        }
        return render(request, "usage/export.html", context, status=400 if form.is_bound else 200)
    start, end = form.cleaned_data["from"], form.cleaned_data["to"]
    response = StreamingHttpResponse(
        csv_lines(usage_by_day(start=start, end=end), currency=display_currency()),
        content_type="text/csv; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="usage-{start}-to-{end}.csv"'
    return response
