"""ConsiStory in the engine: equivalence when off, effect, determinism, anchors, pure functions."""

import numpy as np
import pytest
import torch

from characonsist.methods import consistory as cs
from characonsist.methods import get_method
from characonsist.methods.consistory import (
    blend_queries,
    blend_strength,
    dropout_keep,
    inject_features,
    nearest_subject_patches,
    subject_attention,
    subject_mask,
)
from characonsist.methods.storydiffusion import image_generator

KW = dict(height=32, width=32, num_inference_steps=6, max_sequence_length=32, output_type="np")
IDENTITY = "in the park#a red cat#sitting"
FRAMES = ["in the park#a red cat#running", "on a beach#a red cat#jumping"]
OFF = dict(sdsa=False, injection=False, query_blending=False)


def _stack(out):
    return np.stack(out.images)


def test_switched_off_equals_vanilla_exactly(story_pipe):
    out = story_pipe(IDENTITY, FRAMES, method="consistory", **OFF, **KW)
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", **KW)
    assert np.array_equal(_stack(out), _stack(ref))


def test_consistory_changes_frames_deterministically(story_pipe, monkeypatch):
    strengths, injected = [], []
    real_blend, real_inject = cs.blend_queries, cs.inject_features
    monkeypatch.setattr(cs, "blend_queries", lambda q, qv, s: strengths.append(round(s, 6)) or real_blend(q, qv, s))
    monkeypatch.setattr(cs, "inject_features", lambda *a: injected.append(1) or real_inject(*a))
    frames = FRAMES[:1]
    a = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, **KW)
    assert set(strengths) == {0.85, 0.8} and injected      # blending on steps 1-2 (step 0 shares nothing)
    b = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, **KW)
    ref = story_pipe(IDENTITY, frames, method="vanilla", **KW)
    assert np.isfinite(_stack(a)).all()
    assert np.array_equal(_stack(a), _stack(b))
    assert all(np.abs(x - r).max() > 1e-4 for x, r in zip(a.images, ref.images))
    assert all(m.dtype == bool and m.shape == (8, 8) for m in a.masks)
    no_inject = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, injection=False, **KW)
    assert np.abs(_stack(no_inject) - _stack(a)).max() > 1e-5


def test_anchors_do_not_depend_on_the_frames_so_frames_can_be_added(story_pipe):
    kw = {**KW, "num_inference_steps": 4}
    full = story_pipe(IDENTITY, FRAMES, method="consistory", **kw)          # anchors = identity + frame 1
    anchors = story_pipe(IDENTITY, FRAMES[:1], method="consistory", **kw)
    for x, y in zip(full.images[:2], anchors.images):
        np.testing.assert_allclose(x, y, atol=1e-4)
    assert get_method("consistory").dependencies([None] * 4, 3) == {1}     # the anchors join every chunk


def test_schedule_defaults():
    m = get_method("consistory")
    assert m.config.dropout == 0.5 and m.config.anchors == 2 and m.config.inject_alpha == 0.8
    assert [(p.name, p.steps, p.final) for p in m.phases(50)] == [("features", 37, False), ("main", 50, True)]
    assert m._blend_steps(50) == 6 and m._inject_range(50) == (5, 16)
    assert [p.name for p in get_method("consistory", injection=False).phases(50)] == ["main"]
    assert get_method("consistory", query_blending=False)._blend_steps(50) == 0
    with pytest.raises(ValueError, match="valid options"):
        get_method("consistory", mask_dropout=0.5)


def test_blend_strength_falls_from_09_to_08():
    s = [blend_strength(t, 6) for t in range(8)]
    np.testing.assert_allclose(s, [0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 0.0, 0.0], atol=1e-12)
    assert blend_strength(0, 1) == 0.9 and blend_strength(0, 0) == 0.0
    q, qv = torch.zeros(3, 2), torch.ones(3, 2)
    assert torch.allclose(blend_queries(q, qv, 0.9), torch.full((3, 2), 0.9))


def test_subject_attention_and_otsu_mask():
    torch.manual_seed(0)
    D = 16
    k = torch.zeros(5, 1, D)
    k[0, 0, 0] = k[2, 0, 1] = 1.0          # token 0: background word, token 2: subject word
    k[4, 0, 1] = 50.0                      # padding (beyond real_len) that would win if not excluded
    q = torch.zeros(6, 1, D)
    q[:3, 0, 1] = 8.0                      # patches 0-2 look at the subject word
    q[3:, 0, 0] = 8.0                      # patches 3-5 at the background word
    m = subject_attention(q, k, 2, 3, real_len=4)
    assert m.shape == (6,) and torch.all(m[:3] > 0.5) and torch.all(m[3:] < 0.1)
    ref = (q[:, 0] @ k[:4, 0].T / D ** 0.5).softmax(-1)[:, 2]
    torch.testing.assert_close(m, ref)
    grid = torch.zeros(8, 8)
    grid[2:6, 3:7] = 1.0
    noisy = grid * 0.8 + 0.1 + 0.05 * torch.rand(8, 8)
    assert torch.equal(subject_mask(noisy.flatten()), grid.flatten().bool())
    assert not subject_mask(torch.full((10,), 0.3)).any()


def test_dropout_rate():
    g = torch.Generator().manual_seed(1)
    keep = dropout_keep(20000, 0.5, g)
    assert abs(keep.float().mean().item() - 0.5) < 0.02
    assert abs(dropout_keep(20000, 0.2, g).float().mean().item() - 0.8) < 0.02
    assert dropout_keep(50, 0.0, g).all() and not dropout_keep(50, 1.0, g).any()
    assert torch.equal(dropout_keep(64, 0.5, image_generator(3, 1)), dropout_keep(64, 0.5, image_generator(3, 1)))


def test_nearest_neighbour_injection_recovers_a_permutation():
    torch.manual_seed(0)
    n = 12
    feats = torch.nn.functional.normalize(torch.randn(n, 32), dim=-1)
    perm = torch.randperm(n)
    src = feats[perm]                        # source patch j holds target patch perm[j]
    sim = feats @ src.T
    everything = torch.ones(n, dtype=torch.bool)
    pairs = nearest_subject_patches({1: sim}, {1: everything}, everything, threshold=-1.0)
    tgt, idx, s = pairs[1]
    assert torch.equal(tgt, torch.arange(n)) and torch.equal(perm[idx], tgt)
    torch.testing.assert_close(s, torch.ones(n))
    # subject masks: non-subject source patches are never matched, non-subject target patches never injected
    src_mask = everything.clone()
    src_mask[(perm == 0).nonzero()[0]] = False
    tgt_mask = everything.clone()
    tgt_mask[5] = False
    tgt, idx, _ = nearest_subject_patches({1: sim}, {1: src_mask}, tgt_mask, threshold=-1.0)[1]
    assert 5 not in tgt.tolist() and not (perm[idx] == 0).any() and 0 in tgt.tolist()
    # 'min' strategy over two sources; the dynamic (Otsu) threshold drops the poor matches
    noisy = feats + 0.8 * torch.randn(n, 32)
    sims = {1: sim, 2: feats @ torch.nn.functional.normalize(noisy, dim=-1).T}
    sims[1][:4] = -0.5                      # patches 0-3 match only the second source, and badly
    pairs = nearest_subject_patches(sims, {1: everything, 2: everything}, everything)
    assert torch.equal(pairs[1][0], torch.arange(4, n)) and 2 not in pairs
    # injection blends exactly the matched rows
    out, source = torch.zeros(n, 3), torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    mixed = inject_features(out, {1: source}, {1: (torch.tensor([0, 2]), torch.tensor([4, 1]), None)}, 0.8)
    torch.testing.assert_close(mixed[0], 0.8 * source[4])
    torch.testing.assert_close(mixed[2], 0.8 * source[1])
    assert mixed[[1, 3]].abs().sum() == 0
