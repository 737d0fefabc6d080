"""The editor page's own logic (static/app.js), run in Node without a browser: the story's folder name and the
hints of the empty form."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

STATIC = Path(__file__).parents[1] / "src" / "characonsist" / "ui" / "static"
NODE = shutil.which("node") or shutil.which("nodejs")


def _function(source: str, name: str) -> str:
    """The text of ``function name(...) {...}`` in ``source`` (braces matched)."""
    start = source.index(f"function {name}(")
    depth, i = 0, source.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i + 1]
        i += 1


def _run(steps: list[tuple[str, str]]) -> list[str]:
    """Set the title to each step's title (and the name field to its name), call storyName() like Check does,
    return the names it gave."""
    if NODE is None:
        pytest.skip("node is not installed")
    source = (STATIC / "app.js").read_text()
    script = "\n".join([
        'const fields = {"#name": {value: "", placeholder: ""}};',
        "const $ = sel => fields[sel];",
        "let story = {title: ''};",
        _function(source, "slug"), _function(source, "storyName"),
        f"const steps = {json.dumps(steps)};",
        "const out = [];",
        "for (const [title, name] of steps) { story.title = title; if (name !== null) fields['#name'].value = name;"
        " out.push(storyName()); }",
        "console.log(JSON.stringify(out));"])
    result = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_an_empty_name_follows_the_title_even_after_a_check_on_an_empty_form():
    # Check on the empty form, then a title: the folder is the title's slug, not "story"
    assert _run([["", None], ["A Day at Sea!", None]]) == ["story", "a-day-at-sea"]
    assert _run([["A Day at Sea", "my-own"]]) == ["my-own"]          # a typed name wins


def test_the_empty_forms_hints_cannot_pass_for_a_story():
    """Every hint of a story field is marked as an example, so an empty form never looks filled in."""
    hints = re.findall(r'placeholder="([^"]*)"', (STATIC / "index.html").read_text())
    hints += re.findall(r'placeholder: "([^"]*)"', (STATIC / "app.js").read_text())
    content = [h for h in hints if " " in h or h[:1].isupper()]   # hints that read like text a user wrote
    assert content and all(h.startswith("e.g. ") for h in content), content
