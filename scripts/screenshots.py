"""The browser half of scripts/screenshots.sh: signs in to a running demo portal (seeded
by `manage.py seed_demo`) and writes full-page PNGs of the main pages at two widths.

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
    parser.add_argument("--locale", default="zh-CN")
    args = parser.parse_args()
    out = Path(args.out)
    cookie, key_id, person_id = person_session()

    from playwright.sync_api import sync_playwright

    pages = {
        "my-keys": ("person", "/my-keys"),
        "key": ("person", f"/my-keys/{key_id}"),
        "staff-person": ("staff", f"/staff/people/{person_id}"),
        "admin-dashboard": ("staff", "/admin/"),
        "leaderboard": ("staff", "/staff/leaderboard?period=30d"),
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        person = browser.new_context(locale=args.locale)
        person.add_cookies([{"name": "sessionid", "value": cookie, "url": args.base}])
        staff = browser.new_context(locale=args.locale)
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
                target = out / f"{name}-{width}.png"
                page.screenshot(path=str(target), full_page=True)
                print(target)
                page.close()
        browser.close()


if __name__ == "__main__":
    main()
