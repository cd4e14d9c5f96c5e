"""The totals on every page and in the JSON API equal what the fake proxy served: real
client requests with people's keys, then sync_usage, in both proxy generations."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
import requests

from accounts.models import User
from tests.fakes.proxy import MODELS
from tests.usage.conftest import sync
from usage.currency import USD, money, money_exact
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db

# (key index in people_keys, client path, model alias, how many)
TRAFFIC = [
    (0, "/v1/chat/completions", "mock-gpt", 4),
    (0, "/v1/messages", "claude-mock", 2),
    (1, "/v1/chat/completions", "mock-gpt", 3),
    (1, "/v1/chat/completions", "mock-fail", 1),
    (2, "/v1/messages", "claude-mock", 5),
]


def totals_on(page: str) -> tuple[int, int, str]:
    block = page.split('<dl class="totals"', 1)[1].split("</dl>", 1)[0]
    requests_, tokens, cost = re.findall(r"<dd>(.*?)</dd>", block, re.S)
    return int(requests_.replace(",", "")), int(tokens.replace(",", "")), cost


@pytest.fixture(params=["fake_proxy", "snapshot_proxy"])
def served(request, people_keys) -> dict[str, dict[int, tuple[int, int, Decimal]]]:
    """Sends TRAFFIC through the proxy and syncs; returns what was served per key id:
    (requests, tokens, known cost)."""
    proxy = request.getfixturevalue(request.param)
    proxy.api_keys = [h.value for h in people_keys]
    proxy.restart()  # the proxy now serves exactly these keys
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1000"), output=Decimal("2000"),
                              cache_read=Decimal("0"), cache_write=Decimal("0"))
    expected: dict[int, list] = {h.key.pk: [0, 0, Decimal(0)] for h in people_keys}
    for index, path, alias, times in TRAFFIC:
        held = people_keys[index]
        for _ in range(times):
            answer = requests.post(f"{proxy.url}{path}", json={"model": alias, "messages": []},
                                   headers={"Authorization": f"Bearer {held.value}"}, timeout=5)
            upstream, _p, tin, tout, fails = MODELS[alias]
            assert answer.status_code == (500 if fails else 200)
            served_ = expected[held.key.pk]
            served_[0] += 1
            served_[1] += tin + tout
            if upstream == "mock-gpt":
                served_[2] += (tin * Decimal(1000) + tout * Decimal(2000)) / 1_000_000
    sync()
    return {"by_key": {pk: tuple(v) for pk, v in expected.items()}}


def test_every_page_and_the_api_add_up_to_what_was_served(client, served, people_keys):
    by_key = served["by_key"]
    ann = User.objects.get(email="ann@example.com")
    bob = User.objects.get(email="bob@example.com")
    ann_keys = [h.key.pk for h in people_keys[:2]]
    ann_requests = sum(by_key[pk][0] for pk in ann_keys)
    ann_tokens = sum(by_key[pk][1] for pk in ann_keys)
    ann_cost = sum(by_key[pk][2] for pk in ann_keys)
    all_requests = sum(v[0] for v in by_key.values())
    all_tokens = sum(v[1] for v in by_key.values())
    assert ann_requests == 10 and all_requests == 15  # the traffic really went through

    client.force_login(ann)
    requests_, tokens, cost = totals_on(client.get("/my-keys").content.decode())
    assert (requests_, tokens) == (ann_requests, ann_tokens)
    # claude-mock has no price: a lower bound, in the one money format (exact in a title)
    assert f"≥ {money(ann_cost, currency=USD, lower_bound=True)}" in cost
    assert (money_exact(ann_cost, currency=USD) or "") in cost
    for pk in ann_keys:
        page = client.get(f"/my-keys/{pk}").content.decode()
        assert totals_on(page)[:2] == by_key[pk][:2]
    api = client.get(f"/api/user-stats/{ann.email}").json()
    assert (api["total_requests"], api["total_tokens"]) == (ann_requests, ann_tokens)
    assert Decimal(api["total_cost"]) == ann_cost and api["cost_complete"] is False

    staff = User.objects.create_user("boss@example.com", password="x-long-pass-1", is_staff=True)
    client.force_login(staff)
    for period in ("today", "all"):
        page = client.get("/staff/leaderboard", {"period": period, "by": "tokens"})
        totals = page.content.decode().split('class="staff-totals"', 1)[1].split("</table>")[0]
        assert f"<td>{all_requests}</td>" in totals and f"<td>{all_tokens}</td>" in totals
        # The board's cells carry their column's name for the phone layout: read the values.
        board = re.sub(r'<td data-label="[^"]*">', "<td>",
                       page.content.decode().split('<table id="leaderboard">', 1)[1])
        ann_row = board.split(ann.email, 1)[1].split("</tr>", 1)[0]
        assert f"<td>{ann_requests}</td><td>{ann_tokens}</td>" in ann_row
        bob_row = board.split(bob.email, 1)[1].split("</tr>", 1)[0]
        assert f"<td>{by_key[people_keys[2].key.pk][0]}</td>" in bob_row
    summary = client.get("/api/all-users-stats").json()["summary"]
    assert (summary["total_requests"], summary["total_tokens"]) == (all_requests, all_tokens)
