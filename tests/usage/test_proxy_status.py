"""/staff/proxy's status words are readable: the colours of .ok and .bad keep at least 4.5:1
against the admin's background in its light and dark themes (the old rule used the admin's
success *background*, #dfd, as text colour: invisible on white), and a mark says the same
without colour."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from accounts.models import User
from usage.models import SyncRun

CSS = (Path(settings.BASE_DIR) / "static/css/staff.css").read_text()
LIGHT_BG, DARK_BG = "#ffffff", "#121212"  # the admin's --body-bg in each theme


def luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def variables(selector: str) -> dict[str, str]:
    """The --kp-status-* values the last rule for `selector` sets."""
    block = re.findall(re.escape(selector) + r"\s*\{([^}]*)\}", CSS)[-1]
    return dict(re.findall(r"--kp-status-(ok|bad):\s*(#[0-9a-fA-F]{6})", block))


@pytest.mark.parametrize(
    "selector, background",
    [(":root", LIGHT_BG), ('html[data-theme="dark"]', DARK_BG),
     ('html:not([data-theme="light"])', DARK_BG)],
)
def test_status_colours_keep_4_5_to_1_in_each_theme(selector, background):
    colours = variables(selector)
    assert set(colours) == {"ok", "bad"}
    for name, colour in colours.items():
        assert contrast(colour, background) >= 4.5, (selector, name, colour)


def test_the_status_words_use_these_colours_and_a_mark():
    assert re.search(r"\.staff-page \.ok \{ color: var\(--kp-status-ok\)", CSS)
    assert re.search(r"\.staff-page \.bad \{ color: var\(--kp-status-bad\)", CSS)
    assert re.search(r'\.staff-page \.ok::before \{ content: "✓', CSS)
    assert re.search(r'\.staff-page \.bad::before \{ content: "✗', CSS)
    # The last rule for .ok wins: it must not be the admin's success background any more.
    last_ok = re.findall(r"\.staff-page \.ok \{([^}]*)\}", CSS)[-1]
    assert "message-success-bg" not in last_ok


@pytest.mark.django_db
def test_the_page_marks_good_and_bad_states_with_these_classes(client, settings):
    settings.CLIPROXY_URL = ""
    SyncRun.objects.create(started_at=timezone.now(), finished_at=timezone.now(), ok=True,
                           mode="queue")
    staff = User.objects.create_user("boss@example.com", password="x-long-pass-1",
                                     is_staff=True)
    client.force_login(staff)
    page = client.get("/staff/proxy").content.decode()
    assert '<span class="bad">No proxy is configured</span>' in page
    assert '<span class="ok">ok</span>' in page  # the last sync's result
    assert "css/staff.css" in page
