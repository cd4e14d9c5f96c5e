"""The README's first screen and the reference under docs/: the two commands are there, and
every relative link in them leads to a file that exists (the reference moved out of the
README once; a renamed page must not leave a dead link behind)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_readme_first_screen_gives_the_two_commands_and_what_comes_next():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make run" in first_screen and "make test" in first_screen
    assert "createsuperuser" in first_screen
    assert len((ROOT / "README.md").read_bytes()) < 8000  # a page, not a manual


def test_every_relative_link_in_the_docs_leads_to_a_file():
    dead = []
    for doc in documents():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                dead.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not dead, dead


def test_every_page_under_docs_is_reachable_from_the_readme():
    linked: set[Path] = set()
    todo = [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target) or not target.split("#", 1)[0].endswith(".md"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if path.exists() and path not in linked:
                linked.add(path)
                todo.append(path)
    orphans = [str(p.relative_to(ROOT)) for p in documents()[1:] if p.resolve() not in linked]
    assert not orphans, orphans
