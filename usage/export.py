"""CSV export for staff: usage per day (in the portal's TIME_ZONE), person and key.

The answer is streamed: the database groups the hourly rows (one output row per key per day,
whatever the number of models and hours behind it) and a server-side cursor hands them over
in chunks, so a year of usage never sits in the portal's memory (bench/export.py measures it).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Any

from django import forms
from django.db.models import Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET

from keyportal.api import api_token_of, staff_page_or_token
from usage.models import UsageSnapshot

CHUNK_ROWS = 2000  # rows per database fetch and per chunk written to the client
MAX_DAYS = 3660  # ten years: a typo in the year is caught instead of scanning everything

COLUMNS = (
    gettext_lazy("date"), gettext_lazy("email"), gettext_lazy("name"), gettext_lazy("key label"),
    gettext_lazy("key"), gettext_lazy("requests"), gettext_lazy("failures"),
    gettext_lazy("input tokens"), gettext_lazy("output tokens"), gettext_lazy("total tokens"),
    gettext_lazy("cost (USD)"), gettext_lazy("requests without a price"),
)


class ExportForm(forms.Form):
    """`from` and `to` (inclusive), as query parameters: `from` is a keyword in Python, so
    the fields are added by name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["from"] = forms.DateField(
            label=_("From"), widget=forms.DateInput(attrs={"type": "date"})
        )
        self.fields["to"] = forms.DateField(
            label=_("To (included)"), widget=forms.DateInput(attrs={"type": "date"})
        )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
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
            "api_key__label", "api_key__prefix", "api_key__last4",
        )
        .annotate(
            requests_sum=Sum("requests"), failures_sum=Sum("failures"),
            input_sum=Sum("input_tokens"), output_sum=Sum("output_tokens"),
            total_sum=Sum("total_tokens"),
            cost_sum=Sum("cost"),  # NULL only when no request of the day had a known price
            unpriced=Sum("requests", filter=Q(cost__isnull=True)),
        )
        .order_by("day", "api_key__owner__email", "api_key_id")
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


def csv_lines(rows: QuerySet[UsageSnapshot, dict[str, Any]]) -> Iterator[str]:
    buffer = _Buffer()
    writer = csv.writer(buffer)
    writer.writerow([str(c) for c in COLUMNS])
    for n, row in enumerate(rows.iterator(chunk_size=CHUNK_ROWS), 1):
        cost = row["cost_sum"]
        writer.writerow([
            row["day"].isoformat(),
            _cell(row["api_key__owner__email"]),
            _cell(row["api_key__owner__name"]),
            _cell(row["api_key__label"]),
            f"{row['api_key__prefix']}…{row['api_key__last4']}",  # masked, as everywhere
            row["requests_sum"], row["failures_sum"], row["input_sum"], row["output_sum"],
            row["total_sum"],
            "" if cost is None else f"{cost:.6f}",
            row["unpriced"] or 0,
        ])
        if n % CHUNK_ROWS == 0:
            yield buffer.take()
    yield buffer.take()


@require_GET
@staff_page_or_token
def usage_export(request: HttpRequest) -> HttpResponse:
    """The form; with valid dates, the CSV. Bad dates answer 400 with the form and nothing
    streamed. A staff API token caller gets the CSV the same way, and bad or missing dates as
    JSON 400 (`error`, and `fields` with each field's messages)."""
    form = ExportForm(request.GET or None)
    if api_token_of(request) is not None and not form.is_valid():
        return JsonResponse({
            "error": _("Give the period as ?from=YYYY-MM-DD&to=YYYY-MM-DD (both included)."),
            "fields": {name: [str(m) for m in errors] for name, errors in form.errors.items()},
        }, status=400)
    if not form.is_valid():
        context = {"form": form, "title": _("Export usage")}
        return render(request, "usage/export.html", context, status=400 if form.is_bound else 200)
    start, end = form.cleaned_data["from"], form.cleaned_data["to"]
    response = StreamingHttpResponse(
        csv_lines(usage_by_day(start=start, end=end)), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="usage-{start}-to-{end}.csv"'
    return response
