"""The people's pages on a phone (390 px and 360 px wide) in a real Chromium: nothing wider than
the screen, keys as cards, totals outside any scroller; and at 1280 px the masked key on one
line and the admin index's staff table readable."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from pool.models import ApiKey
from pool.services import key_assign, key_revoke, pool_generate
from pool.upstream import ProxyClient
from tests.usage.conftest import served

PHONE = {"width": 390, "height": 844}
SMALL_PHONE = {"width": 360, "height": 740}
LONG_LABEL = "continuous-integration-runner-for-the-monorepo-" + "x" * 53  # 100, no spaces


def sign_in(page, live_server, user: User) -> None:
    """Signs `user` in in the browser with a session made on the server side (the emailed
    link's own flow is covered by test_self_service)."""
    client = Client()
    client.force_login(user)
    page.context.add_cookies([{
        "name": settings.SESSION_COOKIE_NAME,
        "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
        "url": live_server.url,
    }])


def page_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


def on_screen(page, locator, width: int) -> None:
    box = locator.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box


@pytest.fixture
def dana_with_keys(fake_proxy) -> tuple[User, dict[str, ApiKey]]:
    """A person with several keys: a long label and big numbers, a suspended one, a revoked
    one, one never used."""
    with ProxyClient.from_settings() as client:
        pool_generate(count=6, client=client)
    dana = User.objects.create_user("dana.with.a.rather.long.address@example.com", name="Dana")
    keys = {name: key_assign(user=dana, label=label).key for name, label in [
        ("long", LONG_LABEL), ("laptop", "laptop"), ("suspended", "night jobs"),
        ("revoked", "old"), ("unused", ""),
    ]}
    now = timezone.now()
    served(keys["long"], at=now, requests=3, input_tokens=987_654_321, output_tokens=12_345_678)
    served(keys["laptop"], at=now - timedelta(hours=2), requests=12_345, input_tokens=80_000)
    ApiKey.objects.filter(pk=keys["suspended"].pk).update(
        status=ApiKey.Status.SUSPENDED, suspended_for=ApiKey.SuspendedFor.PERSON_TOKENS_MONTH,
        suspended_until=now + timedelta(days=3),
    )
    key_revoke(key=keys["revoked"], by=dana)
    return dana, keys


def test_sign_in_pages_fit_a_phone(live_server, page):
    for size in (PHONE, SMALL_PHONE):
        page.set_viewport_size(size)
        for path in ("/login", "/register"):
            page.goto(f"{live_server.url}{path}")
            assert page_width(page) <= size["width"], path
        page.get_by_label("Email address").fill("someone@example.com")
        page.get_by_role("button", name="Email me the link").click()
        expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
        assert page_width(page) <= size["width"]


def test_my_keys_fits_a_phone_with_keys_as_cards(live_server, page, dana_with_keys):
    dana, keys = dana_with_keys
    sign_in(page, live_server, dana)
    page.set_viewport_size(PHONE)
    page.goto(f"{live_server.url}/my-keys")

    assert page_width(page) <= 390
    row = page.locator(f"#key-{keys['long'].pk}")
    on_screen(page, row.get_by_role("link", name="Revoke"), 390)
    on_screen(page, row.locator("td.num").first, 390)
    # A card: each cell says what it is.
    assert row.locator("td[data-label=Tokens]").evaluate(
        "cell => getComputedStyle(cell, '::before').content") == '"Tokens"'
    assert row.evaluate("tr => getComputedStyle(tr).display") == "block"
    # The totals are not inside anything that scrolls sideways.
    assert page.locator("dl.totals").evaluate("""dl => {
        for (let e = dl.parentElement; e; e = e.parentElement) {
            const x = getComputedStyle(e).overflowX;
            if (x === 'auto' || x === 'scroll') return false;
        }
        return true; }""")
    on_screen(page, page.locator("dl.totals dd").last, 390)
    # Unused: a dash, not $0.0000; the suspended key says so.
    expect(page.locator(f"#key-{keys['unused'].pk} td[data-label=Cost]")).to_have_text("—")
    expect(page.locator(f"#key-{keys['suspended'].pk}")).to_contain_text(
        "over your monthly token limit")

    # The revoked key is folded away, and fits too once unfolded.
    revoked = page.locator(f"#key-{keys['revoked'].pk}")
    expect(revoked).to_be_hidden()
    page.get_by_text("Revoked (1)").click()
    expect(revoked).to_be_visible()
    assert page_width(page) <= 390

    page.set_viewport_size(SMALL_PHONE)
    assert page_width(page) <= 360

    # The confirm row, in place, fits as well.
    page.set_viewport_size(PHONE)
    row.get_by_role("link", name="Revoke").click()
    yes = row.get_by_role("button", name="Yes, revoke")
    expect(yes).to_be_visible()
    assert page_width(page) <= 390
    on_screen(page, yes, 390)
    on_screen(page, row.get_by_role("link", name="Cancel"), 390)


def test_key_revoke_and_rename_pages_fit_a_phone(live_server, page, dana_with_keys):
    dana, keys = dana_with_keys
    sign_in(page, live_server, dana)
    for size in (PHONE, SMALL_PHONE):
        page.set_viewport_size(size)
        for path in (f"/my-keys/{keys['long'].pk}", f"/my-keys/{keys['laptop'].pk}",
                     f"/my-keys/{keys['long'].pk}/revoke", f"/my-keys/{keys['long'].pk}/rename"):
            page.goto(f"{live_server.url}{path}")
            assert page_width(page) <= size["width"], (path, size)


def test_a_new_key_fits_a_phone(live_server, page, dana_with_keys):
    dana, _keys = dana_with_keys
    sign_in(page, live_server, dana)
    page.set_viewport_size(SMALL_PHONE)
    page.goto(f"{live_server.url}/my-keys")
    page.locator("#add-form input[name=label]").fill("phone")
    page.get_by_role("button", name="Add key").click()
    expect(page.locator("#key-value")).to_be_visible()
    assert page_width(page) <= 360


def test_the_masked_key_stays_on_one_line_at_1280(live_server, page, dana_with_keys):
    dana, keys = dana_with_keys
    sign_in(page, live_server, dana)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/my-keys")
    for key in keys.values():
        if key.status == ApiKey.Status.REVOKED:
            continue
        code = page.locator(f"#key-{key.pk} code.masked")
        lines = code.evaluate("c => c.getClientRects().length")
        height = code.evaluate("c => c.getBoundingClientRect().height")
        line = code.evaluate("c => parseFloat(getComputedStyle(c).lineHeight) || 20")
        assert lines == 1 and height < 1.5 * line, (key.label, lines, height)
    assert page_width(page) <= 1280


def test_staff_pages_fit_a_phone_and_name_their_pages_on_one_line(live_server, page):
    User.objects.create_superuser("boss@example.com", "a-long-password-1")
    page.goto(f"{live_server.url}/admin/login/")
    page.locator("#id_username").fill("boss@example.com")
    page.locator("#id_password").fill("a-long-password-1")
    page.locator("input[type=submit]").click()
    expect(page.locator("#site-name")).to_be_visible()
    for size in ({"width": 1280, "height": 900}, PHONE):
        page.set_viewport_size(size)
        page.goto(f"{live_server.url}/admin/")
        link = page.locator("#staff-pages").get_by_role("link", name="Leaderboard")
        box = link.bounding_box()
        assert box is not None and box["width"] > box["height"] * 3, (size, box)
        assert link.evaluate("a => a.getClientRects().length") == 1
    for path in ("/admin/", "/staff/leaderboard", "/staff/proxy", "/staff/export"):
        page.goto(f"{live_server.url}{path}")
        assert page_width(page) <= PHONE["width"], path
