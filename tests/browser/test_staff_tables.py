"""The staff changelists fit the admin's content column in a real Chromium: at 1280 px no
table is wider than its column (nothing off-screen, the masked key on one line); at 390 px the
page itself never scrolls sideways, only the table inside its own scrolling wrapper
(`.results`). Filled like a real portal: long addresses and labels, many keys, pool keys,
usage with cost, audit rows with long targets, the shipped model prices."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from keyportal.audit import audit_record
from keyportal.models import AuditEvent
from pool.models import ApiKey, Upstream
from pool.services import pool_keys_create
from tests.usage.conftest import issue, served
from usage.models import ModelPrice, SyncRun

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
LISTS = ("/admin/pool/apikey/", "/admin/pool/apikey/?whose=pool", "/admin/keyportal/auditevent/",
         "/admin/usage/modelprice/", "/admin/accounts/user/", "/admin/usage/usagesnapshot/",
         "/admin/usage/syncrun/", "/admin/pool/upstream/")
PASSWORD = "a-long-password-1"


@pytest.fixture
def busy_portal(db) -> User:
    """30 people with long addresses and labels, 45 issued keys with usage, 20 pool keys,
    audit rows naming them, a price for each model used."""
    boss = User.objects.create_superuser("operations.lead.for.the.platform@example-company.com",
                                         PASSWORD)
    emails = [f"firstname.lastname.number{n:02d}@engineering.example-company.com"
              for n in range(30)]
    now = timezone.now()
    for n, held in enumerate(issue(45, emails)):
        key = held.key
        ApiKey.objects.filter(pk=key.pk).update(
            label=f"ci-runner-for-the-monorepo-build-farm-{n:03d}", issued_at=now)
        served(key, at=now - timedelta(hours=n), model="claude-sonnet-4-5-20250929",
               requests=100 + n, input_tokens=123_456_789, output_tokens=9_876_543)
        audit_record(action=AuditEvent.Action.LIMITS_CHANGED, actor=boss, target=key,
                     before={"limit_cost_day": None}, after={"limit_cost_day": "25.00"},
                     ip="2001:db8:85a3::8a2e:370:7334")
    pool_keys_create(count=20)
    for kind, name in ((Upstream.Kind.CRS, "claude-relay-service (Shanghai office)"),
                       (Upstream.Kind.CCH, "Claude Code Hub for the data team")):
        Upstream.objects.create(
            name=name, kind=kind, username="admin", secret="s3cret-for-the-test",
            management_url=f"http://{kind}-relay.internal.example-company.com:3000",
            public_url=f"https://{kind}-relay.public.example-company.com/api")
    for n in range(5):
        SyncRun.objects.create(
            started_at=now - timedelta(minutes=n), finished_at=now, ok=n != 2, mode="queue",
            records_read=123_456, records_stored=123_000, records_foreign=12, people=30,
            duration_ms=4321, message="" if n != 2 else (
                "The proxy at http://cliproxyapi.internal.example-company.com:8317 did not "
                "answer within 10 s (ReadTimeout); nothing was written, the next run retries."))
    ModelPrice.objects.update_or_create(model="claude-sonnet-4-5-20250929", defaults={
        "input": Decimal("3"), "output": Decimal("15"), "cache_read": Decimal("0.3"),
        "cache_write": Decimal("3.75"), "source": "https://www.anthropic.com/pricing#api-prices"})
    return boss


def sign_in_staff(page, live_server, email: str) -> None:
    page.goto(f"{live_server.url}/admin/login/")
    page.locator("#id_username").fill(email)
    page.locator("#id_password").fill(PASSWORD)
    page.locator("input[type=submit]").click()
    expect(page.locator("#site-name")).to_be_visible()


def overflow(page) -> dict:
    """The changelist table's width against its column's, and the page's against the window."""
    return page.evaluate("""() => {
        const table = document.querySelector('#result_list');
        const wrap = table && table.closest('.results');
        return {table: table ? table.scrollWidth : 0, column: wrap ? wrap.clientWidth : 0,
                rows: table ? table.tBodies[0].rows.length : 0,
                cols: table ? [...table.tHead.rows[0].cells].map(c => c.className + ':' + Math.round(c.getBoundingClientRect().width)) : [],
                page: document.documentElement.scrollWidth,
                wrapScrolls: wrap ? getComputedStyle(wrap).overflowX : ''};
    }""")


def test_staff_lists_fit_the_column_at_1280_and_scroll_only_inside_at_390(
        live_server, page, busy_portal):
    sign_in_staff(page, live_server, busy_portal.email)
    for path in LISTS:
        page.set_viewport_size(DESKTOP)
        page.goto(f"{live_server.url}{path}")
        expect(page.locator("#changelist")).to_be_visible()
        seen = overflow(page)
        assert seen["rows"] > 0, path
        assert seen["table"] <= seen["column"], (path, seen["table"], seen["column"], seen["cols"])
        assert seen["page"] <= DESKTOP["width"], (path, seen)

        page.set_viewport_size(PHONE)
        seen = overflow(page)
        assert seen["page"] <= PHONE["width"], (path, seen)
        assert seen["wrapScrolls"] in ("auto", "scroll"), (path, seen)


def test_the_masked_key_and_dates_stay_on_one_line_at_1280(live_server, page, busy_portal):
    sign_in_staff(page, live_server, busy_portal.email)
    page.set_viewport_size(DESKTOP)
    page.goto(f"{live_server.url}/admin/pool/apikey/")
    cells = page.locator("#result_list tbody td.field-masked, #result_list tbody th.field-masked")
    expect(cells.first).to_be_visible()
    assert cells.count() > 20
    for i in range(cells.count()):
        assert cells.nth(i).evaluate("c => c.getClientRects().length === 1 && "
                                     "c.scrollWidth <= c.clientWidth + 1"), i
    # Each visible cell is on the screen, none past the window's right edge.
    right = page.evaluate("""() => Math.max(...[...document.querySelectorAll(
        '#result_list th, #result_list td')].map(c => c.getBoundingClientRect().right))""")
    assert right <= DESKTOP["width"]
    # Issued keys only by default; the pool's are one click away, with their count.
    assert ApiKey.objects.filter(owner__isnull=True).count() == 20
    expect(page.locator("#changelist")).not_to_contain_text("(nobody")
    pool = page.get_by_role("link", name="Pool (unissued): 20")
    expect(pool).to_be_visible()
