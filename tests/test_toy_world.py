import hashlib

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


def test_renders_are_byte_identical_to_the_shipped_renderer():
    # hashes of renders made by the renderer the shipped readout and toy model were trained on (commit f9da52a)
    h = hashlib.sha256()
    rng = np.random.default_rng(7)
    for _ in range(24):
        h.update(sample_example(rng)[0].tobytes())
    assert h.hexdigest() == "75a20f90871dc33060069d6efb8f738b3982357f4412a96d8f22a49f6f032e6d"
    h = hashlib.sha256()
    for scene in SCENES:
        for kind in KINDS:
            h.update(render(scene, Character(kind, "purple", "checks", "bow", "yellow"), "small-right", size=64).tobytes())
    assert h.hexdigest() == "5183ed196aac6b62ef5d7765dd839110513103c3f768f391f34bca70d9053583"


def _interior(img: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one colour (no blended edge)."""
    p = np.pad(img.astype(np.int16), ((1, 1), (1, 1), (0, 0)), mode="edge")
    same = np.ones(img.shape[:2], bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= (p[dy:dy + img.shape[0], dx:dx + img.shape[1]] == img).all(-1)
    return same


def test_true_mask_leaves_the_image_unchanged_and_covers_the_character():
    rng = np.random.default_rng(3)
    for _ in range(12):
        scene, ch, action = str(rng.choice(list(SCENES))), world.sample_character(rng), str(rng.choice(list(ACTIONS)))
        seed = int(rng.integers(1000))
        plain, box = render(scene, ch, action, rng=np.random.default_rng(seed), return_box=True)
        img, box2, mask = render(scene, ch, action, rng=np.random.default_rng(seed), return_box=True,
                                 return_mask=True)
        img3, mask3 = render(scene, ch, action, rng=np.random.default_rng(seed), return_mask=True)
        assert np.array_equal(plain, img) and np.array_equal(img, img3) and box == box2
        assert np.array_equal(mask, mask3) and mask.dtype == bool and mask.shape == (128, 128)
        # inside the character's box; its flat pixels have character colours, and the flat pixels outside it have
        # the scene's colours
        x0, y0, x1, y1 = box
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
        assert ys.max() <= np.ceil(y1)
        flat = _interior(img)
        char_colors = {tuple(c) for c in world.CHARACTER_COLORS}
        scene_colors = {tuple(c) for c in world.SCENE_COLORS[scene]}
        inside = {tuple(c) for c in img[mask & flat]}
        outside = {tuple(c) for c in img[~mask & flat]}
        assert inside <= char_colors, inside - char_colors
        assert outside <= scene_colors, outside - scene_colors
        assert world.BODY_COLORS[ch.color] in inside
        assert 0.01 < mask.mean() < 0.3                                   # a character, far from the whole image


def test_scene_palette_is_every_scene_colour():
    # every flat background colour of every scene is in SCENE_COLORS and every listed colour is drawn (at 384 px,
    # where the stars are wider than a blended edge)
    ch = Character("cat", "red", "plain", "hat", "white")
    for scene in SCENES:
        seen = set()
        for seed in range(3):
            img, mask = render(scene, ch, "small-left", size=384, rng=np.random.default_rng(seed), return_mask=True)
            seen |= {tuple(c) for c in img[~mask & _interior(img)]}
        assert seen == set(world.SCENE_COLORS[scene]), (scene, seen ^ set(world.SCENE_COLORS[scene]))


def test_part_map_labels_the_body_parts_where_the_mask_is():
    rng = np.random.default_rng(5)
    for kind in KINDS:
        for action in ("big-centre", "small-left"):
            ch = world.sample_character(rng, kind)
            seed = int(rng.integers(1000))
            plain = render("forest", ch, action, rng=np.random.default_rng(seed))
            img, mask, parts = render("forest", ch, action, rng=np.random.default_rng(seed), return_mask=True,
                                      return_parts=True)
            assert np.array_equal(plain, img)                      # labelling never changes the picture
            assert parts.dtype == np.uint8 and np.array_equal(parts > 0, mask)
            rows = {name: np.nonzero(parts == world.PARTS.index(name))[0] for name in world.PARTS[1:]}
            assert len(rows["head"]) and len(rows["body"]) and len(rows["accessory"])
            assert rows["head"].mean() < rows["body"].mean()      # image rows grow downwards
            if kind in ("robot", "bird") and action.startswith("big"):
                assert len(rows["legs"]) and rows["legs"].mean() > rows["body"].mean()
            assert bool(len(rows["tail"])) == (kind in ("cat", "bird"))
            assert not len(rows["legs"]) or kind != "cat"


# ------------------------------------------------------------------ two characters in one image

TWO = (Character("cat", "red", "stripes", "hat", "blue"), Character("bird", "teal", "dots", "bow", "pink"))


def test_two_character_captions_round_trip_in_the_vocabulary_plus_and():
    words = set(VOCAB_WORDS) | {"and"}
    for scene in SCENES:
        for k0 in KINDS:
            for k1 in KINDS:
                if k0 == k1:
                    continue
                for a0 in ACTIONS:
                    for a1 in ("small-left", "big-right"):
                        cap = world.two_caption(scene, (k0, k1), (a0, a1))
                        assert set(cap.replace("#", " ").split()) <= words
                        assert world.parse_two_caption(cap) == (scene, (k0, k1), (a0, a1))
    cap = "a sunny beach#a cat and a robot#small on the left and big on the right"
    assert world.two_caption("beach", ("cat", "robot"), ("small-left", "big-right")) == cap
    assert world.parse_two_caption(" Beach # cat AND robot # small-left and big-right") == (
        "beach", ("cat", "robot"), ("small-left", "big-right"))


def test_two_character_captions_refuse_one_kind_twice_and_missing_halves():
    with pytest.raises(ValueError, match="different kinds"):
        world.two_caption("beach", ("cat", "cat"), ("small-left", "big-right"))
    with pytest.raises(ValueError, match="one kind"):
        world.parse_two_caption("a sunny beach#a cat and a cat#small on the left and big on the right")
    with pytest.raises(ValueError, match="two characters joined by 'and'"):
        world.parse_two_caption("a sunny beach#a cat#small on the left and big on the right")
    with pytest.raises(ValueError, match="two actions joined by 'and'"):
        world.parse_two_caption("a sunny beach#a cat and a robot#small on the left")
    with pytest.raises(ValueError, match="a sunny beach"):
        world.parse_two_caption("a moon base#a cat and a robot#small on the left and big on the right")


def test_render_two_keeps_each_character_in_its_half_in_one_scene():
    rng = np.random.default_rng(4)
    for scene in SCENES:
        actions = (str(rng.choice(list(ACTIONS))), "big-left")
        seed = int(rng.integers(1000))
        plain = world.render_two(scene, TWO, ("big-right", "big-left"), rng=np.random.default_rng(seed))
        img, boxes, masks, parts = world.render_two(scene, TWO, ("big-right", "big-left"),
                                                    rng=np.random.default_rng(seed), return_box=True,
                                                    return_mask=True, return_parts=True)
        assert np.array_equal(plain, img) and img.shape == (128, 256, 3) and img.dtype == np.uint8
        assert not np.array_equal(img, world.render_two(scene, TWO, actions, rng=np.random.default_rng(seed + 1)))
        for i in range(2):
            other = slice(128, 256) if i == 0 else slice(0, 128)
            assert masks[i].shape == (128, 256) and not masks[i][:, other].any() and masks[i].sum() > 500
            assert np.array_equal(parts[i] > 0, masks[i])
            x0, y0, x1, y1 = boxes[i]
            assert 128 * i <= x0 < x1 <= 128 * (i + 1) and y0 < y1
            ys, xs = np.nonzero(masks[i])
            assert x0 - 1 <= xs.min() and xs.max() <= x1
        flat = _interior(img)
        scene_colors = {tuple(c) for c in world.SCENE_COLORS[scene]}
        assert {tuple(c) for c in img[~(masks[0] | masks[1]) & flat]} <= scene_colors
        assert world.BODY_COLORS["red"] in {tuple(c) for c in img[:, :128][masks[0][:, :128] & flat[:, :128]]}
        assert world.BODY_COLORS["teal"] in {tuple(c) for c in img[:, 128:][masks[1][:, 128:] & flat[:, 128:]]}


def test_render_two_clips_a_character_at_the_middle():
    # the bird's tail tip, big on the left of the right half, is at x = 128 + 32 - 0.45 H = 126.6 (H = 0.58 x 128):
    # it is cut at the middle, as a single render cuts it at its border
    _, (m0, m1) = world.render_two("beach", TWO, ("small-left", "big-left"), return_mask=True)
    assert m1[:, 128].any() and not m1[:, :128].any() and not m0[:, 64:].any()


def test_two_character_examples_are_seeded_and_label_each_half():
    a = world.sample_two_example(np.random.default_rng(5))
    b = world.sample_two_example(np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    rng = np.random.default_rng(0)
    seen_kinds = set()
    for _ in range(30):
        img, labels, cap = world.sample_two_example(rng, size=32)
        scene, kinds, actions = world.parse_two_caption(cap)
        assert img.shape == (32, 64, 3) and kinds[0] != kinds[1]
        assert [(x["scene"], x["kind"], x["action"]) for x in labels] == list(zip((scene, scene), kinds, actions, strict=True))
        seen_kinds.add(kinds)
    assert len(seen_kinds) == 6                         # every ordered pair of different kinds
