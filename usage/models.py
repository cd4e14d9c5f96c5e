"""What keys did at the proxy: hourly counters per key and model, prices, and the bookkeeping
that makes `sync_usage` durable (queue batches) and idempotent (snapshot cursors)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from pool.models import ApiKey

COST_DIGITS = 20
COST_PLACES = 8  # a single cheap request costs a few millionths of a dollar


class UsageSnapshot(models.Model):
    """One key's use of one model during one UTC hour. Rows only ever grow: sync_usage adds
    to them with an upsert (`INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n`)."""

    api_key = models.ForeignKey(
        ApiKey, verbose_name=_("key"), on_delete=models.PROTECT, related_name="usage",
        # The unique (key, model, hour) index serves lookups by key; a second index on the key
        # alone was one more index write per row on every sync.
        db_index=False,
        # No database constraint: its check (one locking read of the key row per new usage
        # row, at commit) was a third of PostgreSQL's ingest time, and keys are never deleted
        # (PROTECT here; the admin cannot delete them; no code path does).
        db_constraint=False,
    )
    model = models.CharField(_("model"), max_length=200)
    hour = models.DateTimeField(_("hour (UTC)"))
    requests = models.PositiveBigIntegerField(_("requests"), default=0)
    failures = models.PositiveBigIntegerField(_("failures"), default=0)
    # The token split (usage.accounting), whatever the provider and proxy version reported:
    # uncached input, cache read and cache write are disjoint; output includes reasoning;
    # total is the sum of the four billed parts. (The column names are older than the split.)
    input_tokens = models.PositiveBigIntegerField(_("uncached input tokens"), default=0)
    output_tokens = models.PositiveBigIntegerField(_("output tokens"), default=0)
    reasoning_tokens = models.PositiveBigIntegerField(_("reasoning tokens"), default=0)
    cached_tokens = models.PositiveBigIntegerField(_("cache-read tokens"), default=0)
    cache_creation_tokens = models.PositiveBigIntegerField(_("cache-write tokens"), default=0)
    total_tokens = models.PositiveBigIntegerField(_("total tokens"), default=0)
    # Requests whose counts the proxy lost (usage.accounting): the row's cost is a lower bound.
    incomplete_requests = models.PositiveBigIntegerField(_("incomplete requests"), default=0)
    # NULL means "no price known for this model", which is not the same as free.
    cost = models.DecimalField(
        _("cost (USD)"), max_digits=COST_DIGITS, decimal_places=COST_PLACES, null=True,
        blank=True,
    )

    class Meta:
        verbose_name = _("usage (key × model × hour)")
        verbose_name_plural = _("usage (key × model × hour)")
        ordering = ["-hour", "api_key_id", "model"]
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "model", "hour"], name="usagesnapshot_one_row_per_key_model_hour"
            ),
        ]
        indexes = [models.Index(fields=["hour"], name="usagesnapshot_hour")]

    def __str__(self) -> str:
        return f"{self.api_key_id} {self.model} {self.hour:%Y-%m-%d %H:00}"


class ModelPrice(models.Model):
    """USD per million tokens for a model name.

    Matching: `model` is an exact upstream model name (`gpt-5-mini`), or a prefix ending in
    `*` (`claude-sonnet-4-5*` for every dated release of it). An exact entry wins over any
    prefix; among prefixes the longest wins. Comparison ignores case. There is deliberately
    no catch-all: an unmatched model has an unknown cost rather than a wrong one."""

    model = models.CharField(
        _("model name or prefix*"), max_length=200, unique=True,
        help_text=_("An exact upstream model name, or a prefix ending in * "
                    "(e.g. claude-sonnet-4-5*). Exact names win, then the longest prefix."),
    )
    input = models.DecimalField(_("input / 1M"), max_digits=12, decimal_places=6)
    output = models.DecimalField(_("output / 1M"), max_digits=12, decimal_places=6)
    cache_read = models.DecimalField(_("cache read / 1M"), max_digits=12, decimal_places=6)
    cache_write = models.DecimalField(_("cache write / 1M"), max_digits=12, decimal_places=6)
    source = models.CharField(_("source"), max_length=300, blank=True)
    taken_on = models.DateField(_("price taken on"), null=True, blank=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("model price")
        verbose_name_plural = _("model prices")
        ordering = ["model"]
        constraints = [
            models.CheckConstraint(
                condition=Q(input__gte=0) & Q(output__gte=0) & Q(cache_read__gte=0)
                & Q(cache_write__gte=0),
                name="modelprice_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.model

    @property
    def is_prefix(self) -> bool:
        return self.model.endswith("*")


class UsageBatch(models.Model):
    """What one `/usage-queue` pop returned. The proxy forgets a record once popped, so the
    answer's body is written here the moment it arrives, before it is even parsed: `raw`,
    compressed and sealed with the escrow secret (it holds plaintext client keys; see
    pool.escrow.body_seal). Counting it sets `applied_at` and drops `raw` in the same
    transaction that adds its counts, so a batch is counted exactly once, whenever the process
    dies. What is kept afterwards (for USAGE_BATCH_KEEP_DAYS) are the counts.

    `rows` is how batches were kept before bodies were stored whole (keys already hashed); a
    batch left pending by an older version is still counted from it."""

    created_at = models.DateTimeField(_("popped"), auto_now_add=True)
    raw = models.BinaryField(_("sealed body"), null=True, editable=False)
    size = models.PositiveIntegerField(_("body bytes"), default=0)
    record_count = models.PositiveIntegerField(_("records"), default=0)
    quarantined = models.PositiveIntegerField(_("quarantined"), default=0)
    rows = models.JSONField(_("records (keys hashed)"), null=True, blank=True, editable=False)
    applied_at = models.DateTimeField(_("applied"), null=True, blank=True)
    error = models.TextField(_("error"), blank=True)
    # "<spool file>:<piece size>:<piece>" for a batch imported from the spool
    # (usage/spool.py): unique, so a run that died between this batch's commit and the spool
    # file's removal does not import the same piece twice.
    spool = models.CharField(_("spool piece"), max_length=120, null=True, blank=True,
                             unique=True, editable=False)

    class Meta:
        verbose_name = _("usage queue batch")
        verbose_name_plural = _("usage queue batches")
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["id"], condition=Q(applied_at__isnull=True), name="usagebatch_pending"
            )
        ]

    def __str__(self) -> str:
        return f"#{self.pk} ({self.record_count})"


class QuarantinedRecord(models.Model):
    """A usage record that could not be counted (a token count no request can have, text the
    database cannot store, a time outside 2000-2099, a shape the contract does not allow),
    set aside with the reason so that the rest of its batch is counted and nothing blocks the
    next sync. `record` is the record as ASCII JSON with its client key masked; `key_hash`
    says whose key it was when that could be read."""

    class Source(models.TextChoices):
        QUEUE = "queue", _("usage queue")
        SNAPSHOT = "snapshot", _("usage snapshot")
        RELAY = "relay", _("an upstream's usage log")

    created_at = models.DateTimeField(_("set aside"), auto_now_add=True, db_index=True)
    source = models.CharField(_("source"), max_length=16, choices=Source.choices)
    batch = models.ForeignKey(
        UsageBatch, verbose_name=_("queue batch"), null=True, blank=True,
        on_delete=models.SET_NULL, related_name="+",
    )
    reason = models.CharField(_("reason"), max_length=200)
    key_hash = models.CharField(_("key SHA-256"), max_length=64, blank=True)
    record = models.TextField(_("record (key masked)"), blank=True)

    class Meta:
        verbose_name = _("quarantined usage record")
        verbose_name_plural = _("quarantined usage records")
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.reason}"


class SnapshotCursor(models.Model):
    """How far sync_usage has read one (key, model) list of details in the old generation's
    cumulative `/usage` snapshot. Between proxy restarts a list only grows, and details carry
    nanosecond timestamps: when the detail at position `seen - 1` still has `last_timestamp`,
    the list grew and only the tail is new; otherwise the proxy restarted and it is all new.

    Keyed by the SHA-256 of whatever the proxy keyed the entry by (a client key, or an
    endpoint or provider name for requests without one), so foreign entries are not counted
    again in every report either."""

    key_hash = models.CharField(max_length=64)
    model = models.CharField(max_length=200)
    seen = models.PositiveBigIntegerField(default=0)
    last_timestamp = models.CharField(max_length=64, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["key_hash", "model"], name="snapshotcursor_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.key_hash[:12]} {self.model} @{self.seen}"


class UnissuedKeyUsage(models.Model):
    """Usage showed up on a pool key nobody has been given: staff are told once per key."""

    api_key = models.OneToOneField(ApiKey, on_delete=models.PROTECT, related_name="+")
    flagged_at = models.DateTimeField(auto_now_add=True)
    # Set once the email went out; a sync that died in between sends it on its next pass.
    notified_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return str(self.api_key)


class SyncRun(models.Model):
    """The outcome of one sync_usage run (one pass of --follow), for the status page."""

    started_at = models.DateTimeField(_("started"))
    finished_at = models.DateTimeField(_("finished"))
    ok = models.BooleanField(_("ok"))
    mode = models.CharField(_("mode"), max_length=16, blank=True)
    message = models.TextField(_("message"), blank=True)
    records_read = models.PositiveBigIntegerField(_("read"), default=0)
    records_stored = models.PositiveBigIntegerField(_("stored"), default=0)
    records_foreign = models.PositiveBigIntegerField(_("foreign"), default=0)
    records_unissued = models.PositiveBigIntegerField(_("on unissued keys"), default=0)
    records_quarantined = models.PositiveBigIntegerField(_("quarantined"), default=0)
    records_incomplete = models.PositiveBigIntegerField(_("incomplete"), default=0)
    people = models.PositiveIntegerField(_("people touched"), default=0)
    duration_ms = models.PositiveIntegerField(_("duration (ms)"), default=0)

    class Meta:
        verbose_name = _("usage sync")
        verbose_name_plural = _("usage syncs")
        ordering = ["-started_at", "-id"]

    def __str__(self) -> str:
        return f"{self.started_at:%Y-%m-%d %H:%M:%S} {'ok' if self.ok else 'error'}"


class LimitNotice(models.Model):
    """One row per limit email: subject (a person or a key), limit, window and threshold.
    Inserting the row is how a sender claims the email, so it goes out once per window even
    with several sync processes."""

    subject = models.CharField(_("person or key"), max_length=40)  # "person:12" / "key:34"
    limit = models.CharField(_("limit"), max_length=24)  # e.g. "tokens_day", "cost_month"
    window_start = models.DateTimeField(_("window start"))
    threshold = models.PositiveSmallIntegerField(_("threshold (%)"))
    sent_at = models.DateTimeField(_("sent"), auto_now_add=True)

    class Meta:
        verbose_name = _("limit notice")
        verbose_name_plural = _("limit notices")
        constraints = [
            models.UniqueConstraint(
                fields=["subject", "limit", "window_start", "threshold"],
                name="limitnotice_once_per_window",
            )
        ]

    def __str__(self) -> str:
        return f"{self.subject} {self.limit} {self.threshold}% {self.window_start:%Y-%m-%d}"


_DAY_SUMS = ["total_tokens", "requests", "cost", "unpriced_requests", "incomplete_requests"]


class DayRollup(models.Model):
    """What a day's rollup row sums (UsageDay per person, UsageModelDay per model): the same
    columns, added to by the same upsert."""

    day = models.DateField(_("day"))
    requests = models.PositiveBigIntegerField(_("requests"), default=0)
    total_tokens = models.PositiveBigIntegerField(_("total tokens"), default=0)
    cost = models.DecimalField(
        _("known cost (USD)"), max_digits=COST_DIGITS, decimal_places=COST_PLACES, default=0
    )
    unpriced_requests = models.PositiveBigIntegerField(_("requests without a price"), default=0)
    incomplete_requests = models.PositiveBigIntegerField(_("incomplete requests"), default=0)

    class Meta:
        abstract = True


class UsageDay(DayRollup):
    """One person's usage on one day of the portal's TIME_ZONE: a rollup of UsageSnapshot
    kept by the same upsert that adds to it (usage/services.py `_ingest_rows`), so the
    leaderboard sums thousands of rows instead of millions. Usage on keys nobody holds is
    not in it. `cost` is the known part only; `unpriced_requests` says how much is missing.
    Rebuilt from UsageSnapshot by `usage.rollups.usage_days_rebuild()` (after a price
    recompute or a TIME_ZONE change)."""

    person = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("person"), on_delete=models.CASCADE,
        related_name="usage_days",
        # The unique (person, day) index serves lookups by person; a second index on person
        # alone made SQLite's planner scan every row for a one-day leaderboard.
        db_index=False,
    )

    class Meta:
        verbose_name = _("usage (person × day)")
        verbose_name_plural = _("usage (person × day)")
        constraints = [
            models.UniqueConstraint(
                fields=["person", "day"], name="usageday_one_row_per_person_day"
            ),
        ]
        # Covering, so the leaderboard reads indexes only: grouped by person (long periods,
        # no sort for the GROUP BY) or a range of days first (short periods).
        indexes = [
            models.Index(fields=["person", "day", *_DAY_SUMS], name="usageday_by_person"),
            models.Index(fields=["day", "person", *_DAY_SUMS], name="usageday_by_day"),
        ]

    def __str__(self) -> str:
        return f"{self.person_id} {self.day}"


class DisplayCurrency(models.Model):
    """How costs are shown (one row, set by staff): a currency and its rate to the US dollar.
    Costs are stored and computed in USD whatever this says; pages convert when they show
    them, and the CSV export adds a column. No row: USD."""

    class Code(models.TextChoices):
        USD = "USD", _("US dollar (USD, $)")
        CNY = "CNY", _("Chinese yuan (CNY, ¥)")
        EUR = "EUR", _("Euro (EUR, €)")

    code = models.CharField(_("currency"), max_length=3, choices=Code.choices, default=Code.USD)
    rate = models.DecimalField(
        _("units of this currency per US dollar"), max_digits=12, decimal_places=6, default=1,
        help_text=_("E.g. 7.1 for CNY. Ignored for USD. Costs stay stored in USD."),
    )
    rate_source = models.CharField(_("where the rate comes from"), max_length=200, blank=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("display currency")
        verbose_name_plural = _("display currency")
        constraints = [
            models.CheckConstraint(condition=Q(id=1), name="displaycurrency_single_row"),
            models.CheckConstraint(condition=Q(rate__gt=0), name="displaycurrency_rate_positive"),
        ]

    def __str__(self) -> str:
        return self.code


_MODEL_DAY_SUMS = ["requests", "total_tokens", "cost", "unpriced_requests",
                   "incomplete_requests", "input_tokens", "cached_tokens",
                   "cache_creation_tokens"]


class UsageModelDay(DayRollup):
    """Everyone's usage of one model on one day of the portal's TIME_ZONE: the staff
    dashboard's rollup (trend, top models, cache-hit share), kept by the same upsert as
    UsageDay (usage/services.py `_ingest_rows`) and rebuilt with it
    (`usage.rollups.usage_days_rebuild()`). Like UsageDay, usage on keys nobody holds is not
    in it, so both rollups add up to the same totals. A few hundred rows a month."""

    model = models.CharField(_("model"), max_length=200)
    input_tokens = models.PositiveBigIntegerField(_("uncached input tokens"), default=0)
    cached_tokens = models.PositiveBigIntegerField(_("cache-read tokens"), default=0)
    cache_creation_tokens = models.PositiveBigIntegerField(_("cache-write tokens"), default=0)

    class Meta:
        verbose_name = _("usage (model × day)")
        verbose_name_plural = _("usage (model × day)")
        constraints = [
            # Day first: the dashboard reads a range of days.
            models.UniqueConstraint(fields=["day", "model"], name="usagemodelday_one_row"),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.day}"
