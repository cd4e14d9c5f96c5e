"""A person suspended for a limit adding a key, with the fake proxy running as a real process
(tests/fakes/proxy.py on 127.0.0.1): real requests spend the tokens, a real sync suspends
the key and takes it off the proxy, and then neither /my-keys nor the JSON API hands out a
key: the proxy's list gains no key the person holds, and their old key stays refused."""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
import requests
from django.core.management import call_command

from pool.models import ApiKey, key_digest
from pool.services import key_assign
from pool.upstream import ProxyClient
from usage.services import usage_sync

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent.parent
MANAGEMENT_KEY = "real-process-management-key"
STARTUP_SECONDS = 60  # a busy machine starts Python slowly; it normally takes well under 1 s


@pytest.fixture
def proxy_process(settings) -> Iterator[str]:
    """tests/fakes/proxy.py in a process of its own, on a free port; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.proxy", "--port", "0",
         "--management-key", MANAGEMENT_KEY],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        watch = selectors.DefaultSelector()
        watch.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + STARTUP_SECONDS
        line = ""
        while not line.startswith("fake proxy"):
            left = deadline - time.monotonic()
            if left <= 0 or process.poll() is not None:
                pytest.fail("the fake proxy process did not start")
            if watch.select(timeout=left):
                line = process.stdout.readline()
        url = line.split(" on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        settings.CLIPROXY_URL = url
        settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def chat(url: str, key: str) -> int:
    answer = requests.post(f"{url}/v1/chat/completions", timeout=30,
                           json={"model": "mock-gpt", "messages": []},
                           headers={"Authorization": f"Bearer {key}"})
    return answer.status_code


def proxy_list() -> list[str]:
    with ProxyClient.from_settings() as client:
        return client.list_keys()


def test_a_suspended_person_adding_a_key_gets_no_working_key(client, ann, proxy_process):
    url = proxy_process
    call_command("generate_keys", "--count", "3", stdout=StringIO())
    issued = key_assign(user=ann, label="laptop")
    ann.limit_tokens_day = 30
    ann.save(update_fields=["limit_tokens_day"])
    # Two real requests of 18 tokens each: 36 of 30.
    assert chat(url, issued.value) == 200 and chat(url, issued.value) == 200

    report = usage_sync()

    assert report.limits.suspended == 1
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert (key.status, key.suspended_for) == (ApiKey.Status.SUSPENDED, "person_tokens_day")
    assert chat(url, issued.value) == 401  # off the proxy
    before = proxy_list()
    pool_before = set(ApiKey.objects.filter(status=ApiKey.Status.POOL).values_list("id",
                                                                                   flat=True))

    client.force_login(ann)
    page = client.post("/my-keys/add", {"label": "another"})
    api = client.post("/api/register-key", json.dumps({"label": "script"}),
                      content_type="application/json")

    assert page.status_code == 403 and "daily token limit" in page.content.decode()
    assert 'id="key-value"' not in page.content.decode()
    assert api.status_code == 403 and api.json()["reason"] == "person_tokens_day"
    assert "key" not in api.json()
    # Nothing changed hands: the same pool keys are unissued, Ann holds only her old key.
    assert set(ApiKey.objects.filter(status=ApiKey.Status.POOL).values_list(
        "id", flat=True)) == pool_before
    assert list(ApiKey.objects.filter(owner=ann).values_list("pk", flat=True)) == [key.pk]
    # The proxy's list did not gain a key Ann holds, and her old key is still refused.
    after = proxy_list()
    held = set(ApiKey.objects.filter(owner=ann).values_list("key_hash", flat=True))
    assert not {key_digest(entry) for entry in after} & held
    assert sorted(after) == sorted(before)
    assert chat(url, issued.value) == 401
