"""A real headless Chromium (Debian's, installed by scripts/browser.sh) driven by Playwright.

Playwright's own browser download needs the internet; the suite uses the system chromium
instead, and fails loudly (never skips) when it is missing: `make setup-dev` installs it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.db import connections

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# Every wait is for a state (a text, a focus, a count), never for a time; how long a state
# may take to come is a deadline, generous because CI machines are busy: Playwright's expect
# gives up after 5 s by default, which a loaded machine rendering /my-keys can pass.
WAIT_MS = 30_000


@pytest.fixture(autouse=True)
def _patient_expect() -> Iterator[None]:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    yield
    expect.set_options(timeout=5_000)


@pytest.fixture
def browser_context_args() -> dict:
    """Options of the browser context `page` opens; a test module overrides this fixture to
    browse with another locale (`{"locale": "zh-CN"}` sends Accept-Language: zh-CN)."""
    return {}


@pytest.fixture
def page(monkeypatch, browser_context_args) -> Iterator:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup-dev` (scripts/browser.sh installs it).")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls the test makes
    # between browser steps are plain synchronous code all the same.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(**browser_context_args)
        context.set_default_timeout(WAIT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()
            # ORM calls made while Playwright's loop ran may have opened a connection of
            # their own; close it, or PostgreSQL refuses to drop the test database.
            connections.close_all()
