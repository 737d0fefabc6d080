"""StoryDiffusion in the engine: equivalence when off, effect, determinism, pure functions."""

import numpy as np
import pytest
import torch

from characonsist.engine import Slot
from characonsist.methods import get_method
from characonsist.methods.storydiffusion import image_generator, sample_tokens, sharing_sources, uses_block
from characonsist.story import StoryImage

KW = dict(height=32, width=32, num_inference_steps=6, max_sequence_length=32, output_type="np")
IDENTITY = "in the park#a red cat#sitting"
FRAMES = ["in the park#a red cat#running", "on a beach#a red cat#jumping"]


def _images(out):
    return np.stack(out.images)


@pytest.mark.parametrize("off", [dict(sample_rate=0.0), dict(share_start=KW["num_inference_steps"])])
def test_switched_off_equals_vanilla_exactly(story_pipe, off):
    out = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **off, **KW)
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", **KW)
    assert np.array_equal(_images(out), _images(ref))


def test_sharing_changes_images_deterministically_and_not_at_the_first_step(story_pipe):
    seen = {}

    def first_step(name):
        def cb(pipe, step, t, kw):
            if step == 0:
                seen.setdefault(name, []).append(kw["latents"].clone())
            return {}
        return cb

    a = story_pipe(IDENTITY, FRAMES, method="storydiffusion", callback_on_step_end=first_step("sd"), **KW)
    b = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **KW)
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", callback_on_step_end=first_step("ref"), **KW)
    assert np.isfinite(_images(a)).all()
    assert np.array_equal(_images(a), _images(b))                       # deterministic
    assert all(np.abs(x - r).max() > 1e-4 for x, r in zip(a.images, ref.images))   # every image shares
    assert torch.equal(seen["sd"][0], seen["ref"][0])                   # step 0 is plain
    assert a.settings["method_options"]["sample_rate"] == 0.5


def test_identity_images_do_not_depend_on_the_frames(story_pipe):
    both = story_pipe(IDENTITY, FRAMES, method="storydiffusion", identities=2, **KW)
    ids = story_pipe(IDENTITY, FRAMES[:1], method="storydiffusion", identities=2, **KW)
    for x, y in zip(both.images[:2], ids.images):
        np.testing.assert_allclose(x, y, atol=1e-4)
    chunked = story_pipe(IDENTITY, FRAMES, method="storydiffusion", identities=2, batch_size=2, **KW)
    for x, y in zip(both.images, chunked.images):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_sample_tokens_rate_and_determinism():
    g = torch.Generator().manual_seed(0)
    idx = sample_tokens(20000, 0.5, g)
    assert abs(idx.numel() / 20000 - 0.5) < 0.02
    assert torch.all(idx[1:] > idx[:-1]) and idx.max() < 20000
    assert abs(sample_tokens(20000, 0.2, g).numel() / 20000 - 0.2) < 0.02
    assert sample_tokens(100, 0.0, g).numel() == 0
    assert torch.equal(sample_tokens(100, 1.0, g), torch.arange(100))
    a = sample_tokens(64, 0.5, image_generator(7, 3))
    b = sample_tokens(64, 0.5, image_generator(7, 3))
    c = sample_tokens(64, 0.5, image_generator(7, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _slots(n):
    return [Slot(k, StoryImage("bg", "cat", "act"), 32, 32, 0, None, (8, 8), 1, 3, pos=k) for k in range(n)]


def test_sharing_sources():
    slots = _slots(4)
    assert sharing_sources(slots, 2, 0) == [0, 1, 3]
    assert sharing_sources(slots, 0, 2) == [1] and sharing_sources(slots, 1, 2) == [0]
    assert sharing_sources(slots, 3, 2) == [0, 1]
    assert sharing_sources(slots, 0, 1) == [] and sharing_sources(slots, 2, 1) == [0]


def test_options_are_checked():
    assert uses_block("all", "double") and uses_block("single", "single") and not uses_block("single", "double")
    with pytest.raises(ValueError, match="blocks"):
        get_method("storydiffusion", blocks="up")
    with pytest.raises(ValueError, match="sample_rate"):
        get_method("storydiffusion", sample_rate=1.5)
    with pytest.raises(ValueError, match="valid options"):
        get_method("storydiffusion", rate=0.5)
