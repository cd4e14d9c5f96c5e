"""A fresh install walked in a real browser, from the state `make run` leaves to a person's
first key, with `createsuperuser` as the only shell step (issue 17, point 1).

The portal runs as its own processes, as `make run` starts it: a fresh SQLite file, migrated,
static files collected, gunicorn serving it, settings from the environment only (CLIPROXY_URL
and the management key; CLIPROXY_PUBLIC_URL unset), sign-in emails to files. The proxy is the
real CLIProxyAPI from ../shared when it is there (its usage statistics turned off first, as
the proxy's own default config has them), else the fake one. Everything listens on 127.0.0.1;
every wait is for a state, bounded by a generous deadline."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.fakes.kill_trial import manage_output
from tests.fakes.proxy import FakeProxy
from tests.realproxy import MANAGEMENT_KEY, OPERATOR_KEY, MockUpstream, RealProxy, shared_dir

ROOT = Path(__file__).resolve().parent.parent.parent
STAFF_EMAIL, STAFF_PASSWORD = "first.staff@example.com", "first-run-Pa55word!"
PUBLIC = "https://relay.example.com"
START_DEADLINE = 90.0
LINK = re.compile(r"https?://\S+/(?:login|register)/[\w-]+")
REAL_VERSION = "7.2.140"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_proxy_present() -> bool:
    shared = shared_dir()
    binary = shared / "cliproxyapi" / f"cliproxyapi-{REAL_VERSION}" if shared else None
    return bool(binary and binary.is_file() and os.access(binary, os.X_OK))


class Proxy:
    """The proxy the portal is pointed at: its address, its key list, and whether a client
    key gets an answer there."""

    def __init__(self, stack: ExitStack) -> None:
        self.real = real_proxy_present()
        if self.real:
            upstream = stack.enter_context(MockUpstream())
            self.proxy = stack.enter_context(RealProxy(version=REAL_VERSION, upstream=upstream))
            self.key = MANAGEMENT_KEY
            off = self.proxy.management("PUT", "/usage-statistics-enabled", json={"value": False})
            assert off.status_code == 200, off.text
        else:
            self.key = "first-run-management-key"
            self.proxy = FakeProxy(management_key=self.key, statistics_enabled=False,
                                   api_keys=[OPERATOR_KEY]).start()
            stack.callback(self.proxy.stop)
        self.url = self.proxy.url

    def statistics_enabled(self) -> bool:
        if not self.real:
            return self.proxy.statistics_enabled
        answer = self.proxy.management("GET", "/usage-statistics-enabled")
        return answer.json()["usage-statistics-enabled"]

    def serves(self, value: str) -> bool:
        if self.real:
            self.proxy.wait_for_key(value)
            return self.proxy.claude(value) == 200
        answer = requests.post(f"{self.url}/v1/chat/completions",
                               json={"model": "mock-gpt", "messages": []},
                               headers={"Authorization": f"Bearer {value}"}, timeout=10)
        return answer.status_code == 200


class FreshPortal:
    """The portal as `make run` leaves it, in `workdir`."""

    def __init__(self, workdir: Path, proxy: Proxy) -> None:
        self.workdir = workdir
        self.mail = workdir / "mail"
        self.mail.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("CLIPROXY", "CRS_", "CCH_", "USAGE", "PORTAL", "DATABASE",
                                     "EMAIL", "CACHE", "DJANGO_SUPERUSER"))}
        self.env = {
            **keep,
            "DATABASE_URL": f"sqlite:///{workdir / 'portal.sqlite3'}",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "CLIPROXY_URL": proxy.url,
            "CLIPROXY_MANAGEMENT_KEY": proxy.key,
            # Unset, as in a first .env: people would be given the loopback management URL.
            # Set empty rather than left out, so that a developer's .env cannot fill it in.
            "CLIPROXY_PUBLIC_URL": "",
            "CRS_URL": "", "CCH_URL": "",
            "EMAIL_URL": f"filemail:///{self.mail}",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        self.server: subprocess.Popen[bytes] | None = None
        self.log = workdir / "gunicorn.log"

    def manage(self, *args: str, **extra_env: str) -> str:
        return manage_output({**self.env, **extra_env}, *args)

    def setup(self) -> None:
        """What `make run` does before it serves (its .env is this environment)."""
        self.manage("migrate", "--noinput")
        self.manage("collectstatic", "--noinput", "--verbosity", "0")

    def serve(self) -> None:
        with open(self.log, "wb") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "keyportal.wsgi", "--bind",
                 f"127.0.0.1:{self.port}", "--workers", "2", "--timeout", "60"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                if requests.get(f"{self.url}/login", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the portal did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        return self.log.read_bytes()[-3000:].decode("utf-8", "replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=10)

    def emailed_link(self, to: str) -> str:
        """The one-time link in the newest email to `to`, waited for (the file backend writes
        one file per connection)."""
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            for path in sorted(self.mail.glob("*.log"), key=lambda p: p.stat().st_mtime,
                               reverse=True):
                text = path.read_text(errors="replace")
                if f"To: {to}" in text and LINK.search(text):
                    return LINK.findall(text)[-1]
            time.sleep(0.1)
        raise AssertionError(f"no email with a link reached {to}")


@pytest.fixture
def fresh(tmp_path) -> Iterator[tuple[FreshPortal, Proxy]]:
    with ExitStack() as stack:
        proxy = Proxy(stack)
        portal = FreshPortal(tmp_path, proxy)
        stack.callback(portal.stop)
        portal.setup()
        portal.serve()
        yield portal, proxy


def step(page: Page, name: str):
    return page.locator(f'#getting-started [data-step="{name}"]')


def test_a_fresh_install_walks_the_checklist_to_a_persons_first_key(fresh, page: Page):
    portal, proxy = fresh
    # The only shell step.
    portal.manage("createsuperuser", "--noinput", DJANGO_SUPERUSER_EMAIL=STAFF_EMAIL,
                  DJANGO_SUPERUSER_PASSWORD=STAFF_PASSWORD)

    # Staff sign in with their password and find what is left to do.
    page.goto(f"{portal.url}/admin/")
    page.locator("#id_username").fill(STAFF_EMAIL)
    page.locator("#id_password").fill(STAFF_PASSWORD)
    page.locator("input[type=submit]").click()
    expect(page.locator("#getting-started")).to_have_attribute("data-done", "false")
    for name, done in (("staff", "true"), ("upstream", "true"), ("pool", "false"),
                       ("statistics", "false"), ("sync", "false"), ("public_url", "false")):
        expect(step(page, name)).to_have_attribute("data-done", done)
    expect(step(page, "public_url")).to_contain_text(proxy.url)  # what people would get

    # The public URL, in the admin (no .env edit, no restart).
    step(page, "public_url").get_by_role("link", name="Set the public URL").click()
    page.locator("#id_public_url").fill(PUBLIC)
    page.locator("input[name=_save]").click()
    expect(page.locator(".messagelist")).to_contain_text("answers")  # the save asked it
    page.goto(f"{portal.url}/admin/")
    expect(step(page, "public_url")).to_have_attribute("data-done", "true")
    expect(step(page, "public_url")).to_contain_text(PUBLIC)

    # The pool, with its button.
    step(page, "pool").get_by_role("button", name="Fill the pool").click()
    expect(step(page, "pool")).to_have_attribute("data-done", "true")
    assert page.url == f"{portal.url}/admin/"

    # Usage statistics, on the proxy settings page, through its confirmation.
    step(page, "statistics").get_by_role("link", name="Proxy settings").click()
    row = page.locator("#setting-usage-statistics-enabled")
    expect(row.locator(".current-value")).to_have_text(re.compile("off"))
    row.locator("select[name=value]").select_option("true")
    row.get_by_role("button", name="Change…").click()
    page.get_by_role("button", name="Yes, change it").click()
    expect(page.locator(".messagelist")).to_contain_text("Usage statistics is now on")
    assert proxy.statistics_enabled()
    page.goto(f"{portal.url}/admin/")
    expect(step(page, "statistics")).to_have_attribute("data-done", "true")

    # A sync, with its button; then every step holds and the checklist is one line.
    step(page, "sync").get_by_role("button", name="Sync now").click()
    expect(page.locator(".messagelist")).to_contain_text("usage records")
    expect(page.locator("#getting-started")).to_have_attribute("data-done", "true")
    expect(page.locator("#getting-started")).to_contain_text("every step is done")

    # A person registers by the emailed link and gets their first key, set up for PUBLIC.
    person = page.context.browser.new_context()
    try:
        them = person.new_page()
        them.goto(f"{portal.url}/register")
        them.get_by_label("Email address").fill("dana@example.com")
        them.get_by_label("Key label").fill("laptop")
        them.get_by_role("button", name="Email me the link").click()
        expect(them.get_by_role("heading", name="Check your inbox")).to_be_visible()
        them.goto(portal.emailed_link("dana@example.com"))
        them.get_by_role("button", name="Sign in and show my key").click()
        expect(them.get_by_role("heading", name=re.compile("Your new key"))).to_be_visible()
        value = them.locator("#key-value").inner_text().strip()
        snippet = them.locator("#snippet-claude-env").inner_text()
        assert f"ANTHROPIC_BASE_URL={PUBLIC}" in snippet
        assert f"ANTHROPIC_AUTH_TOKEN={value}" in snippet
        assert "127.0.0.1" not in snippet
    finally:
        person.close()
    # The key the pool gave works at the proxy at once.
    assert proxy.serves(value)
