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


DOCS = [SRC.parents[1] / "README.md", SRC.parents[1] / "examples" / "README.md", SRC.parents[1] / "BENCHMARKS.md",
        *sorted((SRC.parents[1] / "docs").glob("*.md"))]
OUTSIDE_DOCS = re.compile(OUTSIDE.pattern + r"|\b[Ii]ssues? #\d+\b")


def test_docs_name_no_document_outside_the_repo():
    """The README, examples/README.md, BENCHMARKS.md and docs/ likewise."""
    hits = [f"{p.relative_to(SRC.parents[1])}:{n}: {line.strip()[:100]}"
            for p in DOCS for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not hits, "say what the issue or document says instead:\n" + "\n".join(hits)


def test_bench_scripts_and_tests_name_no_issue_or_outside_file():
    """bench/ and tests/ are read alongside the code: their docstrings and comments say what a script does, not which
    issue asked for it (results folders under bench/results/ are data and exempt)."""
    root = SRC.parents[1]
    paths = [p for p in sorted((root / "bench").glob("*")) if p.suffix in (".py", ".sh")]
    paths += [p for p in sorted((root / "tests").glob("*.py")) if p.name != "test_repo_references.py"]
    hits = [f"{p.relative_to(root)}:{n}: {line.strip()[:100]}" for p in paths
            for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not hits, "say what the script or test does instead:\n" + "\n".join(hits)
