"""The fake proxy's settings, provider-key and auth-file routes keep to the proxy's code
(pool/proxy_admin.py's docstring), quirks included, in both generations."""

from __future__ import annotations

import pytest
import requests

from tests.fakes.proxy import FakeProxy

KEY = "mgmt"


@pytest.fixture(params=["queue", "snapshot"])
def proxy(request):
    p = FakeProxy(generation=request.param, management_key=KEY).start()
    yield p
    p.stop()


def call(proxy, method, path, **kw):
    return requests.request(method, f"{proxy.url}/v0/management{path}",
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=5, **kw)


def test_scalar_settings_take_a_value_object_by_put_or_patch(proxy):
    assert call(proxy, "GET", "/debug").json() == {"debug": False}
    assert call(proxy, "PUT", "/debug", json=True).json() == {"error": "invalid body"}
    assert call(proxy, "PUT", "/debug", json={"value": 1}).status_code == 400
    assert call(proxy, "PATCH", "/debug", json={"value": True}).json() == {"status": "ok"}
    assert call(proxy, "GET", "/debug").json() == {"debug": True}
    assert call(proxy, "PUT", "/request-retry", json={"value": True}).status_code == 400
    assert call(proxy, "PUT", "/request-retry", json={"value": 5}).status_code == 200
    assert call(proxy, "GET", "/quota-exceeded/switch-project").json() == {"switch-project": True}
    call(proxy, "PUT", "/proxy-url", json={"value": "socks5://u:p@h:1080"})
    assert call(proxy, "DELETE", "/proxy-url").status_code == 200
    assert call(proxy, "GET", "/proxy-url").json() == {"proxy-url": ""}
    assert call(proxy, "PATCH", "/usage-statistics-enabled", json={"value": False}).status_code == 200
    assert proxy.statistics_enabled is False


def test_a_read_only_config_refuses_every_write(proxy):
    proxy.config_read_only = True
    answer = call(proxy, "PUT", "/request-log", json={"value": True})
    assert answer.status_code == 500 and "failed to save config" in answer.json()["error"]
    assert call(proxy, "GET", "/request-log").json() == {"request-log": False}


def test_retention_lives_in_config_only_in_the_queue_generation(proxy):
    config = call(proxy, "GET", "/config").json()
    text = call(proxy, "GET", "/config.yaml").text
    if proxy.generation == "snapshot":
        assert "redis-usage-queue-retention-seconds" not in config
        return
    assert config["redis-usage-queue-retention-seconds"] == 60
    changed = text.replace("redis-usage-queue-retention-seconds: 60", "redis-usage-queue-retention-seconds: 9000")
    assert call(proxy, "PUT", "/config.yaml", data=changed).json() == {"ok": True, "changed": ["config"]}
    assert proxy.retention_seconds == 3600  # clamped
    assert call(proxy, "PUT", "/config.yaml", data="a: [").json()["error"] == "invalid_yaml"
    assert call(proxy, "PUT", "/config.yaml", data="- 1").status_code == 422


def test_provider_lists_put_patch_and_delete_with_their_quirks(proxy):
    assert call(proxy, "GET", "/claude-api-key").json() == {"claude-api-key": None}
    assert call(proxy, "PUT", "/claude-api-key", json={"items": []}).status_code == 400
    entries = [{"api-key": "sk-a", "base-url": ""}, {"api-key": "sk-b", "base-url": "https://b"}]
    assert call(proxy, "PUT", "/claude-api-key", json=entries).json() == {"status": "ok"}
    listed = call(proxy, "GET", "/claude-api-key").json()["claude-api-key"]
    assert [e["api-key"] for e in listed] == ["sk-a", "sk-b"]
    assert ("auth-index" in listed[0]) is (proxy.generation == "queue")
    # PATCH by index, then by match; neither found: 404
    call(proxy, "PATCH", "/claude-api-key", json={"index": 1, "value": {"proxy-url": "http://p"}})
    call(proxy, "PATCH", "/claude-api-key", json={"match": "sk-a", "value": {"base-url": "https://a"}})
    assert proxy.providers["claude-api-key"][1]["proxy-url"] == "http://p"
    assert proxy.providers["claude-api-key"][0]["base-url"] == "https://a"
    assert call(proxy, "PATCH", "/claude-api-key", json={"index": 9, "value": {}}).json() == {"error": "item not found"}
    assert call(proxy, "PATCH", "/claude-api-key", json={"index": 0}).json() == {"error": "invalid body"}
    # DELETE: a key listed twice needs base-url; none of api-key/index: 400
    call(proxy, "PUT", "/claude-api-key", json=entries + [{"api-key": "sk-a", "base-url": "https://x"}])
    assert call(proxy, "DELETE", "/claude-api-key", params={"api-key": "sk-a"}).status_code == 400
    assert call(proxy, "DELETE", "/claude-api-key").json() == {"error": "missing api-key or index"}
    assert call(proxy, "DELETE", "/claude-api-key", params={"index": 0}).status_code == 200
    assert [e["api-key"] for e in proxy.providers["claude-api-key"]] == ["sk-b", "sk-a"]


def test_codex_and_openai_entries_without_base_url_are_dropped_or_deleted(proxy):
    call(proxy, "PUT", "/codex-api-key", json=[{"api-key": "c1", "base-url": ""},
                                               {"api-key": "c2", "base-url": "https://c"}])
    assert [e["api-key"] for e in proxy.providers["codex-api-key"]] == ["c2"]
    call(proxy, "PATCH", "/codex-api-key", json={"index": 0, "value": {"base-url": ""}})
    assert proxy.providers["codex-api-key"] == []
    call(proxy, "PUT", "/openai-compatibility", json=[
        {"name": "or", "base-url": "https://or", "api-key-entries": [{"api-key": "k"}], "models": []}])
    call(proxy, "PATCH", "/openai-compatibility", json={"name": "or", "value": {"disabled": True}})
    assert proxy.providers["openai-compatibility"][0]["disabled"] is True
    assert call(proxy, "DELETE", "/openai-compatibility").json() == {"error": "missing name or index"}
    call(proxy, "DELETE", "/openai-compatibility", params={"name": "or"})
    assert proxy.providers["openai-compatibility"] == []


def test_auth_files_upload_list_and_delete(proxy):
    assert call(proxy, "GET", "/auth-files").json() == {"files": []}
    ok = call(proxy, "POST", "/auth-files",
              files={"file": ("a.json", b'{"type": "claude", "email": "a@x", "access_token": "t"}')})
    assert ok.json() == {"status": "ok"}
    bad = call(proxy, "POST", "/auth-files", files={"file": ("a.txt", b"{}")})
    assert bad.json() == {"error": "file must be .json"}
    assert call(proxy, "POST", "/auth-files", files={"other": ("a.json", b"{}")}).status_code == 400
    [entry] = call(proxy, "GET", "/auth-files").json()["files"]
    assert entry["name"] == "a.json" and entry["type"] == "claude" and entry["email"] == "a@x"
    assert "access_token" not in str(entry)
    assert "disabled" in entry  # 6.9 and 7.x report status
    assert call(proxy, "DELETE", "/auth-files", params={"name": "nope.json"}).status_code == 404
    assert call(proxy, "DELETE", "/auth-files", params={"name": "a.json"}).json() == {"status": "ok"}


def test_an_older_release_lacks_newer_routes():
    old = FakeProxy(generation="snapshot", management_key=KEY, version="6.5.0").start()
    try:
        assert call(old, "GET", "/gemini-api-key").status_code == 404
        assert call(old, "GET", "/usage-statistics-enabled").status_code == 200  # since 6.3
        assert call(old, "GET", "/claude-api-key").status_code == 200
        old.add_auth_file("g.json", {"type": "gemini", "email": "g@x"})
        [entry] = call(old, "GET", "/auth-files").json()["files"]
        assert "disabled" not in entry and "status" not in entry  # the directory listing
    finally:
        old.stop()


def test_an_older_release_ignores_entry_fields_it_does_not_have():
    old = FakeProxy(generation="snapshot", management_key=KEY, version="6.5.0").start()
    try:
        call(old, "PUT", "/claude-api-key", json=[{"api-key": "sk-a"}])
        answer = call(old, "PATCH", "/claude-api-key", json={"index": 0, "value": {"excluded-models": ["*"]}})
        assert answer.json() == {"status": "ok"}  # ok, and nothing changed
        assert old.providers["claude-api-key"] == [{"api-key": "sk-a"}]
    finally:
        old.stop()
