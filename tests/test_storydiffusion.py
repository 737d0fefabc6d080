"""StoryDiffusion in the engine: equivalence when off, effect, determinism, pure functions."""

import numpy as np
import pytest
import torch

from characonsist.engine import Slot
from characonsist.methods import get_method
from characonsist.methods import storydiffusion as sd
from characonsist.methods.storydiffusion import (
    StoryDiffusionConfig,
    image_generator,
    sample_tokens,
    shared_layers,
    sharing_sources,
    step_schedule,
    uses_block,
)
from characonsist.story import StoryImage
from conftest import FRAMES, IDENTITY, KW  # the shared story (conftest.py)


def _images(out):
    return np.stack(out.images)


@pytest.mark.parametrize("off", [dict(sample_rate=0.0, early_full_read=False), dict(share_start=0, share_end=0),
                                 dict(skip_early=1.0, skip_late=1.0, early_full_read=False)])
def test_switched_off_equals_vanilla_exactly(story_pipe, off):
    out = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **off, **KW)
    assert len(set(out.seeds)) == 3 and out.settings["seeding"] == "per_image"   # official: one noise per image
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", seed=out.seeds, **KW)
    assert np.array_equal(_images(out), _images(ref))


def test_sharing_changes_images_deterministically(story_pipe):
    a = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **KW)
    b = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **KW)
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", **KW)
    assert np.isfinite(_images(a)).all()
    assert np.array_equal(_images(a), _images(b)) and a.notes == b.notes          # deterministic
    assert all(np.abs(x - r).max() > 1e-4 for x, r in zip(a.images, ref.images, strict=True))   # identity images share too
    assert a.settings["method_options"]["sample_rate"] == 0.5
    assert a.settings["method_options"]["effective_schedule"] == {"share_start": 1, "share_end": 6, "skip_switch": 2}


THREE = [*FRAMES, "in the park#a red cat#waving"]


def test_identity_images_share_among_themselves_and_frames_only_read_them(story_pipe):
    """Default (official id_length 2): identity + frame 1 are the identity images; frames 2.. read them only."""
    full = story_pipe(IDENTITY, THREE, method="storydiffusion", **KW)
    ids = story_pipe(IDENTITY, THREE[:1], method="storydiffusion", **KW)
    two = story_pipe(IDENTITY, THREE[:2], method="storydiffusion", **KW)
    for x, y in zip(full.images[:2], ids.images, strict=True):                 # the identity images never see a frame
        np.testing.assert_allclose(x, y, atol=1e-4)
    np.testing.assert_allclose(full.frames[1], two.frames[1], atol=1e-4)   # frame 2 does not see frame 3
    assert any("frame(s) [1]" in n for n in full.notes[0])        # the identity is changed by frame 1: said so
    alone = story_pipe(IDENTITY, THREE, method="storydiffusion", identities=1, **KW)
    ref = story_pipe(IDENTITY, THREE, method="vanilla", **KW)
    np.testing.assert_allclose(alone.identity, ref.identity, atol=1e-5)   # identities=1: never changed
    assert not alone.notes[0]


def _capture(monkeypatch):
    """Record, for every attention call, (step, layer, {row: extra keys}) from the plans StoryDiffusion builds."""
    calls = []
    real = sd.attend_rows

    def spy(call, plans, queries=None):
        calls.append((call.run.step, (call.kind, call.block),
                      {row: g[1].extra_k for row, g in plans.items()}))
        return real(call, plans, queries)

    monkeypatch.setattr(sd, "attend_rows", spy)
    return calls


def test_one_token_mask_per_step_for_every_image_and_layer(story_pipe, monkeypatch):
    calls = _capture(monkeypatch)
    story_pipe(IDENTITY, THREE, method="storydiffusion", skip_early=0.0, skip_late=0.0, **KW)
    steps = sorted({c[0] for c in calls if c[0] >= 1})
    assert steps == [1, 2, 3, 4, 5]
    sizes = []
    for step in steps:
        layers = [c[2] for c in calls if c[0] == step]
        assert len(layers) == 2 and all(sorted(p) == [0, 1, 2, 3] for p in layers)   # both single blocks share
        for plans in layers:   # frames 2 and 3 read identity + frame 1 through the same mask: the same keys
            assert torch.equal(plans[2], plans[3])
        assert len({p[r].shape[0] for p in layers for r in (2, 3)}) == 1              # the same mask in every layer
        sizes.append(layers[0][2].shape[0])
    assert len(set(sizes)) > 1                                                         # a new mask every step


def test_first_steps_identity_images_plain_frames_read_every_identity_token(story_pipe, monkeypatch):
    calls = _capture(monkeypatch)
    story_pipe(IDENTITY, THREE, method="storydiffusion", share_start=2, schedule_steps=None, **KW)
    early = [c[2] for c in calls if c[0] < 2 and c[1][0] == "single"]
    assert len(early) == 4
    for plans in early:
        assert sorted(plans) == [2, 3] and plans[2].shape[0] == 2 * 64    # all tokens of identity + frame 1
    off = _capture(monkeypatch)
    story_pipe(IDENTITY, THREE, method="storydiffusion", share_start=2, schedule_steps=None, early_full_read=False,
               **KW)
    assert not any(c[0] < 2 for c in off)                                  # plain attention everywhere


def test_random_skip_of_the_shared_calls(story_pipe, monkeypatch):
    calls = _capture(monkeypatch)
    story_pipe(IDENTITY, THREE, method="storydiffusion", skip_early=1.0, skip_late=0.0, schedule_steps=None,
               share_start=1, skip_switch=4, early_full_read=False, **KW)
    shared = {c[0] for c in calls if c[2]}
    assert shared == {4, 5}                                 # every call of steps 1-3 skipped, none after
    g = torch.Generator().manual_seed(0)
    assert abs(shared_layers(20000, 0.3, g).float().mean().item() - 0.7) < 0.02
    assert abs(shared_layers(20000, 0.1, g).float().mean().item() - 0.9) < 0.02
    m = get_method("storydiffusion")
    assert (m.config.skip_early, m.config.skip_late, m.config.skip_switch, m.config.share_start) == (0.3, 0.1, 20, 5)


def test_step_options_are_rescaled_to_the_step_count():
    cfg = StoryDiffusionConfig()
    assert step_schedule(cfg, 50) == {"share_start": 5, "share_end": 50, "skip_switch": 20}
    assert step_schedule(cfg, 20) == {"share_start": 2, "share_end": 20, "skip_switch": 8}
    assert step_schedule(cfg, 28) == {"share_start": 3, "share_end": 28, "skip_switch": 11}
    assert step_schedule(StoryDiffusionConfig(schedule_steps=None, share_end=30), 20) == {
        "share_start": 5, "share_end": 20, "skip_switch": 20}
    assert get_method("storydiffusion").seeding == "per_image"


def test_chunks_give_the_same_images(story_pipe):
    both = story_pipe(IDENTITY, FRAMES, method="storydiffusion", **KW)
    chunked = story_pipe(IDENTITY, FRAMES, method="storydiffusion", batch_size=2, **KW)
    for x, y in zip(both.images, chunked.images, strict=True):
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
    with pytest.raises(ValueError, match="skip_late"):
        get_method("storydiffusion", skip_late=-0.1)
