"""The poll path's pop size against CLIPROXY_MAX_ANSWER_BYTES: pops shrink before an answer
reaches the cap, and a pop refused over the cap says what it cost and makes the next ones
smaller (a refused pop is gone from the proxy: the proxy removed its records when it
answered)."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError
from django.db.models import Sum

from tests.usage.conftest import sync
from usage import services
from usage.models import SyncRun, UsageSnapshot

pytestmark = pytest.mark.django_db

T0 = 1_795_000_000.0


def fill(proxy, held, n: int) -> int:
    """`n` records on a key; returns the bytes of a pop of 100 of them as the proxy sends it."""
    for i in range(n):
        proxy.add_usage(held.value, timestamp=T0 + i / 1000)
    return len(json.dumps([record for _ts, record in list(proxy.queue)[:100]]).encode())


def counted() -> int:
    return UsageSnapshot.objects.aggregate(n=Sum("requests"))["n"] or 0


def test_pops_shrink_before_an_answer_nears_the_cap(fake_proxy, people_keys, settings):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 100
    hundred = fill(fake_proxy, people_keys[0], 300)
    # A pop of 100 fits under the cap, but over half of it: the next pops must be smaller.
    settings.CLIPROXY_MAX_ANSWER_BYTES = hundred * 3 // 2

    sync()

    assert counted() == 300 and fake_proxy.popped == 300  # nothing refused, nothing lost
    assert 50 <= services.usage_pop_size() < 100


def test_a_pop_over_the_cap_is_refused_with_a_sentence_and_the_next_ones_are_smaller(
    fake_proxy, people_keys, settings
):
    settings.CLIPROXY_USAGE_MODE = "queue"
    settings.USAGE_QUEUE_BATCH = 100
    hundred = fill(fake_proxy, people_keys[0], 300)
    settings.CLIPROXY_MAX_ANSWER_BYTES = hundred // 2  # 25 records fit, 100 do not

    with pytest.raises(CommandError) as failed:
        sync()
    sentence = str(failed.value)
    assert "CLIPROXY_MAX_ANSWER_BYTES" in sentence and "gone from the proxy" in sentence
    assert "25 records" in sentence and "Traceback" not in sentence
    assert SyncRun.objects.get().ok is False
    assert services.usage_pop_size() == 25

    sync()  # the next run pops 25 at a time: what was left is all counted
    assert counted() == 200 and fake_proxy.popped == 300


def test_the_pop_size_comes_back_to_the_setting_when_the_cap_allows(settings):
    settings.USAGE_QUEUE_BATCH = 100
    services.cache.set(services.POP_SIZE_CACHE_KEY, 25, 60)
    assert services.usage_pop_size() == 25
    settings.USAGE_QUEUE_BATCH = 20  # an operator who lowered the setting below it wins
    assert services.usage_pop_size() == 20
