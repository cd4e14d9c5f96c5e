from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import requests
from django.core.cache import cache

from accounts.models import User

from tests.fakes.proxy import FakeProxy
from tests.fakes.resp import FakeResp
from tests.fakes.sync_process import SyncProcess

MANAGEMENT_KEY = "test-management-key"


@pytest.fixture(autouse=True)
def _fresh_cache(db: None) -> Iterator[None]:
    # The database cache survives TransactionTestCase flushes; start every test clean.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _plain_static_storage(settings) -> None:
    # The manifest storage needs `collectstatic` first; tests serve static files from the
    # source folders instead.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _own_spool(settings, tmp_path_factory) -> None:
    # sync_usage writes each pop to the spool before the database: one directory per test,
    # never the project's var/spool.
    settings.USAGE_SPOOL_DIR = tmp_path_factory.mktemp("spool")


@pytest.fixture
def fake_proxy(settings) -> Iterator[FakeProxy]:
    """A running fake proxy (queue generation) the portal's settings point at."""
    proxy = FakeProxy(management_key=MANAGEMENT_KEY).start()
    settings.CLIPROXY_URL = proxy.url
    settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
    yield proxy
    proxy.stop()


@pytest.fixture
def snapshot_proxy(settings) -> Iterator[FakeProxy]:
    """A running fake proxy of the old generation (`/usage` snapshot)."""
    proxy = FakeProxy(generation="snapshot", management_key=MANAGEMENT_KEY).start()
    settings.CLIPROXY_URL = proxy.url
    settings.CLIPROXY_MANAGEMENT_KEY = MANAGEMENT_KEY
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy_accepts(fake_proxy) -> Callable[[str], bool]:
    """Whether the fake proxy serves a client request made with this key."""

    def accepts(value: str) -> bool:
        answer = requests.post(
            f"{fake_proxy.url}/v1/chat/completions",
            json={"model": "mock-gpt", "messages": []},
            headers={"Authorization": f"Bearer {value}"},
            timeout=5,
        )
        return answer.status_code == 200

    return accepts


@pytest.fixture
def ann(db) -> User:
    return User.objects.create_user("ann@example.com", name="Ann")


@pytest.fixture
def bob(db) -> User:
    return User.objects.create_user("bob@example.com", name="Bob")


@pytest.fixture
def live_key(fake_proxy, ann):
    """Ann's active key, pushed to the fake proxy next to an operator's own key (and one
    unissued pool key); returns (key, its full value)."""
    from io import StringIO

    from django.core.management import call_command

    from pool.models import ApiKey

    fake_proxy.api_keys = ["operator-own-key"]
    call_command("generate_keys", "--count", "2", stdout=StringIO())
    key = ApiKey.objects.order_by("id").first()
    value = key.value
    ApiKey.objects.filter(pk=key.pk).update(status=ApiKey.Status.ACTIVE, owner=ann, value=None)
    key.refresh_from_db()
    return key, value


@pytest.fixture(autouse=True)
def _display_currency_is_usd():
    """The display currency is kept in process memory (usage/currency.py), so pages need no
    query for it. Each test starts from USD, without a query, whatever an earlier test set."""
    from usage.currency import USD, remember

    remember(USD, seconds=float("inf"))
    yield
    remember(USD, seconds=float("inf"))


@pytest.fixture
def resp_servers() -> Iterator[Callable[..., FakeResp]]:
    """Starts fake RESP servers (tests/fakes/resp.py) from scripts; all closed afterwards."""
    servers: list[FakeResp] = []

    def start(script) -> FakeResp:
        server = FakeResp(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def sync_bench(tmp_path) -> Iterator[Callable[..., SyncProcess]]:
    """Real sync_usage processes on a file database beside a fake proxy
    (tests/fakes/sync_process.py); all closed afterwards."""
    made: list[SyncProcess] = []

    def make(**kwargs) -> SyncProcess:
        made.append(SyncProcess(tmp_path, **kwargs))
        return made[-1]

    yield make
    for b in made:
        b.close()
