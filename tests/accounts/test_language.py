"""The language switch and the language of the portal's emails: a request's own language for
mails sent while answering it, the person's stored one for mails cron sends later."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.conf import settings
from django.core import mail
from django.test import Client
from django.utils import translation

from accounts.models import User
from pool.models import ApiKey
from pool.services import keys_lifecycle, pool_generate
from pool.upstream import ProxyClient
from tests.accounts.mailbox import emailed_path
from tests.usage.conftest import issue
from usage.limits import limits_enforce
from usage.models import UsageSnapshot

pytestmark = pytest.mark.django_db
NOW = datetime(2036, 3, 10, 8, 30, tzinfo=dt_timezone.utc)
ZH = "zh-CN,zh;q=0.9,en;q=0.5"


def switch(client, language: str, next_url: str = "/my-keys"):
    return client.post("/i18n/setlang/", {"language": language, "next": next_url})


def test_the_switch_sets_the_cookie_and_the_signed_in_persons_language(client, ann):
    client.force_login(ann)
    answer = switch(client, "zh-hans")
    assert answer.status_code == 302 and answer["Location"] == "/my-keys"
    assert client.cookies[settings.LANGUAGE_COOKIE_NAME].value == "zh-hans"
    ann.refresh_from_db()
    assert ann.language == "zh-hans"
    page = client.get("/register").content.decode()  # the cookie wins over Accept-Language
    assert '<html lang="zh-hans">' in page and "退出登录" in page

    switch(client, "en")
    ann.refresh_from_db()
    assert ann.language == "en"
    assert '<html lang="en">' in client.get("/register", HTTP_ACCEPT_LANGUAGE=ZH).content.decode()


def test_an_unknown_language_changes_nothing(client, ann):
    client.force_login(ann)
    answer = switch(client, "klingon")
    assert answer.status_code == 302
    assert settings.LANGUAGE_COOKIE_NAME not in answer.cookies
    ann.refresh_from_db()
    assert ann.language == ""


def test_the_switch_never_redirects_off_site(client):
    answer = switch(client, "zh-hans", next_url="https://evil.example/")
    assert answer.status_code == 302 and not answer["Location"].startswith("https://evil")


def test_the_switch_is_post_only_and_needs_the_csrf_token(ann):
    careful = Client(enforce_csrf_checks=True)
    assert careful.get("/i18n/setlang/").status_code == 405
    assert careful.post("/i18n/setlang/", {"language": "zh-hans"}).status_code == 403


def test_the_header_offers_the_other_language_in_its_own_name(client):
    english = client.get("/login").content.decode()
    assert 'name="language" value="zh-hans" lang="zh-hans"' in english and "简体中文" in english
    chinese = client.get("/login", HTTP_ACCEPT_LANGUAGE=ZH).content.decode()
    assert 'value="en" lang="en" class="link">English</button>' in chinese


def test_a_sign_in_link_asked_from_a_chinese_browser_is_written_in_chinese(client, ann):
    client.post("/login", {"email": "ann@example.com"}, HTTP_ACCEPT_LANGUAGE=ZH)
    [message] = mail.outbox
    assert message.subject == "密钥门户：您的登录链接"
    assert "打开以下链接即可登录" in message.body and "Hello" not in message.body

    client.post("/login", {"email": "ann@example.com"}, HTTP_ACCEPT_LANGUAGE="en-US")
    assert mail.outbox[-1].subject == "Key Portal: your sign-in link"


def test_registering_from_a_chinese_browser_remembers_chinese_for_later_emails(client, fake_proxy):
    with ProxyClient.from_settings() as proxy:
        pool_generate(count=1, client=proxy)
    client.post("/register", {"email": "li@example.com", "name": "Li", "label": "laptop"},
                HTTP_ACCEPT_LANGUAGE=ZH)
    assert mail.outbox[-1].subject == "密钥门户：请确认注册"
    client.post(emailed_path(), HTTP_ACCEPT_LANGUAGE=ZH)
    assert User.objects.get(email="li@example.com").language == "zh-hans"


def test_a_stored_choice_is_not_overwritten_by_the_next_sign_in(client, ann):
    User.objects.filter(pk=ann.pk).update(language="zh-hans")
    client.post("/login", {"email": "ann@example.com"}, HTTP_ACCEPT_LANGUAGE="en")
    client.post(emailed_path(), HTTP_ACCEPT_LANGUAGE="en")
    ann.refresh_from_db()
    assert ann.language == "zh-hans"


@pytest.mark.parametrize(
    ("language", "subject", "body"),
    [
        ("zh-hans", "密钥门户：您的密钥 {key} 已用到每日 Token 限额的 80%",
         "用量达到 100% 时，该密钥将被暂停至"),
        ("", "Key Portal: your key {key} reached 80 % of its daily token limit",
         "At 100 % the key is suspended until"),
    ],
)
def test_a_limit_warning_is_written_in_the_persons_language(language, subject, body):
    [held] = issue(1, ["ann@example.com"])
    User.objects.filter(pk=held.key.owner_id).update(language=language)
    ApiKey.objects.filter(pk=held.key.pk).update(limit_tokens_day=100)
    UsageSnapshot.objects.create(api_key=held.key, model="m", hour=NOW.replace(minute=0),
                                 requests=1, total_tokens=85)
    limits_enforce(now=NOW, reconcile=False)
    [message] = mail.outbox
    assert message.subject == subject.format(key=held.key.masked)
    assert body in message.body


def test_a_chinese_persons_limit_warning_does_not_change_the_language_around_it():
    [held] = issue(1, ["ann@example.com"])
    User.objects.filter(pk=held.key.owner_id).update(language="zh-hans")
    ApiKey.objects.filter(pk=held.key.pk).update(limit_tokens_day=100)
    UsageSnapshot.objects.create(api_key=held.key, model="m", hour=NOW.replace(minute=0),
                                 requests=1, total_tokens=100)
    with translation.override("en"):
        report = limits_enforce(now=NOW, reconcile=False)
        assert translation.get_language() == "en"
        assert report.lines()[0] == "1 keys suspended for reaching a limit."
    assert "该密钥现已暂停" in mail.outbox[0].body


def test_an_expiry_notice_is_written_in_the_persons_language():
    [held] = issue(1, ["ann@example.com"])
    User.objects.filter(pk=held.key.owner_id).update(language="zh-hans")
    ApiKey.objects.filter(pk=held.key.pk).update(expires_at=NOW + timedelta(days=1))
    keys_lifecycle(now=NOW)
    [message] = mail.outbox
    assert message.subject == f"您的密钥门户密钥 {held.key.masked} 即将过期"
    assert "过期，之后将无法使用" in message.body
