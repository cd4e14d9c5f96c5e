"""/staff/proxy/upstreams: provider keys listed masked, added, edited, disabled and deleted
through a confirmation, by the proxy's own calls (PUT whole list, PATCH by index, DELETE by
index or name), audited with masked values only; both generations, an older proxy's 404, a
refused write, a stale page, the latch."""

from __future__ import annotations

import pytest

from keyportal.models import AuditEvent
from tests.pool.test_proxy_settings import *  # noqa: F403 - its fixtures and helpers

pytestmark = pytest.mark.django_db
URL = "/staff/proxy/upstreams"
CLAUDE_KEY = "sk-ant-claude-secret-key-AAAA1111"
OPENAI_KEY = "sk-or-openrouter-secret-BBBB2222"
NEW_KEY = "sk-codex-brand-new-secret-CCCC3333"


def seed(fake) -> None:
    fake.providers["claude-api-key"] = [
        {"api-key": CLAUDE_KEY, "base-url": "https://api.anthropic.com", "proxy-url": "",
         "models": [{"name": "claude-sonnet-4", "alias": "sonnet"}]}]
    fake.providers["openai-compatibility"] = [
        {"name": "openrouter", "base-url": "https://openrouter.ai/api/v1",
         "api-key-entries": [{"api-key": OPENAI_KEY}],
         "models": [{"name": "moonshotai/kimi-k2", "alias": "kimi-k2"}]}]


def ref_of(page: str, row: str) -> str:
    return page.split(f'id="{row}"', 1)[1].split('name="ref" value="', 1)[1].split('"', 1)[0]


def test_entries_are_listed_masked_in_both_generations(staff_client, proxy):
    seed(proxy)
    response = staff_client.get(URL)
    page = response.content.decode()
    assert "…1111" in page and "…2222" in page and "openrouter" in page
    assert "claude-sonnet-4 → sonnet" in page and "moonshotai/kimi-k2 → kimi-k2" in page
    assert 'id="upstream-gemini"' in page and 'id="upstream-codex"' in page
    assert_no_secret(CLAUDE_KEY, response)
    assert_no_secret(OPENAI_KEY, response)


def test_the_page_pins_its_queries(staff_client, proxy, django_assert_num_queries):
    seed(proxy)
    staff_client.get(URL)
    # The session, the staff member, the sidebar's permissions (2), one latch read per list.
    with django_assert_num_queries(2 + 2 + 4):
        assert staff_client.get(URL).status_code == 200


def test_an_older_proxy_without_a_list_says_so(staff_client, old_proxy):
    seed(old_proxy)
    page = staff_client.get(URL).content.decode()
    assert "This proxy version has no /gemini-api-key list." in page
    assert "…1111" in page  # the lists it has are there


def test_adding_a_codex_key_puts_the_whole_list_back_with_the_new_entry(staff_client, staff, proxy):
    seed(proxy)
    proxy.providers["codex-api-key"] = [{"api-key": "sk-existing-codex-key-9999",
                                         "base-url": "https://x", "websockets": True}]
    form = {"api_key": NEW_KEY, "base_url": "https://chatgpt.com/backend-api/codex",
            "proxy_url": "", "models": "gpt-5-codex = codex\ngpt-5"}
    asked = staff_client.post(f"{URL}/codex/add", form)
    assert "…3333" in asked.content.decode() and writes(proxy) == []
    done = confirm(staff_client, f"{URL}/codex/add", asked)
    assert "Added to Codex API keys." in done.content.decode()
    old, new = proxy.providers["codex-api-key"]
    assert old == {"api-key": "sk-existing-codex-key-9999", "base-url": "https://x",
                   "websockets": True}  # kept exactly, auth-index dropped
    assert new["api-key"] == NEW_KEY and new["models"] == [
        {"name": "gpt-5-codex", "alias": "codex"}, {"name": "gpt-5", "alias": ""}]
    assert writes(proxy) == [("PUT", "/codex-api-key")]
    event = AuditEvent.objects.get()
    assert event.action == AuditEvent.Action.PROXY_UPSTREAM_CHANGED and event.actor == staff
    assert event.after["keys"] == ["…3333"] and event.before is None
    assert_no_secret(NEW_KEY, asked, done)


def test_a_codex_key_needs_a_base_url_and_a_key_needs_no_spaces(staff_client, proxy):
    answer = staff_client.post(f"{URL}/codex/add", {"api_key": NEW_KEY, "base_url": ""})
    assert answer.status_code == 400 and "This field is required" in answer.content.decode()
    answer = staff_client.post(f"{URL}/claude/add", {"api_key": "a b c d e f", "base_url": ""})
    assert answer.status_code == 400 and "no spaces" in answer.content.decode()
    answer = staff_client.post(f"{URL}/claude/add", {"api_key": NEW_KEY, "base_url": "ftp://x"})
    assert answer.status_code == 400 and "must start with" in answer.content.decode()
    assert staff_client.get(f"{URL}/nosuch/add").status_code == 404
    assert writes(proxy) == []


def test_editing_patches_by_index_only_what_changed(staff_client, proxy):
    seed(proxy)
    page = staff_client.get(URL).content.decode()
    ref = ref_of(page, "upstream-claude-0")
    form_page = staff_client.get(f"{URL}/claude/0/edit", {"ref": ref})
    assert "claude-sonnet-4 = sonnet" in form_page.content.decode()
    asked = staff_client.post(f"{URL}/claude/0/edit", {
        "ref": ref, "base_url": "https://api.anthropic.com",
        "proxy_url": "http://10.0.0.9:3128", "models": "claude-sonnet-4 = sonnet\nclaude-opus-4 = opus"})
    text = asked.content.decode()
    assert "http://10.0.0.9:3128" in text and "claude-opus-4=opus" in text
    confirm(staff_client, f"{URL}/claude/0/edit", asked)
    entry = proxy.providers["claude-api-key"][0]
    assert entry["api-key"] == CLAUDE_KEY and entry["proxy-url"] == "http://10.0.0.9:3128"
    assert entry["models"][1] == {"name": "claude-opus-4", "alias": "opus"}
    assert writes(proxy) == [("PATCH", "/claude-api-key")]
    event = AuditEvent.objects.get()
    assert event.before["proxy_url"] == "" and event.after["proxy_url"] == "http://10.0.0.9:3128"
    assert "base_url" not in event.after  # unchanged: not sent
    assert_no_secret(CLAUDE_KEY, form_page, asked)


def test_a_proxy_password_in_an_entry_stays_unless_retyped(staff_client, proxy):
    seed(proxy)
    proxy.providers["claude-api-key"][0]["proxy-url"] = "http://u:hidden-pass-4321@10.0.0.1:8080"
    page = staff_client.get(URL).content.decode()
    form_page = staff_client.get(f"{URL}/claude/0/edit", {"ref": ref_of(page, "upstream-claude-0")})
    assert "http://***@10.0.0.1:8080" in form_page.content.decode()
    asked = staff_client.post(f"{URL}/claude/0/edit", {
        "ref": ref_of(page, "upstream-claude-0"), "base_url": "https://api.anthropic.com",
        "proxy_url": "http://***@10.0.0.1:8080", "models": "claude-sonnet-4 = sonnet\nx"})
    confirm(staff_client, f"{URL}/claude/0/edit", asked)
    assert proxy.providers["claude-api-key"][0]["proxy-url"] == "http://u:hidden-pass-4321@10.0.0.1:8080"
    assert_no_secret("hidden-pass-4321", form_page, asked)


def test_openai_compatible_proxy_url_goes_to_every_key(staff_client, proxy):
    seed(proxy)
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/openai/0/edit", {
        "ref": ref_of(page, "upstream-openai-0"), "base_url": "https://openrouter.ai/api/v1",
        "proxy_url": "socks5://10.0.0.2:1080", "models": "moonshotai/kimi-k2 = kimi-k2"})
    confirm(staff_client, f"{URL}/openai/0/edit", asked)
    assert proxy.providers["openai-compatibility"][0]["api-key-entries"] == [
        {"api-key": OPENAI_KEY, "proxy-url": "socks5://10.0.0.2:1080"}]
    assert_no_secret(OPENAI_KEY, asked)


def test_disabling_a_key_excludes_every_model_and_a_provider_uses_its_flag(staff_client, proxy):
    seed(proxy)
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/claude/0/toggle", {"ref": ref_of(page, "upstream-claude-0")})
    assert "routes no model to it" in asked.content.decode()
    done = confirm(staff_client, f"{URL}/claude/0/toggle", asked)
    assert proxy.providers["claude-api-key"][0]["excluded-models"] == ["*"]
    assert 'class="bad">disabled' in done.content.decode()
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/claude/0/toggle", {"ref": ref_of(page, "upstream-claude-0")})
    confirm(staff_client, f"{URL}/claude/0/toggle", asked)
    assert proxy.providers["claude-api-key"][0]["excluded-models"] == []
    asked = staff_client.post(f"{URL}/openai/0/toggle", {"ref": ref_of(page, "upstream-openai-0")})
    confirm(staff_client, f"{URL}/openai/0/toggle", asked)
    assert proxy.providers["openai-compatibility"][0]["disabled"] is True
    assert [e.after["disabled"] for e in AuditEvent.objects.order_by("id")] == [True, False, True]


def test_deleting_uses_the_index_for_keys_and_the_name_for_a_provider(staff_client, proxy):
    seed(proxy)
    proxy.providers["claude-api-key"].append({"api-key": CLAUDE_KEY, "base-url": "https://b"})
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/claude/1/delete", {"ref": ref_of(page, "upstream-claude-1")})
    confirm(staff_client, f"{URL}/claude/1/delete", asked)
    assert [e["base-url"] for e in proxy.providers["claude-api-key"]] == ["https://api.anthropic.com"]
    asked = staff_client.post(f"{URL}/openai/0/delete", {"ref": ref_of(page, "upstream-openai-0")})
    confirm(staff_client, f"{URL}/openai/0/delete", asked)
    assert proxy.providers["openai-compatibility"] == []
    assert [r for r in writes(proxy)] == [("DELETE", "/claude-api-key"), ("DELETE", "/openai-compatibility")]
    assert [e.after for e in AuditEvent.objects.all()] == [None, None]
    assert_no_secret(CLAUDE_KEY, asked)
    assert_no_secret(OPENAI_KEY, asked)


def test_a_stale_page_changes_nothing(staff_client, proxy):
    seed(proxy)
    page = staff_client.get(URL).content.decode()
    ref = ref_of(page, "upstream-claude-0")
    proxy.providers["claude-api-key"].insert(0, {"api-key": "sk-someone-else-added-0000"})
    answer = staff_client.post(f"{URL}/claude/0/delete", {"ref": ref}, follow=True)
    assert "changed or moved" in answer.content.decode()
    assert writes(proxy) == [] and not AuditEvent.objects.exists()


@pytest.mark.parametrize("status,body", [(400, {"error": "invalid body"}),
                                         (500, {"error": "failed to save config: disk full"})])
def test_a_refused_write_says_why_and_is_not_audited(staff_client, proxy, status, body):
    seed(proxy)
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/claude/0/toggle", {"ref": ref_of(page, "upstream-claude-0")})
    proxy.inject("/claude-api-key", method="PATCH", status=status, body=body)
    done = confirm(staff_client, f"{URL}/claude/0/toggle", asked)
    assert "Nothing was changed." in done.content.decode() and f"HTTP {status}" in done.content.decode()
    assert "excluded-models" not in proxy.providers["claude-api-key"][0]
    assert not AuditEvent.objects.exists()


def test_masking_keeps_only_what_gives_nothing_away():
    from pool.proxy_admin import mask_secret, mask_url, parse_models, ModelAlias

    assert mask_secret(CLAUDE_KEY) == "…1111" and mask_secret("short-key") == "…"
    assert mask_secret("") == ""
    assert mask_url("socks5://u:p@h:1080/x") == "socks5://***@h:1080/x"
    assert mask_url("https://h/v1?key=abc&x=1") == "https://h/v1?key=***&x=***"
    assert mask_url("https://api.anthropic.com") == "https://api.anthropic.com"
    assert mask_url("http://[::1") == "***"
    assert parse_models("a = b\n\n# note\nc\nd=>e") == [
        ModelAlias("a", "b"), ModelAlias("c", ""), ModelAlias("d", "e")]


def test_an_older_proxy_that_cannot_disable_says_so(staff_client, old_proxy):
    seed(old_proxy)
    page = staff_client.get(URL).content.decode()
    asked = staff_client.post(f"{URL}/claude/0/toggle", {"ref": ref_of(page, "upstream-claude-0")})
    done = confirm(staff_client, f"{URL}/claude/0/toggle", asked)
    assert "cannot disable entries of Claude API keys" in done.content.decode()
    assert "excluded-models" not in old_proxy.providers["claude-api-key"][0]
    assert not AuditEvent.objects.exists()
