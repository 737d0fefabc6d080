"""The one seed rule (``characonsist.seeds``): every front end spreads a seed the same way and shares one default."""

import inspect
import re
from pathlib import Path

import pytest

from characonsist.seeds import DEFAULT_SEED, mix_seed, story_seeds

SRC = Path(__file__).parents[1] / "src" / "characonsist"


def test_spread_and_own_seeds():
    assert story_seeds(7, 3, "shared") == [7, 7, 7]
    assert story_seeds(7, 3, "per_image") == [7, mix_seed(7, 1), mix_seed(7, 2)]
    assert story_seeds(7, 3, "shared", own=[None, 5, None]) == [7, 5, 7]          # an image's own seed wins
    assert story_seeds(7, 3, "per_image", own=[1, None, None]) == [1, mix_seed(7, 1), mix_seed(7, 2)]
    with pytest.raises(ValueError, match="own seeds: got 2 for 3 images"):
        story_seeds(7, 3, "shared", own=[None, None])


def test_every_front_end_defaults_to_the_one_seed():
    from characonsist.app.request import StoryRequest
    from characonsist.cli import build_parser
    from characonsist.pipeline import CharaConsistPipeline
    from characonsist.toy.bench_two import run_two_bench
    from characonsist.toy.runner import run_bench
    from characonsist.ui.form import Settings

    assert DEFAULT_SEED == 2025   # CharaConsist's official seed; changing it changes every image
    assert inspect.signature(CharaConsistPipeline.__call__).parameters["seed"].default == DEFAULT_SEED
    assert inspect.signature(run_bench).parameters["seed"].default == DEFAULT_SEED
    assert inspect.signature(run_two_bench).parameters["seed"].default == DEFAULT_SEED
    assert StoryRequest(stories=[], model="m", out="o").seed == DEFAULT_SEED
    assert Settings().seed == DEFAULT_SEED
    assert build_parser().parse_args(["generate", "s.yaml", "--model", "m", "--out", "o"]).seed == DEFAULT_SEED


def test_no_literal_default_seed_left_in_the_code():
    """The default is written once: no other module (or the UI page) spells 2025 as a seed."""
    found = []
    for path in sorted(SRC.rglob("*")):
        if path.suffix not in (".py", ".js", ".html") or path.name == "seeds.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "seed" in line and re.search(r"[=:,(?]\s*\"?2025\b(?!})", line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert found == []
