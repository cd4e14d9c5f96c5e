"""/my-keys with the keyboard alone, in a real Chromium: revoke (focus on "Yes, revoke", the live
region says it, the key folds under "Revoked (1)"), Esc to back out, a disabled button with a
spinner while the proxy is slow, a failure said aloud, rename in place, add without a twin."""

from __future__ import annotations

import re
import threading

import pytest
from playwright.sync_api import expect

from accounts.models import User
from keyportal.models import AuditEvent
from pool.models import ApiKey
from pool.services import key_assign, pool_generate
from pool.upstream import ProxyClient
from tests.browser.conftest import WAIT_MS
from tests.browser.test_phone_layout import sign_in

MAX_TABS = 60


@pytest.fixture
def dana(fake_proxy) -> User:
    with ProxyClient.from_settings() as client:
        pool_generate(count=4, client=client)
    return User.objects.create_user("dana@example.com")


@pytest.fixture
def two_keys(dana) -> tuple[ApiKey, ApiKey]:
    return key_assign(user=dana, label="laptop").key, key_assign(user=dana, label="ci").key


def active_id(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.id")


# htmx is done with the page: no request in flight, nothing swapping or settling. Focus can
# land on a swapped-in field (autofocus) before htmx has settled it; an Enter pressed then is
# a plain form submission, not htmx's (seen once in a full run under load).
HTMX_IDLE = ("() => !document.querySelector("
             "'.htmx-request, .htmx-swapping, .htmx-settling, .htmx-added')")


def press_when_idle(page, key: str) -> None:
    """Presses `key` once htmx has finished with the page (see HTMX_IDLE)."""
    page.wait_for_function(HTMX_IDLE)
    page.keyboard.press(key)


def tab_to(page, element_id: str) -> None:
    """Presses Tab from the top of the page until `element_id` has the focus."""
    for _ in range(MAX_TABS):
        page.keyboard.press("Tab")
        if active_id(page) == element_id:
            return
    raise AssertionError(f"Tab never reached #{element_id}")


def focused(page):
    return page.locator("*:focus")


def open_my_keys(page, live_server, user: User) -> None:
    sign_in(page, live_server, user)
    page.goto(f"{live_server.url}/my-keys")
    page.wait_for_load_state("load")


def test_revoke_with_the_keyboard_alone(live_server, page, dana, two_keys):
    laptop, ci = two_keys
    open_my_keys(page, live_server, dana)

    tab_to(page, f"revoke-{laptop.pk}")
    press_when_idle(page, "Enter")
    row = page.locator(f"#key-{laptop.pk}.confirm")
    expect(row).to_contain_text("cannot be brought back")
    expect(focused(page)).to_have_text("Yes, revoke")
    # Tab reaches Cancel, Shift+Tab comes back.
    page.keyboard.press("Tab")
    expect(focused(page)).to_have_text("Cancel")
    page.keyboard.press("Shift+Tab")
    expect(focused(page)).to_have_text("Yes, revoke")

    press_when_idle(page, "Enter")
    status = page.locator("#key-status")
    expect(status).to_have_text(f"Key {laptop.masked} is revoked.")
    assert status.get_attribute("aria-live") == "polite"
    summary = page.locator("details.revoked summary")
    expect(summary).to_have_text("Revoked (1)")
    expect(summary).to_be_focused()
    expect(page.locator(f"details.revoked #key-{laptop.pk} .status")).to_have_text("revoked")
    expect(page.locator(f"#key-{ci.pk}")).to_be_visible()  # the other key stays live
    assert page.url.endswith("/my-keys")
    laptop.refresh_from_db()
    assert laptop.status == ApiKey.Status.REVOKED
    # Enter on the summary unfolds the revoked keys.
    press_when_idle(page, "Enter")
    expect(page.locator(f"#key-{laptop.pk}")).to_be_visible()


def test_escape_backs_out_and_focus_returns_to_revoke(live_server, page, dana, two_keys):
    laptop, _ci = two_keys
    open_my_keys(page, live_server, dana)

    tab_to(page, f"revoke-{laptop.pk}")
    press_when_idle(page, "Enter")
    expect(focused(page)).to_have_text("Yes, revoke")
    press_when_idle(page, "Escape")
    expect(page.locator(f"#key-{laptop.pk}.confirm")).to_have_count(0)
    expect(page.locator(f"#key-{laptop.pk}")).to_contain_text("laptop")
    expect(page.locator(f"#revoke-{laptop.pk}")).to_be_focused()
    # And the row works again after being put back.
    press_when_idle(page, "Enter")
    expect(focused(page)).to_have_text("Yes, revoke")
    page.locator(f"#key-{laptop.pk}").get_by_role("link", name="Cancel").click()
    expect(page.locator(f"#revoke-{laptop.pk}")).to_be_focused()
    laptop.refresh_from_db()
    assert laptop.status == ApiKey.Status.ACTIVE


def test_while_the_proxy_is_slow_the_button_is_disabled_and_spins(
    live_server, page, dana, two_keys, fake_proxy, settings
):
    # The proxy holds its answer until the checks below are done (not for a guessed 1.5 s
    # that a busy machine can outlast), then fails: the removal stays pending.
    settings.PORTAL_REQUEST_PROXY_BUDGET = settings.CLIPROXY_TIMEOUT = 60
    laptop, _ci = two_keys
    open_my_keys(page, live_server, dana)
    page.locator(f"#revoke-{laptop.pk}").click()
    yes = page.get_by_role("button", name="Yes, revoke")
    spinner = yes.locator(".spinner")
    expect(spinner).to_be_hidden()
    stalled = threading.Event()
    fake_proxy.inject("/api-keys", status=503, hold=stalled, times=5)

    try:
        yes.click()
        expect(yes).to_be_disabled()
        expect(spinner).to_be_visible()
        expect(spinner).to_have_css("animation-name", "spin")
    finally:
        stalled.set()
    expect(page.locator("#key-status")).to_have_text(f"Key {laptop.masked} is revoked.")
    expect(page.locator(f"#key-{laptop.pk}")).to_contain_text("removal from the proxy pending")


def test_a_failed_revoke_is_said_in_the_live_region(live_server, page, dana, two_keys):
    laptop, _ci = two_keys
    open_my_keys(page, live_server, dana)
    page.locator(f"#revoke-{laptop.pk}").click()
    yes = page.get_by_role("button", name="Yes, revoke")
    expect(yes).to_be_focused()
    # Meanwhile the key is no longer this person's: the POST answers 404.
    ApiKey.objects.filter(pk=laptop.pk).update(owner=User.objects.create_user("eve@example.com"))
    yes.click()
    expect(page.locator("#key-status")).to_have_text(re.compile("That did not work"))
    expect(yes).to_be_enabled()  # the person can try again or cancel
    laptop.refresh_from_db()
    assert laptop.status == ApiKey.Status.ACTIVE


def test_rename_in_place_with_the_keyboard(live_server, page, dana, two_keys):
    laptop, _ci = two_keys
    open_my_keys(page, live_server, dana)

    tab_to(page, f"rename-{laptop.pk}")
    press_when_idle(page, "Enter")
    field = page.locator(f"#rename-{laptop.pk}-label")
    expect(field).to_be_focused()
    expect(field).to_have_value("laptop")
    press_when_idle(page, "Escape")  # backs out, nothing changed
    expect(page.locator(f"#rename-{laptop.pk}")).to_be_focused()

    press_when_idle(page, "Enter")
    expect(field).to_be_focused()
    field.fill("bad\x1blabel")
    press_when_idle(page, "Enter")
    expect(page.locator(f"#key-{laptop.pk} .errorlist")).to_contain_text("control characters")
    expect(page.locator(f"#rename-{laptop.pk}-label")).to_be_focused()

    page.locator(f"#rename-{laptop.pk}-label").fill("work laptop")
    press_when_idle(page, "Enter")
    expect(page.locator(f"#key-{laptop.pk} th.label")).to_have_text("work laptop")
    expect(page.locator("#key-status")).to_have_text(
        f"Key {laptop.masked} is now labelled “work laptop”.")
    expect(page.locator(f"#rename-{laptop.pk}")).to_be_focused()
    laptop.refresh_from_db()
    assert laptop.label == "work laptop"
    assert AuditEvent.objects.filter(action=AuditEvent.Action.KEY_RENAMED).count() == 1


def test_adding_a_key_empties_the_label_so_enter_cannot_issue_a_twin(live_server, page, dana):
    open_my_keys(page, live_server, dana)
    field = page.locator("#add-form input[name=label]")
    field.fill("ci")
    field.press("Enter")
    expect(page.locator("#key-value")).to_be_visible()
    expect(page.locator("#issued h2")).to_be_focused()
    expect(page.locator("#add-form input[name=label]")).to_have_value("")
    assert ApiKey.objects.filter(owner=dana, label="ci").count() == 1
    expect(page.locator("#key-table")).to_contain_text("ci")


@pytest.fixture
def nojs_page(page):
    """A second tab in the same browser with JavaScript off: htmx never runs."""
    context = page.context.browser.new_context(java_script_enabled=False)
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_without_javascript_everything_is_a_plain_page(live_server, nojs_page, dana, two_keys):
    page = nojs_page
    laptop, _ci = two_keys
    open_my_keys(page, live_server, dana)
    page.set_viewport_size({"width": 390, "height": 844})

    page.locator("#add-form input[name=label]").fill("phone")
    page.get_by_role("button", name="Add key").click()
    expect(page.locator("#key-value")).to_be_visible()  # the full "your new key" page
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    page.goto(f"{live_server.url}/my-keys")
    page.locator(f"#rename-{laptop.pk}").click()
    expect(page).to_have_url(re.compile(f"/my-keys/{laptop.pk}/rename$"))
    page.get_by_label("Label").fill("old laptop")
    page.get_by_role("button", name="Save").click()
    expect(page).to_have_url(re.compile("/my-keys$"))
    expect(page.locator(".messages")).to_contain_text("is now labelled “old laptop”")

    page.locator(f"#revoke-{laptop.pk}").click()
    expect(page).to_have_url(re.compile(f"/my-keys/{laptop.pk}/revoke$"))
    page.get_by_role("button", name="Revoke").click()
    expect(page).to_have_url(re.compile("/my-keys$"))
    expect(page.locator(".messages")).to_contain_text(f"Key {laptop.masked} is revoked.")
    expect(page.locator("details.revoked summary")).to_have_text("Revoked (1)")
    laptop.refresh_from_db()
    assert (laptop.status, laptop.label) == (ApiKey.Status.REVOKED, "old laptop")
