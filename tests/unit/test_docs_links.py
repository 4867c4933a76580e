"""Every relative link in README.md and docs/*.md points at a file that exists (and a heading, if it names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def links(text: str) -> list[str]:
    """Link targets of a markdown text, outside fenced blocks and inline code."""
    prose = CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    out = set()
    for title in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower())
        out.add(slug.replace(" ", "-"))
    return out


def broken(page: Path) -> list[str]:
    """The relative links of ``page`` whose file (or heading) does not exist."""
    text = page.read_text()
    out = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            out.append(f"{target}: no heading #{fragment} in {dest.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken(page) == []


def test_the_docs_pages_exist() -> None:
    assert {p.name for p in PAGES} >= {
        "README.md",
        "routing.md",
        "batching.md",
        "guarantees.md",
        "operations.md",
        "benchmarks.md",
    }


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-heading) [web](https://example.com) [self](#top)\n"
        "# Top\n"
        "[gone](missing.md) [bad anchor](other.md#nope) ![img](img.png)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
    )
    assert broken(page) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "img.png: no such file",
    ]
