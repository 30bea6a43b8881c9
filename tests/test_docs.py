"""The documentation holds together: README.md stays a front page, and every relative link in README.md and
docs/*.md names a file in the repository (and, with a #fragment, a heading of that file). No servers."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets ("[`[1]` marker](...)").
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, each with its inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def link_targets(text: str) -> list[str]:
    """Every link target of a Markdown text: inline links, images and reference definitions."""
    targets = []
    for line in prose_lines(text):
        targets.extend(INLINE_LINK.findall(line))
        if definition := REFERENCE_DEFINITION.match(line):
            targets.append(definition.group(1))
    return targets


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered, lowercased, punctuation dropped except hyphens
    (and underscores, which GitHub keeps as word characters), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file; a repeated slug gets -1, -2, ..."""
    seen: Counter[str] = Counter()
    found = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it names, its #fragment) for every relative link of a page."""
    links = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        links.append((target, file, unquote(fragment)))
    return links


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_in_the_docs_resolves_to_a_file_in_the_repository(page: Path) -> None:
    broken = []
    for target, file, _ in relative_links(page):
        if not file.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not file.exists():
            broken.append(f"{target}: no such file ({file.relative_to(ROOT)})")
    assert not broken, f"{page_id(page)} links to what is not there:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_anchor_link_in_the_docs_names_a_heading_of_its_page(page: Path) -> None:
    broken = []
    for target, file, fragment in relative_links(page):
        if fragment and file.suffix == ".md" and file.is_file() and fragment not in anchors(file):
            broken.append(f"{target}: {file.relative_to(ROOT)} has no heading #{fragment}")
    assert not broken, f"{page_id(page)} links to headings that are not there:\n" + "\n".join(broken)


def test_readme_stays_a_front_page_under_250_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_the_docs_are_found_and_hold_links() -> None:
    """Guards the two tests above against passing on nothing (a wrong folder, a regex that matches no link)."""
    assert README in PAGES and len(PAGES) > 1
    assert any(relative_links(page) for page in PAGES)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Prefix caching: `--prefix-cache-bytes`", "prefix-caching---prefix-cache-bytes"),
        ("`make up`, `make down`, `make status`", "make-up-make-down-make-status"),
        ("The llama.cpp runner: `--runner llamacpp`", "the-llamacpp-runner---runner-llamacpp"),
        ("What was measured, and what it decided", "what-was-measured-and-what-it-decided"),
        ("Runtime state: `var/`", "runtime-state-var"),
    ],
)
def test_heading_anchors_follow_githubs_slug_rules(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_links_inside_code_are_not_links_and_external_ones_are_skipped(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[here](other.md#a-heading) and ![a picture](images/x.png) and [web](https://example.com/x.md)\n"
        "`[not a link](missing.md)` and [mail](mailto:someone@example.com) and [self](#title)\n"
        "```\n[also not](missing.md)\n# not a heading\n```\n"
        "[ref]: ref.md\n",
        encoding="utf-8",
    )
    assert [(target, fragment) for target, _, fragment in relative_links(page)] == [
        ("other.md#a-heading", "a-heading"),
        ("images/x.png", ""),
        ("#title", "title"),
        ("ref.md", ""),
    ]
    assert anchors(page) == {"title"}
