"""A Chinese browser (locale zh-CN) from registration to its keys, in real Chromium: no
English word is left on any page of the way, numbers carry thousands separators, and the
header's switch to English works and is remembered."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from pool.models import ApiKey
from pool.services import pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_link
from usage.models import UsageSnapshot


@pytest.fixture
def browser_context_args() -> dict:
    return {"locale": "zh-CN"}


# Words that stay as they are in Chinese text: product and format names, units.
ALLOWED = {
    "API", "Claude", "Code", "Codex", "OpenAI", "curl", "JSON", "CSV", "CI", "Token", "USD",
    "Gemini", "CLI", "Cherry", "Studio", "ChatBox", "UTC", "ID", "SHA", "HTTP", "URL",
    "CLIProxyAPI",  # an upstream's name (each key says where it works)
}

# The visible text of the page, as (where, text) pairs: text nodes outside code (<pre>,
# <code>, <kbd>, <samp>, scripts) and outside elements marked as another language (the
# switch's "English"), plus the attributes people read or hear (title, aria-label,
# placeholder, alt). Text hidden with `display: none` does not count; visually hidden
# text (read by screen readers) does.
VISIBLE_TEXT = """() => {
  const skip = "SCRIPT,STYLE,TEMPLATE,NOSCRIPT,PRE,CODE,KBD,SAMP".split(",");
  const out = [];
  const foreign = (el) => { const l = el.closest("[lang]"); return l && !l.lang.toLowerCase().startsWith("zh"); };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || el.closest(skip.join(","))) continue;
    if (foreign(el) || !el.checkVisibility()) continue;
    out.push([el.tagName.toLowerCase() + (el.id ? "#" + el.id : ""), node.textContent.trim()]);
  }
  for (const el of document.querySelectorAll("[title],[aria-label],[placeholder],[alt]")) {
    if (foreign(el)) continue;
    for (const name of ["title", "aria-label", "placeholder", "alt"]) {
      const value = el.getAttribute(name);
      if (value) out.push([el.tagName.toLowerCase() + "[" + name + "]", value]);
    }
  }
  out.push(["title", document.title]);
  return out;
}"""

NOT_WORDS = [
    re.compile(r"https?://\S+"),  # addresses
    re.compile(r"[\w.+-]+@[\w.-]+"),  # email addresses
    re.compile(r"\bsk-kp-\S*"),  # (masked) keys carry the portal's prefix
    re.compile(r"[\w~./-]*[/_.][\w~./-]+"),  # paths, file and setting names (~/.claude/settings.json, PROXY_URL)
]
WORD = re.compile(r"[A-Za-z]{2,}")


def english_left(page) -> list[str]:
    found = []
    for where, text in page.evaluate(VISIBLE_TEXT):
        rest = text
        for pattern in NOT_WORDS:
            rest = pattern.sub(" ", rest)
        words = [w for w in WORD.findall(rest) if w not in ALLOWED]
        if words:
            found.append(f"{page.url} {where}: {text!r} ({', '.join(words)})")
    return found


def test_a_chinese_browser_registers_gets_a_key_and_reads_its_keys_in_chinese(
    live_server, fake_proxy, settings, page
):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    with ProxyClient.from_settings() as client:
        pool_generate(count=2, client=client)
    untranslated: list[str] = []

    page.goto(f"{live_server.url}/register")
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    untranslated += english_left(page)
    page.get_by_label("邮箱地址").fill("li@example.com")
    page.get_by_label("您的姓名").fill("李雷")
    page.get_by_label("密钥标签").fill("笔记本")
    page.get_by_role("button", name="给我发送链接").click()
    expect(page.get_by_role("heading", name="请查收邮件")).to_be_visible()
    untranslated += english_left(page)

    page.goto(emailed_link())
    expect(page.get_by_role("heading", name="确认注册")).to_be_visible()
    untranslated += english_left(page)
    page.get_by_role("button", name="登录并显示我的密钥").click()
    expect(page.get_by_role("heading", name=re.compile("您的新密钥"))).to_be_visible()
    untranslated += english_left(page)

    key = ApiKey.objects.get(owner__email="li@example.com")
    UsageSnapshot.objects.create(
        api_key=key, model="mock-gpt", requests=1234,
        hour=timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1),
        total_tokens=4_220_812, input_tokens=4_000_000, output_tokens=220_812,
    )
    page.get_by_role("link", name="前往我的密钥").click()
    expect(page.get_by_role("heading", name="我的密钥", exact=True)).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    untranslated += english_left(page)
    assert "4,220,812" in page.locator("main").inner_text()
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", page.locator(f"#key-{key.pk}").inner_text())

    assert not untranslated, "English left on the zh-Hans pages:\n" + "\n".join(untranslated)
    assert User.objects.get(email="li@example.com").language == "zh-hans"

    # The switch: English now, and still after a reload and on the next page.
    page.get_by_role("button", name="English").click()
    expect(page.get_by_role("heading", name="My keys", exact=True)).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    assert "4,220,812" in page.locator("main").inner_text()
    page.reload()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.goto(f"{live_server.url}/my-keys")
    expect(page.get_by_role("button", name="简体中文")).to_be_visible()
    assert User.objects.get(email="li@example.com").language == "en"

    page.get_by_role("button", name="简体中文").click()
    expect(page.get_by_role("heading", name="我的密钥", exact=True)).to_be_visible()
    assert User.objects.get(email="li@example.com").language == "zh-hans"
