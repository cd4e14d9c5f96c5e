"""Pages show Claude users their prompt cache (reads, writes, hit share), and a cost whose
counts the proxy partly lost as a lower bound ("≥"), never as a cheap exact figure."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from django.utils import timezone as dj_timezone

from pool.services import key_assign
from usage.models import ModelPrice
from usage.services import Books, usage_queue_body_ingest

pytestmark = pytest.mark.django_db


def claude_record(key: str, *, stream: bool = False) -> dict:
    """A 7.x queue record of one Claude Code request: almost all of it read from the cache."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    tokens = ({"input_tokens": 0, "output_tokens": 50, "cache_read_tokens": 0,
               "cache_creation_tokens": 0, "total_tokens": 50} if stream else
              {"input_tokens": 100, "output_tokens": 50, "cache_read_tokens": 10_000,
               "cache_creation_tokens": 2_000, "total_tokens": 12_150})
    return {"timestamp": now, "api_key": key, "model": "claude-sonnet-4-5", "provider": "claude",
            "failed": False, "tokens": tokens}


@pytest.fixture
def sonnet(db):
    ModelPrice.objects.update_or_create(model="claude-sonnet-4-5", defaults=dict(
        input=3, output=15, cache_read="0.30", cache_write="3.75"))


def ingest(*records: dict) -> None:
    usage_queue_body_ingest(body=json.dumps(list(records)).encode(), now=dj_timezone.now(),
                            books=Books.load())


def test_my_keys_shows_cache_reads_writes_and_the_hit_share(client, ann, ready_keys, sonnet):
    issued = key_assign(user=ann, label="laptop")
    ingest(claude_record(issued.value), claude_record(issued.value))
    client.force_login(ann)

    page = client.get("/my-keys").content.decode()

    assert "Cache reads" in page and "20,000" in page  # two requests of 10,000
    assert "Cache writes" in page and "4,000" in page
    # 10,000 of 12,100 input tokens came from the cache.
    assert "82.6 %" in page
    # 2 × $0.01155 = $0.0231: to the cent on the page, exact in its title.
    assert "$0.02<" in page and "Exactly $0.023100." in page and "≥" not in page


def test_the_key_page_shows_the_cache_too(client, ann, ready_keys, sonnet):
    issued = key_assign(user=ann, label="laptop")
    ingest(claude_record(issued.value))
    client.force_login(ann)

    page = client.get(f"/my-keys/{issued.key.pk}").content.decode()

    assert "Cache reads" in page and "82.6 %" in page


def test_no_cache_lines_for_usage_without_cache(client, ann, ready_keys):
    from tests.usage.conftest import served

    issued = key_assign(user=ann, label="laptop")
    served(issued.key, at=dj_timezone.now())
    client.force_login(ann)
    assert "Cache reads" not in client.get("/my-keys").content.decode()


def test_a_request_whose_counts_the_proxy_lost_makes_the_cost_a_lower_bound(
        client, ann, ready_keys, sonnet, admin_client):
    issued = key_assign(user=ann, label="laptop")
    ingest(claude_record(issued.value), claude_record(issued.value, stream=True))
    client.force_login(ann)

    page = client.get("/my-keys").content.decode()

    # $0.01155 + 50 output tokens ($0.00075) known; the stream's input was lost at the proxy.
    # A lower bound rounds down ("≥" stays true); the title keeps the exact figure.
    assert "≥ $0.01<" in page and "Exactly $0.012300." in page
    assert "lost part of the token counts of 1 requests" in page
    stats = client.get(f"/api/user-stats/{ann.email}").json()
    assert stats["incomplete_requests"] == 1 and stats["cost_complete"] is False
    assert stats["cache_read_tokens"] == 10_000 and stats["cache_write_tokens"] == 2_000
    # Staff see how many requests lost counts today.
    dashboard = admin_client.get("/admin/").content.decode()
    assert 'data-dash="incomplete">1' in dashboard


def _note(page: str) -> str:
    """The partial-cost note as visible text (not a title attribute), or "" when absent."""
    if 'data-note="partial-cost"' not in page:
        return ""
    return page.split('data-note="partial-cost">', 1)[1].split("</p>", 1)[0]


@pytest.mark.parametrize(("accept", "words", "lost"), [
    ("en", "“≥” means at least", "The relay lost part of the token counts of 1 request,"),
    ("zh-CN", "“≥”表示“至少”", "中转服务丢失了 1 个请求的部分令牌计数"),
])
def test_the_lower_bound_is_explained_in_words_on_the_page(client, ann, ready_keys, sonnet,
                                                           accept, words, lost):
    issued = key_assign(user=ann, label="laptop")
    client.force_login(ann)
    ingest(claude_record(issued.value))
    for path in ("/my-keys", f"/my-keys/{issued.key.pk}"):  # exact: no note
        assert _note(client.get(path, HTTP_ACCEPT_LANGUAGE=accept).content.decode()) == ""

    ingest(claude_record(issued.value, stream=True))
    for path in ("/my-keys", f"/my-keys/{issued.key.pk}"):
        note = _note(client.get(path, HTTP_ACCEPT_LANGUAGE=accept).content.decode())
        assert words in note and lost in note, path
