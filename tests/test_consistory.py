"""ConsiStory in the engine: equivalence when off, effect, determinism, anchors, pure functions."""

import numpy as np
import pytest
import torch

from characonsist.methods import consistory as cs
from characonsist.methods import get_method
from characonsist.methods.consistory import (
    ConsiStory,
    ConsiStoryConfig,
    blend_queries,
    blend_strength,
    dropout_keep,
    inject_features,
    inject_in_order,
    nearest_subject_patches,
    step_schedule,
    subject_attention,
    subject_mask,
)
from characonsist.methods.storydiffusion import image_generator
from conftest import FRAMES, IDENTITY, KW  # the shared story (conftest.py)

OFF = dict(sdsa=False, injection=False, query_blending=False)


def _stack(out):
    return np.stack(out.images)


def test_switched_off_equals_vanilla_exactly(story_pipe):
    out = story_pipe(IDENTITY, FRAMES, method="consistory", **OFF, **KW)
    assert out.seeds[0] == 2025 and len(set(out.seeds)) == 3            # official: one noise per image
    assert out.settings["seeding"] == "per_image"
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", seed=out.seeds, **KW)
    assert np.array_equal(_stack(out), _stack(ref))


def test_consistory_changes_frames_deterministically(story_pipe, monkeypatch):
    strengths, injected = [], []
    real_blend, real_inject = cs.blend_queries, cs.inject_features
    monkeypatch.setattr(cs, "blend_queries", lambda q, qv, s: strengths.append(round(s, 6)) or real_blend(q, qv, s))
    monkeypatch.setattr(cs, "inject_features", lambda *a: injected.append(1) or real_inject(*a))
    frames = FRAMES[:1]
    a = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, schedule_steps=None, **KW)
    official = np.linspace(0.9, 0.81836735, 3).round(6)                      # the official strengths
    assert set(strengths) == set(official[1:]) and injected   # blending on steps 1-2 (step 0 shares nothing)
    b = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, schedule_steps=None, **KW)
    ref = story_pipe(IDENTITY, frames, method="vanilla", **KW)
    assert np.isfinite(_stack(a)).all()
    assert np.array_equal(_stack(a), _stack(b))
    assert all(np.abs(x - r).max() > 1e-4 for x, r in zip(a.images, ref.images, strict=True))
    assert all(m.dtype == bool and m.shape == (8, 8) for m in a.masks)
    no_inject = story_pipe(IDENTITY, frames, method="consistory", blend_steps=3, schedule_steps=None, injection=False,
                           **KW)
    assert np.abs(_stack(no_inject) - _stack(a)).max() > 1e-5


def test_anchors_do_not_depend_on_the_frames_so_frames_can_be_added(story_pipe):
    kw = {**KW, "num_inference_steps": 4}
    full = story_pipe(IDENTITY, FRAMES, method="consistory", **kw)          # anchors = identity + frame 1
    anchors = story_pipe(IDENTITY, FRAMES[:1], method="consistory", **kw)
    for x, y in zip(full.images[:2], anchors.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)
    assert get_method("consistory").dependencies([None] * 4, 3) == {1}     # the anchors join every chunk
    assert any("frame(s) [1]" in n for n in full.notes[0])                 # the identity reads frame 1: said so
    one = story_pipe(IDENTITY, FRAMES, method="consistory", anchors=1, **kw)
    ref = story_pipe(IDENTITY, FRAMES, method="vanilla", **kw)
    np.testing.assert_allclose(one.identity, ref.identity, atol=1e-5)      # one anchor: never changed by frames
    assert not one.notes[0]


def test_schedule_defaults():
    m = get_method("consistory")
    assert m.config.dropout == 0.5 and m.config.anchors == 2 and m.config.inject_alpha == 0.8
    assert m.config.blend_end == 0.81836735 and m.seeding == "per_image"
    # the official first pass runs to the end (its final masks); "short" stops at the feature step
    assert [(p.name, p.steps, p.final) for p in m.phases(50)] == [("features", 50, False), ("main", 50, True)]
    assert [p.steps for p in get_method("consistory", feature_pass="short").phases(50)] == [37, 50]
    assert step_schedule(m.config, 50) == {"share_start": 1, "share_end": 50, "mask_window": 20, "blend_steps": 6,
                                           "inject_start": 5, "inject_end": 16, "feature_step": 36}
    assert step_schedule(m.config, 20) == {"share_start": 1, "share_end": 20, "mask_window": 8, "blend_steps": 3,
                                           "inject_start": 2, "inject_end": 6, "feature_step": 14}
    assert step_schedule(ConsiStoryConfig(schedule_steps=None, blend_steps=0), 20)["blend_steps"] == 0
    assert [p.name for p in get_method("consistory", injection=False).phases(50)] == ["main"]
    with pytest.raises(ValueError, match="valid options"):
        get_method("consistory", mask_dropout=0.5)
    with pytest.raises(ValueError, match="feature_pass"):
        get_method("consistory", feature_pass="half")


def test_masks_average_the_last_steps(story_pipe, monkeypatch):
    """Official: the subject map is the mean of the last 20 steps' maps (rescaled: mask_window); a patch lit in
    the window's earlier steps outweighs one lit only at the last step."""
    step = {"now": 0}
    real_begin = ConsiStory.begin_step

    def begin(self, run):
        step["now"] = run.step
        real_begin(self, run)

    def fake_map(q_img, k_txt, start, end, real_len):
        m = torch.zeros(q_img.shape[0])
        if step["now"] < 5:
            m[:10] = 1.0            # region A: lit on steps 0-4
        else:
            m[40:50] = 1.0          # region B: lit on the last step only
        return m

    monkeypatch.setattr(ConsiStory, "begin_step", begin)
    monkeypatch.setattr(cs, "subject_attention", fake_map)
    out = story_pipe(IDENTITY, FRAMES[:1], method="consistory", mask_window=6, schedule_steps=None, injection=False,
                     **KW)
    for mask in out.masks:                  # window steps 0-5: A 5/6, B 1/6
        assert mask.flatten()[:10].all() and not mask.flatten()[40:50].any()
    last = story_pipe(IDENTITY, FRAMES[:1], method="consistory", mask_window=1, schedule_steps=None,
                      injection=False, **KW)
    for mask in last.masks:
        assert mask.flatten()[40:50].all() and not mask.flatten()[:10].any()


def _plans(monkeypatch):
    calls = []
    real = cs.attend_rows

    def spy(call, plans, queries=None):
        calls.append((call.run.step, {row: g[-1].extra_k for row, g in plans.items()}))
        return real(call, plans, queries)

    monkeypatch.setattr(cs, "attend_rows", spy)
    return calls


def test_dropout_is_drawn_once_per_source_and_step(story_pipe, monkeypatch):
    calls = _plans(monkeypatch)
    three = [*FRAMES, "in the park#a red cat#waving"]
    story_pipe(IDENTITY, three, method="consistory", injection=False, query_blending=False, **KW)
    shared = [plans for _, plans in calls if 2 in plans and 3 in plans]
    assert shared
    for plans in shared:   # frames 2 and 3 read the anchors (identity, frame 1) through the same dropped masks
        assert torch.equal(plans[2], plans[3])


def test_vanilla_queries_come_from_the_current_latents(story_pipe):
    """The twins of the blending steps are a plain forward on the images' current latents (official QueryStore
    'cache' forward): at the first layer their queries equal the images' at every blending step."""
    class Spy(ConsiStory):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.same = []

        def attention(self, call):
            group = call.run.group
            if call.kind == "double" and call.block == 0 and group.twins:
                n = len(group.slots)
                self.same.append(torch.equal(call.query[:n], call.query[n:2 * n]))
            return super().attention(call)

    method = Spy(blend_steps=3, schedule_steps=None, injection=False)
    story_pipe(IDENTITY, FRAMES[:1], method=method, **KW)
    assert len(method.same) == 3 and all(method.same)


def test_injection_reads_the_batch_in_place_in_order():
    feats = torch.stack([torch.zeros(4, 2), torch.ones(4, 2), torch.full((4, 2), 2.0)])
    everything = (torch.arange(4), torch.arange(4), None)
    # image 0 injects from image 2; image 1 from image 0, which it reads already injected (official in-place loop)
    inject_in_order(feats, {1: {0: everything}, 0: {2: everything}}, 0.5)
    torch.testing.assert_close(feats[0], torch.full((4, 2), 1.0))        # 0.5 * 0 + 0.5 * 2
    torch.testing.assert_close(feats[1], torch.full((4, 2), 1.0))        # 0.5 * 1 + 0.5 * 1 (image 0 injected)
    torch.testing.assert_close(feats[2], torch.full((4, 2), 2.0))


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
