"""README and the documentation site: short README, every link alive, every page in the site's navigation, no
internal tracker numbers in what a user reads. (``nox -s docs`` builds the site itself with ``--strict``.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(text: str) -> list[str]:
    return [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_readme_is_short_and_every_link_it_has_exists():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = _relative_links(readme)
    assert len([t for t in links if t.startswith("docs/")]) >= 12  # it points into the docs rather than holding them
    assert [t for t in links if not (ROOT / t).exists()] == []


def test_every_docs_page_is_in_the_navigation_and_its_links_exist():
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert pages == nav
    broken = []
    for page in _pages():
        for target in _relative_links(page.read_text()):
            # pages link to pages beside them, and to recorded pictures the site takes from benchmarks/results
            resolved = (page.parent / target).resolve()
            from_root = (ROOT / (page.parent / target).relative_to(DOCS).as_posix()).resolve() if target else None
            if target and not resolved.exists() and not (from_root and from_root.exists()):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_no_internal_issue_numbers_in_what_users_read():
    pattern = re.compile(r"\bissues?\s*#?\d+", re.I)
    texts = {"README.md": (ROOT / "README.md").read_text()} | {p.relative_to(ROOT).as_posix(): p.read_text() for p in _pages()}
    assert {name: pattern.findall(text) for name, text in texts.items() if pattern.search(text)} == {}
