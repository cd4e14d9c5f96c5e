"""The refusal latch against the fake proxy, which counts failed management logins the way
the real one does (per address; zeroed by a good login and around a ban; forgotten after 2 h
idle at an hourly sweep; banned at the 5th). Time is simulated: the latch's clock and the
fake's are one movable clock, and nothing sleeps.

Each `attempt()` is a call as any portal process makes it (a fresh client, the shared cache),
so a day of cron runs, sync loops and pages is a loop over the minutes."""

from __future__ import annotations

import pytest

from pool import upstream
from pool.upstream import ProxyClient, UpstreamRefused
from tests.conftest import MANAGEMENT_KEY
from tests.fakes.proxy import SettableClock

pytestmark = pytest.mark.django_db
MINUTE, HOUR = 60, 3600
PROBE = ("GET", "/usage-statistics-enabled")


Clock = SettableClock


@pytest.fixture
def clock(monkeypatch, fake_proxy) -> Clock:
    shared = Clock()
    monkeypatch.setattr(upstream, "clock", shared)
    fake_proxy.clock = shared
    return shared


def attempt() -> str:
    """"ok", or the refusal's sentence."""
    try:
        with ProxyClient.from_settings() as client:
            client.list_keys()
    except UpstreamRefused as exc:
        return str(exc)
    return "ok"


def minutes_with_requests(
    fake_proxy, clock: Clock, minutes: int, secrets: tuple[str, ...]
) -> list[int]:
    """Attempts a call every minute for `minutes`; returns the minutes in which something
    reached the proxy. Every attempt is refused, and no refusal names a secret."""
    start, sent = clock.now, []
    for minute in range(minutes):
        clock.now = start + minute * MINUTE
        before = len(fake_proxy.management_requests)
        message = attempt()
        assert message != "ok"
        assert not any(secret in message for secret in secrets)
        if len(fake_proxy.management_requests) > before:
            sent.append(minute)
    clock.now = start + minutes * MINUTE
    return sent


def test_a_restored_secret_is_found_by_one_probe_and_the_call_goes_on(fake_proxy, clock):
    fake_proxy.management_key = "rotated-at-the-proxy"
    assert "CLIPROXY_MANAGEMENT_KEY" in attempt()
    fake_proxy.management_key = MANAGEMENT_KEY  # the operator puts the secret back

    clock.now += 4 * MINUTE
    sent = len(fake_proxy.management_requests)
    assert "Nothing was sent" in attempt()
    assert len(fake_proxy.management_requests) == sent

    clock.now += 1 * MINUTE
    assert attempt() == "ok"
    assert fake_proxy.management_requests[sent:] == [PROBE, ("GET", "/api-keys")]
    assert attempt() == "ok"  # lifted: no more probes
    assert fake_proxy.management_requests[sent + 2:] == [("GET", "/api-keys")]
    assert fake_proxy.refused_logins == 1


@pytest.mark.parametrize("sweep_offset", [10 * MINUTE, 30 * MINUTE, HOUR - 1],
                         ids=["sweep-at-exactly-2h-idle", "half-past", "just-before"])
def test_a_wrong_key_never_brings_the_proxy_near_its_ban_in_a_day(fake_proxy, clock, sweep_offset):
    # The proxy's hourly sweep runs at some phase; at the worst one it finds the portal's
    # last failure idle for exactly 2 h (not over), and forgets it only an hour later.
    fake_proxy._next_sweep = clock.now + sweep_offset
    fake_proxy.management_key = "rotated-at-the-proxy"

    secrets = ("rotated-at-the-proxy", MANAGEMENT_KEY)
    sent = minutes_with_requests(fake_proxy, clock, 24 * 60, secrets)

    assert sent[:3] == [0, 5, 10]  # the refusal, then probes at +5 and +10 minutes
    assert all(b - a == 190 for a, b in zip(sent[2:], sent[3:]))  # then every 3 h 10 min
    assert len(sent) == 10
    assert fake_proxy.refused_logins == len(sent)  # each was one request
    assert fake_proxy.peak_failures == 3 and not fake_proxy.banned_until


def test_a_403_does_not_count_and_is_probed_every_five_minutes(fake_proxy, clock):
    fake_proxy.management_key = ""  # "remote management key not set": 403

    sent = minutes_with_requests(fake_proxy, clock, 60, (MANAGEMENT_KEY,))

    assert sent == list(range(0, 60, 5))
    assert fake_proxy.refused_logins == 0
    fake_proxy.management_key = MANAGEMENT_KEY  # the operator sets the secret
    assert attempt() == "ok"


def test_a_403_turning_into_a_401_follows_the_401_schedule(fake_proxy, clock):
    fake_proxy.management_key = ""
    minutes_with_requests(fake_proxy, clock, 7, (MANAGEMENT_KEY,))  # minutes 0 and 5
    fake_proxy.management_key = "another-secret"  # set, but not the portal's

    sent = minutes_with_requests(fake_proxy, clock, 7 * 60, (MANAGEMENT_KEY, "another-secret"))

    assert sent == [3, 8, 13, 13 + 190, 13 + 380]  # 401s at minutes 10, 15, 20 of the whole run
    assert fake_proxy.peak_failures == 3 and not fake_proxy.banned_until


def test_fixing_the_portals_key_lifts_the_pause_at_once(fake_proxy, clock, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "a-typo"
    assert "CLIPROXY_MANAGEMENT_KEY" in attempt()
    settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
    assert attempt() == "ok"
    # The good login zeroed the proxy's count: a later typo gets a whole new latch.
    settings.CLIPROXY_MANAGEMENT_KEY = "another-typo"
    sent = minutes_with_requests(fake_proxy, clock, 11, (MANAGEMENT_KEY, "another-typo"))
    assert sent == [0, 5, 10]
    assert fake_proxy.peak_failures == 3


def test_changing_to_other_wrong_keys_cannot_walk_into_the_ban(fake_proxy, clock, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "typo-1"
    minutes_with_requests(fake_proxy, clock, 11, ("typo-1",))  # 3 failures
    settings.CLIPROXY_MANAGEMENT_KEY = "typo-2"
    sent = len(fake_proxy.management_requests)
    attempt()  # a new key is tried at once: the 4th failure
    assert len(fake_proxy.management_requests) == sent + 1

    settings.CLIPROXY_MANAGEMENT_KEY = "typo-3"
    clock.now += MINUTE
    message = attempt()  # a 5th would ban the address: nothing is sent, with any key
    assert "Nothing was sent" in message and "typo" not in message
    assert len(fake_proxy.management_requests) == sent + 1
    assert fake_proxy.peak_failures == 4 and not fake_proxy.banned_until

    settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
    clock.now += 3 * HOUR + 10 * MINUTE  # the proxy has forgotten them
    assert attempt() == "ok"
