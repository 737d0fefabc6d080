"""Two-character toy stories: the suite, the scoring of ``bench toy --two-characters``, its oracle and command."""

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from characonsist.toy import bench, bench_two, suite, world
from characonsist.toy.bench_two import aggregate_two, oracle_two_images, run_two_bench, score_two_story

ROOT = Path(__file__).resolve().parents[1]
ATTRS = tuple(world.ATTRIBUTES)


def test_two_character_suite_is_seeded_and_well_formed():
    stories = suite.two_character_suite()
    assert len(stories) == 36 and suite.two_character_suite() == stories
    assert suite.two_character_suite(seed=1) != stories
    assert len({s.name for s in stories}) == 36 and len({s.seed for s in stories}) == 36
    assert min(s.seed for s in stories) >= suite.TWO_OFFSET       # other noise than the single-character suites
    for mode in suite.MODES:
        these = [s for s in stories if s.mode == mode]
        assert len(these) == 12
        assert Counter(s.kinds for s in these) == {p: 2 for p in suite.KIND_PAIRS}   # every ordered pair twice
    for s in stories:
        truth = s.truth
        assert len(truth) == 5 and suite.story_mode(truth) == s.mode
        assert all(t[1] == s.kinds for t in truth) and s.kinds[0] != s.kinds[1]
        for c in range(2):                                        # each character's actions differ within a story
            assert len({t[2][c] for t in truth}) == 5
        for im in s.images:                                       # a story line that parses back to itself
            assert world.parse_two_caption(im.spec()) == world.parse_two_caption(
                world.two_caption(*world.parse_two_caption(im.spec())))


@pytest.mark.slow
def test_oracle_identities_are_independent_and_read_back():
    """The oracle draws the two characters independently: their attributes agree across stories at chance."""
    stories = suite.two_character_suite()
    res = run_two_bench(None, stories, ["oracle"])
    m = res["methods"]["oracle"]["metrics"]
    assert m["identity_consistency"] == m["identity_first"] == m["identity_second"] == m["identity_both"] == 1.0
    assert m["kind_found"] == 1.0 and m["swapped"] == 0.0 and m["failed"] == 0
    assert all(v == 1.0 for v in m["adherence"].values())
    assert all(v == 1.0 for v in m["attribute_agreement"].values()) and m["identity_by_mode"]["mixed"] == 1.0
    # leak at chance: the identity image's characters, one independent pair per story (binomial, 3 SD)
    n = len(stories)
    same = {a: np.mean([s["reads"][0][0][a] == s["reads"][0][1][a] for s in res["methods"]["oracle"]["stories"]])
            for a in ATTRS}
    for a in ATTRS:
        p = 1 / len(world.ATTRIBUTES[a])
        assert abs(same[a] - p) <= 3 * math.sqrt(p * (1 - p) / n), (a, same[a])
        assert abs(m["leak_attribute"][a] - m["chance_attribute"][a]) <= 3 * math.sqrt(p * (1 - p) / n)
    assert m["leak_all_four"] <= m["chance_all_four"] + 3 * math.sqrt(m["chance_all_four"] / n)


def _char(kind, color="red", pattern="plain", accessory="hat", accessory_color="white"):
    return world.Character(kind, color, pattern, accessory, accessory_color)


def test_copied_identity_leaks_and_a_changed_character_loses_identity():
    stories = suite.two_character_suite()[:6]
    # both characters with one identity: identity still kept, the leak is every image
    copied = run_two_bench(None, stories, ["oracle"], oracle_characters=lambda s: {k: _char(k) for k in s.kinds})
    m = copied["methods"]["oracle"]["metrics"]
    assert m["identity_both"] == 1.0 and m["leak_all_four"] == 1.0 and m["chance_all_four"] == 1.0
    # one character changes its colour in every frame: its identity is lost, the other's kept
    rows = []
    for s in stories:
        first, second = s.kinds
        ident = {first: _char(first), second: _char(second, "teal", "dots", "bow", "pink")}
        frame = {**ident, first: _char(first, color="orange")}
        images = oracle_two_images(s, 0, characters=ident)
        images[1:] = oracle_two_images(s, 0, characters=frame)[1:]
        from characonsist.toy.readout import read_pairs
        rows.append({**score_two_story(s.truth, read_pairs(images), s.mode), "reads": read_pairs(images),
                     "seconds": 0.0})
    m = aggregate_two(rows)
    assert m["identity_first"] == 0.0 and m["identity_second"] == 1.0 and m["identity_both"] == 0.0
    assert m["identity_consistency"] == 0.5
    assert m["attribute_agreement"]["color"] == 0.5 and m["attribute_agreement"]["pattern"] == 1.0
    assert m["leak_all_four"] == 0.0


def _read(kind, action="small-left", scene="beach", **attrs):
    base = {"color": "red", "pattern": "plain", "accessory": "hat", "accessory_color": "white"}
    size, pos = action.split("-")
    return {"scene": scene, "kind": kind, "action": action, "position": pos, "size": size, **base, **attrs}


def test_score_two_story_finds_each_character_by_kind():
    truth = [("beach", ("cat", "robot"), ("small-left", "big-right"))] * 4
    ident = (_read("cat"), _read("robot", "big-right", color="teal"))
    reads = [ident,
             (_read("robot", "small-left", color="teal"), _read("cat", "big-right")),   # sides swapped: both kept
             (_read("cat", color="orange"), _read("robot", "big-right", color="teal")),   # the cat changed colour
             (_read("cat"), _read("cat", "big-right"))]                                  # no robot: a miss
    s = score_two_story(truth, reads, "fixed")
    assert s["identity_hits"] == [2, 2] and s["both_hits"] == 1
    assert s["kind_found"] == 5 and s["swapped"] == 2
    assert s["attribute_hits"] == {"color": 4, "pattern": 5, "accessory": 5, "accessory_color": 5}
    assert s["adherence_hits"]["kinds"] == 3 and s["adherence_hits"]["kinds_in_order"] == 2
    assert s["adherence_hits"]["bound"] == 2 and s["adherence_hits"]["actions"] == 4   # the swap binds wrongly
    assert s["same_hits"]["color"] == 1 and s["same_all_four"] == 1                   # the two cats of frame 3
    # an identity image without the robot: the robot's frames all miss
    s = score_two_story(truth, [(ident[0], _read("cat")), *reads[1:]], "fixed")
    assert s["identity_found"] == 1 and s["identity_hits"][1] == 0


@pytest.mark.slow
def test_oracle_command_merge_and_errors(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--two-characters", "--methods", "oracle", "--limit", "4", "--quiet", "--json", str(out),
                       "--images", str(tmp_path / "img")]) == 0
    printed = capsys.readouterr().out
    assert "leak (chance)" in printed and "both" in printed and "(two-characters)" in printed
    res = json.loads(out.read_text())
    assert res["settings"]["width"] == 256 and res["settings"]["height"] == 128 and res["settings"]["two_characters"]
    from PIL import Image
    strip = np.asarray(Image.open(tmp_path / "img" / "oracle" / "two-fixed-00.png"))
    assert strip.shape == (5 * 128, 256, 3)
    # several processes: the merged result is the one-process result
    stories = suite.two_character_suite()[:4]
    whole = run_two_bench(None, stories, ["oracle"])
    parts = [run_two_bench(None, stories[:1], ["oracle"]), run_two_bench(None, stories[1:], ["oracle"])]
    merged = bench_two.merge_two_results(parts)
    drop = ("wall_seconds", "seconds_per_story")
    assert {k: v for k, v in merged["methods"]["oracle"]["metrics"].items() if k not in drop} == {
        k: v for k, v in whole["methods"]["oracle"]["metrics"].items() if k not in drop}
    # refusals, before any model loads
    assert bench.main(["--two-characters", "--methods", "oracle", "--reduced", "--quiet"]) == 2
    assert "--reduced is not available with --two-characters" in capsys.readouterr().err
    single = tmp_path / "one.txt"
    suite.write_stories(suite.make_suite()[:1], single)
    assert bench.main(["--two-characters", "--methods", "oracle", "--stories", str(single), "--quiet"]) == 2
    assert "one.txt:1" in (err := capsys.readouterr().err) and "one character" in err
    two = tmp_path / "two.txt"
    two.write_text("beach#cat and robot#small-left and big-right\ncity#robot and cat#big-left and small-right\n\n"
                   "beach#cat and robot#small-left and big-right\ncity#bird and cat#big-left and small-right\n")
    assert bench.main(["--methods", "oracle", "--stories", str(two), "--quiet"]) == 2
    assert "two.txt:1" in (err := capsys.readouterr().err) and "--two-characters" in err
    assert bench.main(["--two-characters", "--methods", "oracle", "--stories", str(two), "--quiet"]) == 2
    assert "two.txt:5" in (err := capsys.readouterr().err) and "two kinds" in err and "two.txt:2" not in err


def test_a_model_of_another_size_is_refused():
    assert "must be square" in bench._two_size_problem("x", {"height": 128, "width": 64}, None)

    class Limits:
        max_side, native = 256, 128

    class Pipe:
        def input_limits(self):
            return Limits()

    assert bench._two_size_problem("toy", {"height": 128, "width": 128}, Pipe()) is None
    problem = bench._two_size_problem("big", {"height": 192, "width": 192}, Pipe())
    assert "at most 256" in problem and "192x384" in problem


@pytest.mark.slow
def test_bench_two_characters_on_the_shipped_toy_model(tmp_path, capsys):
    """End to end on the shipped model (which never saw two characters: its figures mean nothing; none asserted)."""
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    assert bench.main(["--two-characters", "--methods", "vanilla,characonsist,oracle", "--limit", "1", "--steps", "2",
                       "--threads", "1", "--quiet", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads
    res = json.loads(out.read_text())
    for spec in ("vanilla", "characonsist", "oracle"):
        m = res["methods"][spec]["metrics"]
        assert m["failed"] == 0 and m["frames"] == 4 and m["images"] == 5
        rec = res["methods"][spec]["stories"][0]
        assert len(rec["reads"]) == 5 and all(len(p) == 2 for p in rec["reads"]) and len(rec["confidence"]) == 10
        assert 0.0 <= m["identity_consistency"] <= 1.0 and 0.0 <= m["leak_all_four"] <= 1.0
    assert res["methods"]["oracle"]["metrics"]["identity_both"] == 1.0
    assert "vanilla" in capsys.readouterr().out


def test_the_toy_vocabulary_takes_the_join_word():
    from transformers import T5TokenizerFast

    from characonsist.inputs import unknown_words
    from characonsist.toy.model import TOY_MODEL_DIR

    tok = T5TokenizerFast.from_pretrained(TOY_MODEL_DIR / "tokenizer_2")
    vocabulary = world.VOCAB_WORDS
    text = "a sunny beach a cat and a robot small on the left and big on the right"
    assert unknown_words(tok, text, vocabulary) == []
    assert unknown_words(tok, text, vocabulary, spelled=()) == ["and"]
    assert unknown_words(tok, "a cat and a dog", vocabulary) == ["dog"]


OFF = {"characonsist": dict(share_start=8, schedule_steps=None, use_token_merge=False),
       "consistory": dict(sdsa=False, injection=False, query_blending=False),
       "storysync": dict(share=False, rfh=False, bli=False),
       "storydiffusion": dict(sample_rate=0.0, early_full_read=False)}


@pytest.mark.parametrize("method", sorted(OFF))
def test_two_character_story_switched_off_is_plain_flux(story_pipe, method):
    """Every method takes a two-character line (masks over a wide image, a two-character foreground); with its
    effect off it gives the plain model's images, and on it changes the frames."""
    kw = dict(height=32, width=64, num_inference_steps=4, max_sequence_length=64, output_type="np")
    story = suite.two_character_suite()[2]
    ident, frames = story.identity, list(story.frames[:2])
    out = story_pipe(ident, frames, method=method, **OFF[method], **kw)
    plain = story_pipe(ident, frames, method="vanilla", seed=out.seeds, **kw)
    assert all(np.array_equal(a, b) for a, b in zip([out.identity, *out.frames], [plain.identity, *plain.frames], strict=True))
    on = story_pipe(ident, frames, method=method, **kw)
    assert on.frames[0].shape == (32, 64, 3)
    assert any(not np.array_equal(a, b) for a, b in zip(on.frames, plain.frames, strict=True))
