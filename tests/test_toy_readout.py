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
        acc = np.mean([p[field] == t[field] for p, t in zip(pred, labels)])
        assert acc >= 0.95, (field, acc)
    assert all(p["action"] == f"{p['size']}-{p['position']}" for p in pred)
    again, conf = readout.read_batch(imgs[:8], confidence=True)
    assert again == pred[:8] and set(conf[0]) == set(world.FIELDS)
    assert all(0.5 < c <= 1.0 for d in conf for c in d.values())


def test_reads_degraded_renders(sample):
    imgs, labels = sample
    rng = np.random.default_rng(0)
    degraded = [readout.degrade(im, rng) for im in imgs[:24]]
    assert any(not np.array_equal(a, b) for a, b in zip(degraded, imgs))
    pred = readout.read_batch(degraded)
    identity_ok = np.mean([all(p[a] == t[a] for a in world.ATTRIBUTES) for p, t in zip(pred, labels)])
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
