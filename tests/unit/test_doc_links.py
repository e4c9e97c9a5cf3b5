"""The docs' links hold: a link to a section (``#anchor``) names a heading of that page (GitHub's
anchors: lower case, punctuation dropped, spaces as hyphens), and a link to a file names one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(text: str) -> set[str]:
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_section_and_file_link_resolves():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            page = (doc.parent / path) if path else doc
            if not page.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in anchors(page.read_text()):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
