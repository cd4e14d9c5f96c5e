#!/usr/bin/env python3
"""Compiles every locale/*/LC_MESSAGES/*.po into its .mo, in pure Python.

Django's own `compilemessages` needs GNU gettext's msgfmt, which a fresh Debian machine lacks
and which `make run` could only install as root (from a package mirror an intranet machine
may not reach). The .po format the portal uses is small (msgctxt, msgid, msgid_plural,
msgstr[n], "#, fuzzy"), so this script reads it and writes the GNU .mo layout that Python's
`gettext` (and so Django) reads. Fuzzy entries and untranslated ones are left out, as msgfmt
does. A .mo newer than its .po is left alone, so `make run` costs nothing the second time.

Usage: python scripts/compilemessages.py [--force | --check | --untranslated]
  --force         compile every .po, changed or not
  --check         compile nothing; exit 1 when a .mo is missing or older than its .po
  --untranslated  compile nothing; list the entries left empty or fuzzy (exit 1 if any)
"""

from __future__ import annotations

import ast
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "locale"


@dataclass
class Entry:
    msgid: str = ""
    msgctxt: str | None = None
    msgid_plural: str | None = None
    msgstr: dict[int, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False

    @property
    def fuzzy(self) -> bool:
        return "fuzzy" in self.flags

    @property
    def translated(self) -> bool:
        return bool(self.msgstr) and all(self.msgstr.values()) and not self.fuzzy


def _unquote(text: str, where: str) -> str:
    text = text.strip()
    if not (len(text) >= 2 and text[0] == text[-1] == '"'):
        raise ValueError(f"{where}: expected a quoted string, got {text!r}")
    # A .po string is a C string; Python's literal syntax reads the escapes .po files use
    # (\n, \t, \", \\). Strings are UTF-8 text, so no byte escapes are involved.
    return ast.literal_eval(text)


def parse_po(path: Path) -> list[Entry]:
    """The entries of a .po file, header (msgid "") first, obsolete (#~) ones dropped."""
    entries: list[Entry] = []
    entry = Entry()
    current: tuple[str, int | None] | None = None
    started = False

    def finish() -> None:
        nonlocal entry, current, started
        if started and not entry.obsolete:
            if not entry.msgstr:
                raise ValueError(f"{path}: the entry {entry.msgid!r} has no msgstr")
            entries.append(entry)
        entry, current, started = Entry(), None, False

    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{number}"
        if not line:
            finish()
            continue
        if line.startswith("#~"):
            entry.obsolete = True
            continue
        if line.startswith("#,"):
            if started and current and current[0] == "msgstr":
                finish()
            entry.flags |= {flag.strip() for flag in line[2:].split(",")}
            continue
        if line.startswith("#"):
            if started and current and current[0] == "msgstr":
                finish()
            continue
        keyword, _, rest = line.partition(" ")
        if line.startswith('"'):
            if current is None:
                raise ValueError(f"{where}: continuation line outside an entry")
            name, index = current
            value = _unquote(line, where)
            if name == "msgstr":
                entry.msgstr[index or 0] += value
            else:
                setattr(entry, name, getattr(entry, name) + value)
            continue
        if keyword in ("msgctxt", "msgid") and started and current and current[0] == "msgstr":
            finish()  # entries not separated by a blank line
        if keyword.startswith("msgstr") and current is None:
            raise ValueError(f"{where}: msgstr without a msgid")
        started = True
        if keyword.startswith("msgstr["):
            index = int(keyword[len("msgstr["):-1])
            entry.msgstr[index] = _unquote(rest, where)
            current = ("msgstr", index)
        elif keyword == "msgstr":
            entry.msgstr[0] = _unquote(rest, where)
            current = ("msgstr", 0)
        elif keyword in ("msgid", "msgctxt", "msgid_plural"):
            setattr(entry, keyword, _unquote(rest, where))
            current = (keyword, None)
        else:
            raise ValueError(f"{where}: cannot read {line!r}")
    finish()
    return entries


def mo_bytes(entries: list[Entry]) -> bytes:
    """The GNU .mo file (little-endian, no hash table) of the translated entries."""
    catalog: dict[bytes, bytes] = {}
    for entry in entries:
        if entry.msgid == "" and entry.msgctxt is None:
            # The header always goes in: it names the charset and the plural rule.
            catalog[b""] = entry.msgstr.get(0, "").encode("utf-8")
            continue
        if not entry.translated:
            continue
        key = entry.msgid
        if entry.msgid_plural is not None:
            key += "\0" + entry.msgid_plural
            value = "\0".join(entry.msgstr[i] for i in sorted(entry.msgstr))
        else:
            value = entry.msgstr[0]
        if entry.msgctxt is not None:
            key = entry.msgctxt + "\x04" + key
        catalog[key.encode("utf-8")] = value.encode("utf-8")
    keys = sorted(catalog)
    count = len(keys)
    originals_at = 7 * 4
    translations_at = originals_at + count * 8
    data_at = translations_at + count * 8
    table_o, table_t, data = [], [], b""
    for key in keys:
        table_o.append((len(key), data_at + len(data)))
        data += key + b"\0"
    for key in keys:
        value = catalog[key]
        table_t.append((len(value), data_at + len(data)))
        data += value + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, originals_at, translations_at, 0, 0)
    tables = b"".join(struct.pack("<2I", *pair) for pair in table_o + table_t)
    return header + tables + data


def po_files() -> list[Path]:
    return sorted(LOCALE.glob("*/LC_MESSAGES/*.po"))


def stale(po: Path) -> bool:
    mo = po.with_suffix(".mo")
    return not mo.exists() or mo.stat().st_mtime < po.stat().st_mtime


def compile_all(*, force: bool = False) -> list[Path]:
    """Writes the .mo of every .po that changed since (or all, with `force`); the written."""
    written = []
    for po in po_files():
        if force or stale(po):
            mo = po.with_suffix(".mo")
            tmp = mo.with_suffix(f".mo.{os.getpid()}.tmp")
            tmp.write_bytes(mo_bytes(parse_po(po)))
            tmp.replace(mo)  # atomic: a running server (or a parallel run) never reads half a file
            written.append(mo)
    return written


def untranslated(po: Path) -> list[str]:
    """The msgids of `po` with an empty or fuzzy translation."""
    return [e.msgid for e in parse_po(po) if e.msgid and not e.translated]


def main(argv: list[str]) -> int:
    if "--untranslated" in argv:
        missing = [(po, msgid) for po in po_files() for msgid in untranslated(po)]
        for po, msgid in missing:
            print(f"{po.relative_to(ROOT)}: {msgid!r}")
        return 1 if missing else 0
    if "--check" in argv:
        old = [po for po in po_files() if stale(po)]
        for po in old:
            print(f"{po.with_suffix('.mo').relative_to(ROOT)} is missing or older than its .po")
        return 1 if old else 0
    for mo in compile_all(force="--force" in argv):
        print(f"compiled {mo.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
