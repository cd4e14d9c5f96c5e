"""The browser half of scripts/screenshots.sh: signs in to a running demo portal (seeded
by `manage.py seed_demo`) and writes full-page PNGs of the main pages at two widths and in
each locale asked for: `<page>-<width>-<locale>.png` (dashboard-1280-en.png, keys-390-zh-CN.png).

It also measures what the shots are looked at for, and exits non-zero naming the page when
a table is wider than its column (an admin list), the page is wider than the window, or two
series of one chart share a colour.

The person's session is made through Django itself (this process shares the demo
database); staff sign in with the admin's password form, as staff pages require."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "keyportal.settings")

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 390)
PERSON = "li.wei@example.com"


def person_session() -> tuple[str, int, int]:
    """A signed-in session cookie for the demo person, their first key and their id."""
    import django

    django.setup()
    from django.conf import settings
    from django.test import Client

    from accounts.models import User
    from pool.models import ApiKey

    person = User.objects.get(email=PERSON)
    client = Client()
    client.force_login(person)
    key = ApiKey.objects.filter(owner=person).order_by("id").first()
    return client.cookies[settings.SESSION_COOKIE_NAME].value, key.pk, person.pk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--staff-email", required=True)
    parser.add_argument("--staff-password", required=True)
    parser.add_argument("--locales", default="en,zh-CN",
                        help="Comma-separated browser locales (Accept-Language).")
    args = parser.parse_args()
    out = Path(args.out)
    cookie, key_id, person_id = person_session()

    from playwright.sync_api import sync_playwright

    pages = {
        "dashboard": ("staff", "/admin/"),
        "keys": ("staff", "/admin/pool/apikey/"),
        "my-keys": ("person", "/my-keys"),
        "leaderboard": ("staff", "/staff/leaderboard?period=30d"),
        "key": ("person", f"/my-keys/{key_id}"),
        "staff-person": ("staff", f"/staff/people/{person_id}"),
    }
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        for locale in args.locales.split(","):
            person = browser.new_context(locale=locale)
            person.add_cookies([{"name": "sessionid", "value": cookie, "url": args.base}])
            staff = browser.new_context(locale=locale)
            login = staff.new_page()
            login.goto(f"{args.base}/admin/login/?next=/admin/")
            login.fill("#id_username", args.staff_email)
            login.fill("#id_password", args.staff_password)
            login.locator("input[type=submit], button[type=submit]").first.click()
            login.wait_for_url(f"{args.base}/admin/")
            contexts = {"person": person, "staff": staff}
            for name, (who, path) in pages.items():
                for width in WIDTHS:
                    page = contexts[who].new_page()
                    page.set_viewport_size({"width": width, "height": 900})
                    response = page.goto(f"{args.base}{path}")
                    if response is None or response.status != 200:
                        raise SystemExit(f"{path} answered {response and response.status}")
                    target = out / f"{name}-{width}-{locale}.png"
                    page.screenshot(path=str(target), full_page=True)
                    print(target)
                    problems += [f"{target.name}: {p}" for p in measure(page, width)]
                    page.close()
            person.close()
            staff.close()
        browser.close()
    if problems:
        raise SystemExit("\n".join(problems))


def measure(page, width: int) -> list[str]:
    """What a look at the shot checks, measured: the page within the window, an admin list
    within its column (at 1280 px; on a phone it scrolls inside its wrapper), and each
    chart's legend with one colour per series."""
    seen = page.evaluate("""() => {
        const table = document.querySelector('#result_list');
        const wrap = table && table.closest('.results');
        const legends = [...document.querySelectorAll('.chart-legend')].map(
            ul => [...ul.querySelectorAll('rect')].map(r => getComputedStyle(r).fill));
        return {page: document.documentElement.scrollWidth,
                table: table ? table.scrollWidth : 0, column: wrap ? wrap.clientWidth : 0,
                legends};
    }""")
    problems = []
    if seen["page"] > width:
        problems.append(f"the page is {seen['page']} px wide in a {width} px window")
    if width >= 1280 and seen["table"] > seen["column"]:
        problems.append(f"the list is {seen['table']} px wide in a {seen['column']} px column")
    for fills in seen["legends"]:
        if len(set(fills)) != len(fills):
            problems.append(f"two chart series share a colour: {fills}")
    return problems


if __name__ == "__main__":
    main()
