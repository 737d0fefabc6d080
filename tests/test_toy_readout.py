import numpy as np
import pytest
from PIL import Image

from characonsist.toy import readout, world


@pytest.fixture(scope="module")
def sample():
    return readout.render_set(48, seed=777)


def test_reads_held_out_renders(sample):
    imgs, labels = sample
    pred = readout.read_batch(imgs)
    for field in world.FIELDS:
        acc = np.mean([p[field] == t[field] for p, t in zip(pred, labels, strict=True)])
        assert acc >= 0.95, (field, acc)
    assert all(p["action"] == f"{p['size']}-{p['position']}" for p in pred)
    again, conf = readout.read_batch(imgs[:8], confidence=True)
    assert again == pred[:8] and set(conf[0]) == set(world.FIELDS)
    assert all(0.5 < c <= 1.0 for d in conf for c in d.values())


def test_reads_degraded_renders(sample):
    imgs, labels = sample
    rng = np.random.default_rng(0)
    degraded = [readout.degrade(im, rng) for im in imgs[:24]]
    assert any(not np.array_equal(a, b) for a, b in zip(degraded, imgs[:24], strict=True))
    pred = readout.read_batch(degraded)
    identity_ok = np.mean([all(p[a] == t[a] for a in world.ATTRIBUTES) for p, t in zip(pred, labels[:24], strict=True)])
    assert identity_ok >= 0.9


def test_degrade_is_seeded():
    img = world.render("city", world.Character("robot", "teal", "dots", "scarf", "pink"), "big-right")
    a = readout.degrade(img, np.random.default_rng(3))
    b = readout.degrade(img, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == img.shape


def test_accepts_pil_float_and_other_sizes():
    ch = world.Character("cat", "purple", "stripes", "glasses", "yellow")
    img = world.render("forest", ch, "small-left")
    truth = world.labels_of("forest", ch, "small-left")
    big = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR))
    for x in (img, Image.fromarray(img), img.astype(np.float32) / 255, big):
        assert readout.read(x) == truth


@pytest.fixture(scope="module")
def two_sample():
    return readout.render_set(24, seed=778, two_characters=True)


def _field_accuracy(pairs, labels) -> dict[str, float]:
    pred, truth = [r for p in pairs for r in p], [t for p in labels for t in p]
    return {f: float(np.mean([p[f] == t[f] for p, t in zip(pred, truth, strict=True)])) for f in world.FIELDS}


def test_reads_both_characters_of_two_character_renders(two_sample):
    imgs, labels = two_sample
    assert imgs.shape == (24, 128, 256, 3) and len(labels) == 24 and all(len(x) == 2 for x in labels)
    pairs = readout.read_pairs(imgs)
    acc = _field_accuracy(pairs, labels)
    assert all(a >= 0.95 for a in acc.values()), acc
    named = [all(r[f] == t[f] for r, t in zip(p, lab, strict=True) for f in world.NAMED_FIELDS) for p, lab in zip(pairs, labels, strict=True)]
    assert np.mean(named) >= 0.95
    assert readout.read_pairs([Image.fromarray(imgs[0])]) == pairs[:1]     # PIL images too
    again, conf = readout.read_pairs(imgs[:3], confidence=True)
    assert again == pairs[:3] and len(conf) == 3 and set(conf[0][1]) == set(world.FIELDS)


@pytest.mark.slow
def test_reads_two_character_renders_through_the_toy_vae(two_sample):
    from diffusers import AutoencoderKL

    from characonsist.toy.model import TOY_MODEL_DIR

    vae = AutoencoderKL.from_pretrained(TOY_MODEL_DIR / "vae").float().eval()
    imgs, labels = two_sample
    out = readout.vae_roundtrip(imgs[:8], vae)
    assert out[0].shape == (128, 256, 3) and not np.array_equal(out[0], imgs[0])
    acc = _field_accuracy(readout.read_pairs(out), labels[:8])
    assert all(a >= 0.95 for a in acc.values()), acc


def test_split_pair_splits_along_the_long_side():
    img = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    a, b = readout.split_pair(img)
    assert np.array_equal(a, img[:, :2]) and np.array_equal(b, img[:, 2:])
    a, b = readout.split_pair(img.transpose(1, 0, 2))
    assert a.shape == (2, 2, 3) and np.array_equal(b, img.transpose(1, 0, 2)[2:])
