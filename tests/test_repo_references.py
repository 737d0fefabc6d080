"""The repository is its own reference: source docstrings and comments name the repo's docs, never a file outside
it (the team's design notes, the seed papers' file numbers) or an issue number, which a reader of the code alone
cannot open."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "characonsist"
OUTSIDE = re.compile(r"DESIGN\.md|\bseed 00\d\b|\bseeds/|\.\./shared|\b[Ii]ssues? \d+\b")


def test_source_names_no_document_outside_the_repo():
    hits = [f"{p.relative_to(SRC.parent)}:{n}: {line.strip()[:100]}"
            for p in sorted(SRC.rglob("*.py")) for n, line in enumerate(p.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "name the repo's own docs instead:\n" + "\n".join(hits)


DOCS = [SRC.parents[1] / "README.md", SRC.parents[1] / "examples" / "README.md",
        *sorted((SRC.parents[1] / "docs").glob("*.md"))]
OUTSIDE_DOCS = re.compile(OUTSIDE.pattern + r"|\b[Ii]ssues? #\d+\b")


def test_docs_name_no_document_outside_the_repo():
    """The README, examples/README.md and docs/ likewise (BENCHMARKS.md is the results log, kept by date)."""
    hits = [f"{p.relative_to(SRC.parents[1])}:{n}: {line.strip()[:100]}"
            for p in DOCS for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not hits, "say what the issue or document says instead:\n" + "\n".join(hits)
