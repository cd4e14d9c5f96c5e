"""Simplified Chinese: every string the project marks for translation has one, the catalog the
portal reads is the committed .po, and numbers and dates read the same way in both languages."""

from __future__ import annotations

import gettext
import re
import shutil
import subprocess
from datetime import datetime
from datetime import timezone as dt_timezone
from pathlib import Path

import pytest
from django.core.management import call_command
from django.template import Context, Template
from django.utils import timezone, translation
from django.utils.formats import date_format, number_format

from scripts.compilemessages import Entry, mo_bytes, parse_po, untranslated

ROOT = Path(__file__).resolve().parent.parent
PO = ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"
# What `scripts/messages.sh` extracts from: the project's own code and templates.
SOURCE_DIRS = ("accounts", "keyportal", "pool", "usage", "templates")
SOURCE_SUFFIXES = {".py", ".html", ".txt"}


def gettext_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # never skip: `make setup-dev` installs it (scripts/gettext.sh)
        pytest.fail(f"{name} is missing: run `make setup-dev` (scripts/gettext.sh installs gettext).")
    return path


def extracted_msgids(tmp_path: Path, settings) -> set[tuple[str | None, str]]:
    """The (msgctxt, msgid) pairs a fresh `makemessages -l zh_Hans` finds, run on a copy of
    the sources so that the real locale/ is neither read nor written."""
    gettext_tool("xgettext")
    tree = tmp_path / "src"
    for name in SOURCE_DIRS:
        for path in (ROOT / name).rglob("*"):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                target = tree / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    (tree / "locale").mkdir()
    settings.LOCALE_PATHS = [tree / "locale"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tree)
        call_command("makemessages", locale=["zh_Hans"], no_location=True, verbosity=0)
    fresh = parse_po(tree / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po")
    return {(e.msgctxt, e.msgid) for e in fresh if e.msgid}


def test_every_extracted_string_has_a_zh_hans_translation(tmp_path, settings):
    extracted = extracted_msgids(tmp_path, settings)
    translated = {(e.msgctxt, e.msgid) for e in parse_po(PO) if e.translated}
    missing = sorted(extracted - translated, key=lambda pair: pair[1])
    assert len(extracted) > 400  # the extraction really ran over the project
    assert not missing, (
        f"{len(missing)} strings have no zh-Hans translation: run scripts/messages.sh, then "
        "translate them in locale/zh_Hans/LC_MESSAGES/django.po:\n"
        + "\n".join(f"  {msgid!r}" + (f" (context {ctx!r})" if ctx else "") for ctx, msgid in missing)
    )


def test_the_po_has_no_empty_or_fuzzy_entry():
    assert untranslated(PO) == []
    header = parse_po(PO)[0]
    assert header.msgid == "" and not header.fuzzy
    assert "Plural-Forms: nplurals=1; plural=0;" in header.msgstr[0]


def test_a_new_template_string_without_translation_is_listed(tmp_path, settings):
    """The check above catches a string added to a template and not translated."""
    extra = ROOT / "templates" / "accounts" / "zz_i18n_probe.html"
    extra.write_text('{% load i18n %}<p>{% translate "A sentence nobody translated yet" %}</p>')
    try:
        extracted = extracted_msgids(tmp_path, settings)
    finally:
        extra.unlink()
    translated = {(e.msgctxt, e.msgid) for e in parse_po(PO) if e.translated}
    assert extracted - translated == {(None, "A sentence nobody translated yet")}


# --- the compiler ---------------------------------------------------------------------------

SAMPLE_PO = r'''# a comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=1; plural=0;\n"

#: x.py
msgid "Key"
msgstr "密钥"

#, fuzzy
msgid "Half done"
msgstr "半"

msgid "Not yet"
msgstr ""

msgctxt "menu"
msgid "Open"
msgstr "打开"

#, python-format
msgid "%(n)d key"
msgid_plural "%(n)d keys"
msgstr[0] "%(n)d 个密钥"

msgid ""
"Two\n"
"lines with \"quotes\" and a \\ backslash"
msgstr ""
"两行\n"
"带“引号”和 \\ 反斜杠"

#~ msgid "Gone"
#~ msgstr "已删除"
'''


def load(mo: bytes, tmp_path: Path, name: str) -> gettext.GNUTranslations:
    path = tmp_path / name
    path.write_bytes(mo)
    with path.open("rb") as handle:
        return gettext.GNUTranslations(handle)


def test_compiler_reads_contexts_plurals_escapes_and_leaves_out_fuzzy_and_empty(tmp_path):
    po = tmp_path / "sample.po"
    po.write_text(SAMPLE_PO, encoding="utf-8")
    catalog = load(mo_bytes(parse_po(po)), tmp_path, "mine.mo")
    assert catalog.gettext("Key") == "密钥"
    assert catalog.pgettext("menu", "Open") == "打开"
    assert catalog.gettext("Open") == "Open"
    assert catalog.ngettext("%(n)d key", "%(n)d keys", 5) == "%(n)d 个密钥"
    assert catalog.gettext('Two\nlines with "quotes" and a \\ backslash') == "两行\n带“引号”和 \\ 反斜杠"
    assert catalog.gettext("Half done") == "Half done"  # fuzzy: left out, as msgfmt does
    assert catalog.gettext("Not yet") == "Not yet"
    assert catalog.gettext("Gone") == "Gone"


def catalog_without_header(catalog: gettext.GNUTranslations) -> dict:
    return {k: v for k, v in catalog._catalog.items() if k != ""}  # type: ignore[attr-defined]


@pytest.mark.parametrize("source", ["sample", "project"])
def test_compiler_agrees_with_gnu_msgfmt(tmp_path, source):
    po = PO
    if source == "sample":
        po = tmp_path / "sample.po"
        po.write_text(SAMPLE_PO, encoding="utf-8")
    subprocess.run([gettext_tool("msgfmt"), "-o", str(tmp_path / "gnu.mo"), str(po)], check=True)
    gnu = gettext.GNUTranslations((tmp_path / "gnu.mo").open("rb"))
    mine = load(mo_bytes(parse_po(po)), tmp_path, "mine.mo")
    assert catalog_without_header(mine) == catalog_without_header(gnu)
    assert len(catalog_without_header(mine)) == sum(
        1 for e in parse_po(po) if e.msgid and e.translated
    )


def test_compiler_refuses_a_broken_po(tmp_path):
    po = tmp_path / "broken.po"
    po.write_text('msgid "Key"\n\nmsgstr "密钥"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no msgstr"):
        parse_po(po)


def test_the_portal_reads_the_committed_catalog():
    mo = PO.with_suffix(".mo")
    assert mo.exists() and mo.stat().st_mtime >= PO.stat().st_mtime  # compiled by the suite
    entries: list[Entry] = [e for e in parse_po(PO) if e.msgid and e.msgid_plural is None]
    with translation.override("zh-hans"):
        wrong = [
            e.msgid for e in entries
            if (translation.pgettext(e.msgctxt, e.msgid) if e.msgctxt else translation.gettext(e.msgid))
            != e.msgstr[0]
        ]
    assert not wrong, wrong[:10]


# --- numbers and dates ----------------------------------------------------------------------

WHEN = datetime(2026, 11, 23, 22, 32, tzinfo=dt_timezone.utc)


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_numbers_group_by_thousands_and_table_dates_are_iso_like(language):
    with translation.override(language):
        assert number_format(4220812, force_grouping=True) == "4,220,812"
        assert Template("{{ n }}").render(Context({"n": 4220812})) == "4,220,812"
        assert Template("{% load usage_tags %}{{ n|grouped }}").render(Context({"n": 4220812})) == "4,220,812"
        assert date_format(WHEN, "SHORT_DATETIME_FORMAT") == "2026-11-23 22:32"
        assert date_format(WHEN, "DATETIME_FORMAT") == "2026-11-23 22:32"
        assert date_format(WHEN.date(), "SHORT_DATE_FORMAT") == "2026-11-23"


BIG = 12345  # a primary key past 1,000


@pytest.fixture
def big_ids(db):
    """A person and a key whose primary keys are 12345, with some usage."""
    from accounts.models import User
    from pool.models import ApiKey
    from pool.services import pool_keys_create
    from tests.usage.conftest import served

    owner = User.objects.create_user("li@example.com", id=BIG)
    [key] = pool_keys_create(count=1)
    ApiKey.objects.filter(pk=key.pk).update(id=BIG)
    ApiKey.objects.filter(pk=BIG).update(status="active", owner=owner, value=None,
                                         issued_at=WHEN, label="laptop")
    served(ApiKey.objects.get(pk=BIG), at=timezone.now(), input_tokens=4_000_000,
           output_tokens=220_812)
    return owner


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_ids_in_pages_never_carry_a_thousands_separator(client, big_ids, admin_user, language):
    """USE_THOUSAND_SEPARATOR writes `{{ key.pk }}` as `12,345`: an id, anchor or query
    string made of it would break from the 1000th row. Ids go through `|unlocalize`."""
    found = []
    client.force_login(big_ids)
    pages = [("/my-keys", {}), (f"/my-keys/{BIG}", {}), (f"/my-keys/{BIG}/revoke", {}),
             (f"/my-keys/{BIG}/revoke", {"HTTP_HX_REQUEST": "true"})]
    for url, headers in pages:
        answer = client.get(url, HTTP_ACCEPT_LANGUAGE=language, **headers)
        assert answer.status_code == 200, url
        html = answer.content.decode()
        found += [f"{url}: {attr}" for attr in re.findall(r'[\w-]+="[^"]*12,345[^"]*"', html)]
    assert "4,220,812" in client.get("/my-keys").content.decode()  # numbers are grouped
    client.force_login(admin_user)
    html = client.get("/staff/leaderboard?period=all", HTTP_ACCEPT_LANGUAGE=language).content.decode()
    assert "li@example.com" in html
    found += [f"/staff/leaderboard: {attr}" for attr in re.findall(r'[\w-]+="[^"]*12,345[^"]*"', html)]
    assert not found, "add |unlocalize to these ids:\n" + "\n".join(found)


# --- full-width punctuation in Chinese ------------------------------------------------------

_CJK = "\u3400-\u4dbf\u4e00-\u9fff"
# An ASCII colon, comma, semicolon, "!" or "?" right after a Chinese character (a space between
# allowed), where it ends a clause: followed by a space, the end, or more Chinese. Code keeps
# its ASCII ("以 ?preset= 指定", "Authorization: Bearer"): there the mark is followed by code.
_ASCII_AFTER_CJK = re.compile(rf"[{_CJK}] ?[:,;!?](?=\s|$|[{_CJK}])")
# ASCII parentheses around Chinese words ("(3 分钟前)"); %(name)s placeholders are not that.
_ASCII_PARENS_ON_CJK = re.compile(rf"(?<!%)\((?:(?!%\()[^()])*[{_CJK}][^()]*\)")


def ascii_punctuation_in_chinese(text: str) -> list[str]:
    return [text[max(m.start() - 12, 0):m.end() + 12]
            for pattern in (_ASCII_AFTER_CJK, _ASCII_PARENS_ON_CJK) for m in pattern.finditer(text)]


def test_the_punctuation_check_finds_ascii_marks_in_chinese_and_leaves_code_alone():
    for bad in ("时段: 今天", "密钥,然后", "完成;", "(3 分钟前)", "您的新密钥: laptop"):
        assert ascii_punctuation_in_chinese(bad), bad
    for fine in ("时段：今天", "请以 ?from=YYYY-MM-DD 指定", "令牌：Authorization: Bearer kpt_…",
                 "%(n)s 个请求（%(f)s 次失败）", "（至少：%(n)s）", "Key %(key)s: ok"):
        assert not ascii_punctuation_in_chinese(fine), fine


def test_chinese_translations_use_full_width_punctuation():
    wrong = [(e.msgid, found) for e in parse_po(PO) for text in e.msgstr.values()
             for found in ascii_punctuation_in_chinese(text)]
    assert not wrong, wrong[:10]


@pytest.mark.django_db
def test_chinese_pages_glue_no_ascii_punctuation_to_chinese_words(client, settings):
    from pool.services import key_assign
    from tests.pool.conftest import _make_ready_keys
    from accounts.models import User

    _make_ready_keys(2)
    ann = User.objects.create_user("ann@example.com", name="Ann", language="zh-hans")
    client.force_login(ann)
    client.post("/my-keys/add", {"label": "laptop"})
    key = key_assign(user=ann, label="ci").key
    pages = {path: client.get(path, HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
             for path in ("/my-keys/new-key", "/my-keys", f"/my-keys/{key.pk}", "/api/docs")}
    assert "您的新密钥：laptop" in pages["/my-keys/new-key"]
    for path, page in pages.items():
        text = re.sub(r"<[^>]+>", "", re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S))
        assert not ascii_punctuation_in_chinese(text), (path, ascii_punctuation_in_chinese(text))
