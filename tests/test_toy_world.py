import numpy as np
import pytest

from characonsist.toy import world
from characonsist.toy.world import (
    ACTIONS,
    ATTRIBUTES,
    KINDS,
    SCENES,
    VOCAB_WORDS,
    Character,
    caption,
    parse_caption,
    render,
    sample_example,
)


def test_deterministic_for_a_seed():
    a = sample_example(np.random.default_rng(5))
    b = sample_example(np.random.default_rng(5))
    c = sample_example(np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (128, 128, 3) and a[0].dtype == np.uint8


def test_every_value_reachable_and_rendered_differently():
    rng = np.random.default_rng(0)
    seen = {f: set() for f in world.FIELDS}
    for _ in range(300):
        _, labels, _ = sample_example(rng, size=32)
        for f, v in labels.items():
            seen[f].add(v)
    assert all(seen[f] == set(vals) for f, vals in world.FIELDS.items())
    base = Character("cat", "red", "plain", "hat", "white")
    ref = render("beach", base, "big-centre")
    for name, values in ATTRIBUTES.items():
        for v in values:
            ch = Character(**{**base.__dict__, name: v})
            img = render("beach", ch, "big-centre")
            assert (v == getattr(base, name)) == np.array_equal(img, ref), (name, v)
    for kind in KINDS:
        for scene in SCENES:
            for action in ACTIONS:
                render(scene, Character(kind, "teal", "checks", "bow", "pink"), action, size=64)


def test_caption_never_names_identity_attributes_and_round_trips():
    attribute_words = {w for values in ATTRIBUTES.values() for v in values for w in v.split("_")}
    assert not attribute_words & set(VOCAB_WORDS)
    assert all(w.isascii() and w.islower() and w.isalpha() for w in VOCAB_WORDS)
    for scene in SCENES:
        for kind in KINDS:
            for action in ACTIONS:
                cap = caption(scene, kind, action)
                assert set(cap.replace("#", " ").split()) <= set(VOCAB_WORDS)
                assert parse_caption(cap) == (scene, kind, action)
    assert parse_caption(" A Sunny Beach # a cat#small on the left ") == ("beach", "cat", "small-left")
    assert parse_caption("beach#cat#small-left") == ("beach", "cat", "small-left")


def test_unknown_values_raise_with_valid_choices():
    with pytest.raises(ValueError, match="a sunny beach"):
        parse_caption("a moon base#a cat#small on the left")
    with pytest.raises(ValueError, match="two '#'"):
        parse_caption("a sunny beach#a cat")
    with pytest.raises(ValueError, match="valid"):
        Character("dog", "red", "plain", "hat", "white")


def test_small_character_is_tall_enough_and_in_place():
    ch = Character("bird", "purple", "dots", "glasses", "blue")
    for action in ACTIONS:
        img, (x0, y0, x1, y1) = render("night", ch, action, rng=np.random.default_rng(1), return_box=True)
        assert y1 - y0 >= 38
        cx = (x0 + x1) / 2
        expect = {"left": 32, "centre": 64, "right": 96}[action.split("-")[1]]
        assert abs(cx - expect) < 6
