"""A bounded, deterministic fuzz test of the story-file readers (text, YAML, TOML): every input, valid or
mangled, ends in a ``Story`` or a ``StoryError`` (never another exception), within a second and 100 MB of Python
allocations; a story that parses (up to 100 images) also turns into the UI's document and back into story files.

The inputs come from a seeded generator (no dependency, the same inputs on every run): valid stories mutated by
inserting, deleting, repeating and swapping pieces, with the characters parsers find hard (YAML's flow and anchor
syntax, quotes, control characters, line separators, emoji), plus hand-made hostile shapes (alias bombs, deep
nesting, huge numbers, tags, merge keys, duplicate keys). ``FUZZ_EXAMPLES`` (default 120 per format) sets the
budget; the whole test runs in a few seconds."""

from __future__ import annotations

import os
import random
import time
import tracemalloc

import pytest

from characonsist.app.stories import FORMATS, dump_story, parse_story, story_document
from characonsist.inputs import InputError
from characonsist.storyfile import Story, StoryError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
SEED = 24

TEXT = "park#a cat#sitting\npark#a cat#running | me.png\n\nbeach#a dog#swimming\nbeach#a dog#digging\n"
YAML = """title: A day
characters: {pip: a small red robot}
defaults: {seed: 11, height: 64}
scenes:
  - name: Park Day!
    background: a park
    character: pip
    identity: {action: standing, image: me.png}
    frames:
      - {action: waving, caption: hello}
      - {background: a beach, action: running, seed: 7, height: 32, width: 48}
  - frames:
      - background: a room
        character: a cat
        action: sleeping
        caption: |
          two
          lines
"""
TOML = """title = "A day"
[characters]
pip = "a small red robot"
[[scenes]]
name = "park"
background = "a park"
character = "pip"
[scenes.identity]
action = "standing"
[[scenes.frames]]
action = "waving"
caption = "hello \\u00e9"
seed = 7
"""
SEEDS = {"s.txt": TEXT, "s.yaml": YAML, "s.toml": TOML}
PIECES = ["[", "]", "{", "}", ":", ": ", ",", "-", "- ", "&a ", "*a", "<<: ", "!!binary ", "!!set ", "!!timestamp ",
          "!!python/object:os.system ", "? ", "|", ">", "#", "'", '"', "\\", "\\u0000", "\\x00", "=", "[[", "]]",
          "\n", "\r\n", "\r", "\t", "  ", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff", "é", "😀", "9" * 30,
          "1e400", "nan", ".inf", "true", "null", "~", "2024-01-01", "0x10", "scenes", "frames", "identity",
          "caption", "name", "seed", "height", "width", "image", "background", "character", "action", "title"]


def hostile(rng: random.Random, name: str) -> str:
    """One hand-made hostile shape for the format of ``name``."""
    depth = rng.choice([3, 8, 40, 2000])
    if name.endswith(".yaml"):
        levels = rng.randint(1, 12)
        bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, levels + 1))
        return rng.choice([
            bomb + f"title: *a{levels}\nscenes: [{{frames: [{{background: p, character: c, action: a}}]}}]\n",
            "[" * depth + "]" * depth, "{a: " * depth + "b" + "}" * depth, "- " * depth + "x\n",
            "scenes: [{frames: [{background: p, character: c, action: a, seed: " + "9" * 5000 + "}]}]\n",
            "scenes: !!set {a, b}\n", "title: !!binary aGVsbG8=\nscenes: []\n", "? [a, b]\n: c\n",
            "scenes:\n  - frames:\n    - background: p\n      background: q\n", "&a a: *a\n", "*a\n", "--- a\n--- b\n",
        ])
    if name.endswith(".toml"):
        return rng.choice([
            "a = " + "[" * depth + "]" * depth, "a = " + "{b = " * depth + "1" + "}" * depth,
            'title = "x"\ntitle = "y"\n', "[[scenes]]\n" * depth, "seed = " + "9" * 5000 + "\n",
            'scenes = [{frames = [{background = "p", character = "c", action = "\\u0000"}]}]\n',
        ])
    return rng.choice(["#" * depth, "a#b#c\n" * depth, "a#b#c | \n", "|" * depth, "a#b#c\x00\n", "\n" * depth,
                       "a#b#c | /dev/zero\n", "a#b#c\u2028a#b#c\n"])


def mutate(rng: random.Random, text: str) -> str:
    """``text`` with a few random edits (insert, delete, repeat, swap lines)."""
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(text))
        kind = rng.random()
        if kind < 0.45:
            text = text[:at] + rng.choice(PIECES) + text[at:]
        elif kind < 0.65:
            text = text[:at] + text[at + rng.randint(1, 12):]
        elif kind < 0.85:
            end = min(len(text), at + rng.randint(1, 40))
            text = text[:at] + text[at:end] * rng.randint(2, 50) + text[end:]
        else:
            lines = text.split("\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def inputs(name: str, count: int) -> list[str]:
    rng = random.Random(f"{SEED}-{name}")
    made = [SEEDS[name]]
    while len(made) < count:
        made.append(hostile(rng, name) if rng.random() < 0.2 else mutate(rng, SEEDS[name]))
    return made


def read(text: str, name: str) -> Story | None:
    """Parse ``text`` as the file ``name`` would be: the story, or None when it is refused (with messages); any
    other exception propagates."""
    try:
        return parse_story(text, name)
    except StoryError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        assert len(str(error)) < 20_000           # messages are cut short, whatever the input held
        return None


def round_trip(story: Story) -> None:
    """A story that parses becomes the UI's document and story files in every format again."""
    assert story.groups
    doc = story_document(story)
    for fmt in FORMATS:
        try:
            dump_story(doc, fmt)
        except InputError:                       # the text format cannot hold captions, titles, ...
            pass


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_no_story_file_input_raises_or_takes_more_than_a_second_or_100_mb(name):
    outcomes = {"story": 0, "refused": 0}
    for text in inputs(name, EXAMPLES):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            try:
                story = read(text, name)
            except Exception as error:   # noqa: BLE001 - the failure names the input
                pytest.fail(f"{name}: {type(error).__name__}: {error} for input {text[:300]!r}")
            took = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert took < 1.0, f"{name}: {took:.2f}s for input {text[:300]!r}"
        assert peak < 100 * 2**20, f"{name}: {peak / 2**20:.0f} MB for input {text[:300]!r}"
        outcomes["refused" if story is None else "story"] += 1
        if story is not None and sum(len(g.images) for g in story.groups) <= 100:
            try:
                round_trip(story)
            except Exception as error:   # noqa: BLE001
                pytest.fail(f"{name}: round trip: {type(error).__name__}: {error} for input {text[:300]!r}")
    assert outcomes["story"] >= 1 and outcomes["refused"] >= EXAMPLES // 4, outcomes   # both paths were exercised
