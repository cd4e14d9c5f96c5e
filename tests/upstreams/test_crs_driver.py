"""The claude-relay-service driver (pool/upstreams/crs_driver.py) against the fake CRS
(tests/fakes/crs.py): what the portal's limits become there, issue / revoke / switch through
the portal's services and reconcile, and usage read since a cursor, each request once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from io import StringIO

import pytest
import requests
from django.core.management import call_command

from pool.models import ApiKey, Upstream
from pool.services import key_assign, key_resume, key_revoke, key_suspend
from pool.upstream import UpstreamNotConfigured, UpstreamUnexpected
from pool.upstreams import registry
from pool.upstreams.base import RelayLimits
from pool.upstreams.crs import Limits
from pool.upstreams.crs_driver import (
    MAX_RECORDS,
    SMALLEST_LIMIT,
    CrsDriver,
    crs_limits,
    key_name,
)
from pool.upstreams.relays import relays_reconcile
from usage.models import UsageSnapshot
from usage.relays import relay_usage_sync
from usage.services import Books, _ingest_rows, _quarantine

from tests.fakes.crs import MODEL, PASSWORD, USAGE, USERNAME, FakeCrs

Status = ApiKey.Status
SMALL = {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 7,
         "cache_creation_input_tokens": 11}


@pytest.fixture
def fake() -> Iterator[FakeCrs]:
    server = FakeCrs().start()
    yield server
    server.stop()


@pytest.fixture
def crs(fake: FakeCrs, settings, db) -> Upstream:
    """The portal on claude-relay-service alone (no CLIProxyAPI)."""
    settings.CLIPROXY_URL = ""
    settings.CRS_URL = fake.url
    settings.CRS_ADMIN_USERNAME = USERNAME
    settings.CRS_ADMIN_PASSWORD = PASSWORD
    (upstream,) = registry.relays()
    return upstream


def _message(fake: FakeCrs, value: str) -> int:
    return requests.post(f"{fake.url}/api/v1/messages", headers={"x-api-key": value},
                         json={"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]},
                         timeout=5).status_code


def _sync() -> str:
    out = StringIO()
    call_command("sync_usage", stdout=out, stderr=StringIO())
    return out.getvalue()


def _totals(key: ApiKey) -> tuple[int, int, int, int, int]:
    rows = UsageSnapshot.objects.filter(api_key=key)
    return (sum(r.requests for r in rows), sum(r.input_tokens for r in rows),
            sum(r.output_tokens for r in rows), sum(r.cached_tokens for r in rows),
            sum(r.cache_creation_tokens for r in rows))


# --- limits mapping -------------------------------------------------------------------------


def test_day_cost_becomes_crs_daily_cost_limit() -> None:
    assert crs_limits(RelayLimits(cost_day=Decimal("2.50"))) == Limits(
        daily_cost_limit=Decimal("2.50"))


def test_month_cost_caps_the_daily_limit_when_smaller() -> None:
    # No day can spend more than the month allows: CRS refuses nothing the portal would allow.
    assert crs_limits(RelayLimits(cost_day=Decimal(5), cost_month=Decimal(3))).daily_cost_limit \
        == Decimal(3)
    assert crs_limits(RelayLimits(cost_month=Decimal(40))).daily_cost_limit == Decimal(40)
    assert crs_limits(RelayLimits(cost_day=Decimal(1), cost_month=Decimal(40))
                      ).daily_cost_limit == Decimal(1)


def test_token_limits_are_not_sent_to_crs() -> None:
    # CRS's token limit only lives in a rolling window: left to the portal's suspension.
    assert crs_limits(RelayLimits(tokens_day=1000, tokens_month=50_000)) == Limits()


def test_a_zero_limit_is_the_smallest_positive_one_not_crs_no_limit() -> None:
    assert crs_limits(RelayLimits(cost_day=Decimal(0))).daily_cost_limit == SMALLEST_LIMIT


def test_expiry_is_sent() -> None:
    at = datetime(2027, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert crs_limits(RelayLimits(expires_at=at)).expires_at == at


def test_key_name_fits_crs_100_code_units() -> None:
    assert key_name("ann@example.com", "laptop") == "ann@example.com · laptop"
    assert key_name("ann@example.com", "  ") == "ann@example.com"
    long = key_name("a" * 60 + "@example.com", "😀" * 40)
    assert len(long.encode("utf-16-le")) // 2 <= 100


# --- keys through the portal ----------------------------------------------------------------


@pytest.mark.django_db
def test_issued_key_works_at_once_with_the_persons_limits_and_expiry(crs, fake, ann) -> None:
    ann.limit_cost_day, ann.limit_cost_month = Decimal("4.00"), Decimal("3.00")
    ann.save()
    issued = key_assign(user=ann, label="laptop " + "x" * 90)  # with the email: over 100
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert issued.value.startswith("cr_") and key.upstream == crs
    assert _message(fake, issued.value) == 200
    at_crs = fake.keys[key.remote_id]
    assert at_crs["dailyCostLimit"] == 3.0  # the month's limit caps the day's
    assert (at_crs["tokenLimit"], at_crs["totalCostLimit"], at_crs["rateLimitWindow"]) == (
        0, 0, 0)
    assert at_crs["name"].startswith("ann@example.com · laptop") and len(at_crs["name"]) <= 100
    if key.expires_at is None:
        assert at_crs["expiresAt"] == ""
    else:
        assert datetime.fromisoformat(at_crs["expiresAt"].replace("Z", "+00:00")) == \
            key.expires_at.replace(microsecond=key.expires_at.microsecond // 1000 * 1000)


@pytest.mark.django_db
def test_revoked_key_is_deleted_at_crs_and_refused(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    key_revoke(key=issued.key, by=ann)
    relays_reconcile()
    assert fake.keys[issued.key.remote_id]["isDeleted"] is True
    assert _message(fake, issued.value) == 401
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert key.proxy_state == ApiKey.ProxyState.REMOVED
    # Once more: nothing to do, nothing sent.
    before = len(fake.admin_requests)
    (report,) = relays_reconcile()
    assert not report.changed and len(fake.admin_requests) == before


@pytest.mark.django_db
def test_revoking_a_key_already_gone_at_crs_is_no_error(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    del fake.keys[issued.key.remote_id]  # removed there by hand
    key_revoke(key=issued.key, by=ann)
    (report,) = relays_reconcile()
    assert report.errors == [] and report.revoked == 1
    assert ApiKey.objects.get(pk=issued.key.pk).proxy_state == ApiKey.ProxyState.REMOVED


@pytest.mark.django_db
def test_suspend_switches_off_and_resume_on(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    key_suspend(key=issued.key, reason=ApiKey.SuspendedFor.STAFF)
    (report,) = relays_reconcile()
    assert report.switched_off == 1 and _message(fake, issued.value) == 401
    key_resume(key=ApiKey.objects.get(pk=issued.key.pk))
    (report,) = relays_reconcile()
    assert report.switched_on == 1 and _message(fake, issued.value) == 200


@pytest.mark.django_db
def test_a_limit_pushed_to_a_suspended_key_with_an_expiry_does_not_wake_it(crs, fake, ann
                                                                           ) -> None:
    """CRS's PUT turns an expiry into isActive (a date ahead: on); the driver sends the
    key's state in the same PUT, so a suspended key stays off."""
    issued = key_assign(user=ann, label="")
    ApiKey.objects.filter(pk=issued.key.pk).update(
        expires_at=datetime.now(timezone.utc) + timedelta(days=30))
    key_suspend(key=ApiKey.objects.get(pk=issued.key.pk), reason=ApiKey.SuspendedFor.STAFF)
    relays_reconcile()
    ann.limit_cost_day = Decimal("9.00")
    ann.save()
    (report,) = relays_reconcile()
    assert report.limits_pushed == 1
    assert fake.keys[issued.key.remote_id]["dailyCostLimit"] == 9.0
    assert fake.keys[issued.key.remote_id]["expiresAt"]
    assert _message(fake, issued.value) == 401


@pytest.mark.django_db
def test_an_expiry_removed_in_the_portal_is_cleared_at_crs(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    ApiKey.objects.filter(pk=issued.key.pk).update(
        expires_at=datetime.now(timezone.utc) + timedelta(days=1))
    relays_reconcile()
    assert fake.keys[issued.key.remote_id]["expiresAt"]
    ApiKey.objects.filter(pk=issued.key.pk).update(expires_at=None)
    relays_reconcile()
    assert fake.keys[issued.key.remote_id]["expiresAt"] == ""
    assert _message(fake, issued.value) == 200


@pytest.mark.django_db
def test_driver_without_credentials_says_so(settings, fake, db) -> None:
    upstream = Upstream.objects.create(name="crs2", kind="crs", management_url=fake.url,
                                       username="", secret="")
    driver = CrsDriver(upstream)
    with pytest.raises(UpstreamNotConfigured):
        driver.usage_read(keys=[ApiKey(remote_id="x" * 8, prefix="cr_abc", last4="1234")],
                          cursor={})
    assert driver.health().ok is False


@pytest.mark.django_db
def test_health(crs, fake, settings) -> None:
    health = CrsDriver(crs).health()
    assert health.ok and health.version == "1.1.314"
    settings.CRS_ADMIN_PASSWORD = "wrong-secret-pass"
    health = CrsDriver(crs).health()
    assert not health.ok and "wrong-secret-pass" not in health.detail


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_usage_is_attributed_exactly_and_read_twice_counted_once(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    for _ in range(3):
        assert _message(fake, issued.value) == 200
    _sync()
    key = issued.key
    expected = (3, 3 * USAGE["input_tokens"], 3 * USAGE["output_tokens"],
                3 * USAGE["cache_read_input_tokens"], 3 * USAGE["cache_creation_input_tokens"])
    assert _totals(key) == expected
    row = UsageSnapshot.objects.get(api_key=key)
    assert row.model == MODEL and row.cost == 3 * Decimal("0.01155")  # the portal's price
    _sync()
    assert _totals(key) == expected  # the same records, read again, counted once


@pytest.mark.django_db
def test_identical_records_in_the_cursors_millisecond_count_once_each(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    remote = issued.key.remote_id
    at = datetime.now(timezone.utc).replace(microsecond=123000)
    for _ in range(3):
        fake.record(remote, SMALL, at=at)
    _sync()
    assert _totals(issued.key)[0] == 3
    # Two more identical ones in the very same millisecond (inclusive startDate returns all
    # five): only the two are new.
    fake.record(remote, SMALL, at=at)
    fake.record(remote, SMALL, at=at)
    _sync()
    assert _totals(issued.key) == (5, 15, 25, 35, 55)
    # And one a little earlier than the newest, written late (as another CRS process may).
    fake.record(remote, SMALL, at=at - timedelta(seconds=5))
    _sync()
    assert _totals(issued.key)[0] == 6


@pytest.mark.django_db
def test_a_crash_between_read_and_commit_counts_nothing_and_the_rerun_counts_once(
    crs, fake, ann
) -> None:
    issued = key_assign(user=ann, label="")
    for _ in range(2):
        _message(fake, issued.value)

    def ingest_then_die(rows):  # type: ignore[no-untyped-def]
        _ingest_rows(rows, books=_books())
        raise RuntimeError("killed between the counts and the commit")

    with pytest.raises(RuntimeError):
        relay_usage_sync(crs, ingest=ingest_then_die, quarantine=lambda aside: None)
    assert _totals(issued.key)[0] == 0
    assert Upstream.objects.get(pk=crs.pk).usage_cursor == {}
    _sync()
    _sync()
    assert _totals(issued.key)[0] == 2


def _books():  # the books usage.services' ingest takes
    return Books.load()


@pytest.mark.django_db
def test_more_than_200_requests_between_syncs_are_said_without_the_key(crs, fake, ann
                                                                        ) -> None:
    issued = key_assign(user=ann, label="")
    remote = issued.key.remote_id
    start = datetime.now(timezone.utc) - timedelta(minutes=30)
    fake.record(remote, SMALL, at=start)
    _sync()
    for i in range(MAX_RECORDS - 1):
        fake.record(remote, SMALL, at=start + timedelta(seconds=1 + i))
    quiet = _sync()
    assert "may have been lost" not in quiet  # the first record is still there: nothing lost
    assert _totals(issued.key)[0] == MAX_RECORDS
    for i in range(MAX_RECORDS + 50):
        fake.record(remote, SMALL, at=start + timedelta(seconds=300 + i))
    told = _sync()
    assert "may have been lost" in told and issued.value not in told
    assert issued.key.masked in told
    assert _totals(issued.key)[0] == 2 * MAX_RECORDS  # what CRS kept, once


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["malformed", "500"])
def test_garbage_from_crs_counts_nothing_and_keeps_the_cursor(crs, fake, ann, fault) -> None:
    issued = key_assign(user=ann, label="")
    _message(fake, issued.value)
    fake.inject(f"/admin/api-keys/{issued.key.remote_id}/usage-records", fault)
    with pytest.raises(UpstreamUnexpected):
        relay_usage_sync(crs, ingest=lambda rows: _ingest_rows(rows, books=_books()),
                         quarantine=lambda aside: _quarantine(aside, source="relay"))
    assert _totals(issued.key)[0] == 0 and Upstream.objects.get(pk=crs.pk).usage_cursor == {}
    _sync()
    assert _totals(issued.key)[0] == 1


@pytest.mark.django_db
def test_a_record_of_the_wrong_shape_counts_nothing(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    _message(fake, issued.value)
    record = fake.record(issued.key.remote_id, SMALL)
    record["inputTokens"] = -4  # a count no request has
    driver = CrsDriver(crs)
    with pytest.raises(UpstreamUnexpected):
        driver.usage_read(keys=[ApiKey.objects.get(pk=issued.key.pk)], cursor={})


@pytest.mark.django_db
def test_a_cursor_this_code_did_not_write_stops_the_read(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    driver = CrsDriver(crs)
    for cursor in ({"keys": {}}, {"v": 1, "keys": {issued.key.remote_id: {"since": "soon"}}}):
        with pytest.raises(UpstreamUnexpected):
            driver.usage_read(keys=[ApiKey.objects.get(pk=issued.key.pk)], cursor=cursor)


@pytest.mark.django_db
def test_token_split_and_relay_cost(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    _message(fake, issued.value)
    read = CrsDriver(crs).usage_read(keys=[ApiKey.objects.get(pk=issued.key.pk)], cursor={})
    (rec,) = read.records
    assert (rec.uncached, rec.cache_read, rec.cache_write, rec.output, rec.reasoning) == (
        USAGE["input_tokens"], USAGE["cache_read_input_tokens"],
        USAGE["cache_creation_input_tokens"], USAGE["output_tokens"], 0)
    assert rec.relay_cost == Decimal("0.01155") and rec.model == MODEL and not rec.failed
    key_entry = read.cursor["keys"][issued.key.remote_id]
    assert key_entry["seen"] and datetime.fromisoformat(key_entry["since"]) < rec.at


@pytest.mark.django_db
def test_a_key_crs_no_longer_knows_is_said_and_the_others_are_read(crs, fake, ann, bob
                                                                   ) -> None:
    gone = key_assign(user=ann, label="")
    kept = key_assign(user=bob, label="")
    _message(fake, kept.value)
    del fake.keys[gone.key.remote_id]
    out = _sync()
    assert gone.key.masked in out and "no longer" in out
    assert _totals(kept.key)[0] == 1


@pytest.mark.django_db
def test_a_url_that_is_not_crs_is_an_error_not_a_key_already_gone(crs, fake, ann, settings
                                                                 ) -> None:
    """Every path 404s there: a revoke must not pass for "already removed at CRS", nor a
    read for "the key is gone"."""
    issued = key_assign(user=ann, label="")
    settings.CRS_URL = fake.url + "/elsewhere"
    key_revoke(key=issued.key, by=ann)
    (report,) = relays_reconcile()
    assert report.errors and "no admin login" in report.errors[0]
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert key.proxy_state != ApiKey.ProxyState.REMOVED
    with pytest.raises(UpstreamUnexpected):
        CrsDriver(crs).usage_read(keys=[key], cursor={})
    settings.CRS_URL = fake.url
    relays_reconcile()
    assert fake.keys[key.remote_id]["isDeleted"] is True


@pytest.mark.django_db(transaction=True)  # CRS follows when the admin's edit commits
def test_a_limit_lowered_in_the_admin_reaches_crs_without_a_reconcile(crs, fake, admin_client
                                                                      ) -> None:
    from accounts.models import User  # noqa: PLC0415

    carol = User.objects.create_user("carol@example.com", name="Carol")
    issued = key_assign(user=carol, label="")
    form = {"email": carol.email, "name": carol.name, "is_active": "on",
            "limit_tokens_day": "", "limit_tokens_month": "", "limit_cost_day": "0.50",
            "limit_cost_month": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    saved = admin_client.post(f"/admin/accounts/user/{carol.pk}/change/", form)
    assert saved.status_code == 302
    assert fake.keys[issued.key.remote_id]["dailyCostLimit"] == 0.5
    (report,) = relays_reconcile()
    assert not report.changed  # nothing left to push


# --- CRS away when a key is asked for -----------------------------------------------------------


@pytest.mark.django_db
def test_registration_while_crs_is_away_says_so_and_the_link_works_later(crs, fake, client,
                                                                         settings) -> None:
    from accounts.models import User  # noqa: PLC0415
    from tests.accounts.mailbox import emailed_path  # noqa: PLC0415

    client.post("/register", {"email": "dan@example.com", "name": "Dan", "label": "laptop"})
    link = emailed_path()
    settings.CRS_URL = "http://127.0.0.1:9"  # nothing listens there
    page = client.post(link)
    assert page.status_code == 503
    text = page.content.decode()
    assert "could not make a key just now" in text and "127.0.0.1:9" not in text
    assert not User.objects.filter(email="dan@example.com").exists()
    settings.CRS_URL = fake.url
    page = client.post(link, follow=True)
    assert page.status_code == 200 and 'id="key-value">cr_' in page.content.decode()


@pytest.mark.django_db
def test_adding_a_key_while_crs_is_away_keeps_the_form_with_the_reason(crs, client, ann,
                                                                        settings) -> None:
    settings.CRS_URL = "http://127.0.0.1:9"
    client.force_login(ann)
    page = client.post("/my-keys/add", {"label": "ci"})
    assert page.status_code == 503
    assert "could not make a key just now" in page.content.decode()
    answer = client.post("/api/register-key", {"label": "ci"}, content_type="application/json")
    assert answer.status_code == 503 and "could not make a key" in answer.json()["error"]
    assert not ApiKey.objects.filter(owner=ann).exists()


@pytest.mark.django_db
def test_a_sync_and_a_reconcile_leave_no_admin_session_behind(crs, fake, ann) -> None:
    issued = key_assign(user=ann, label="")
    _message(fake, issued.value)
    key_suspend(key=issued.key, reason=ApiKey.SuspendedFor.STAFF)
    relays_reconcile()
    _sync()
    assert fake.sessions == set()
