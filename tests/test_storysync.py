"""StorySync: pure functions on synthetic tensors, and the method end to end on a tiny FLUX (CPU)."""

import json
import math

import numpy as np
import pytest
import torch

from characonsist.attention import QueryGroup, masked_reference_attention
from characonsist.methods.base import story_seeds
from characonsist.methods.storysync import (
    StorySync,
    StorySyncConfig,
    correspond,
    cross_image_attention,
    dropout_keep,
    harmonize,
    layout_interpolate,
    mix_seed,
    otsu_limit,
    propagation_mask,
    step_schedule,
    subject_attention,
    subject_mask,
)
from characonsist.story import StoryImage
from conftest import FRAMES, IDENTITY, KW  # the shared story (conftest.py)

OFF = dict(share=False, rfh=False, bli=False)


# ------------------------------------------------------------------ pure functions

def test_propagation_mask_eq5_and_subsets_eq13():
    m = [torch.tensor([1, 0, 1], dtype=torch.bool), torch.tensor([0, 0, 1], dtype=torch.bool),
         torch.tensor([1, 1, 0], dtype=torch.bool)]
    assert propagation_mask(m, 1).tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 0]          # own tokens all, others M_j
    assert propagation_mask(m, 0).tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 0]
    assert propagation_mask(m, 2, sources=[0]).tolist() == [1, 0, 1, 0, 0, 0, 1, 1, 1]   # non-references: 0


def _dense_eq7(q, k, v, T, masks, i, sources, keep=None):
    """Eq. 7 literally: softmax(Q_i K_all^T / sqrt(d) + log Gamma_i) V_all; K_all = [own joint keys; others' image]."""
    B, S, H, D = q.shape
    keys = torch.cat([k[i] if j == i else k[j, T:] for j in range(B)])          # image order, as Gamma_i
    values = torch.cat([v[i] if j == i else v[j, T:] for j in range(B)])
    src = [(masks[j] & (keep[sources.index(j)] if keep is not None else True)) if j in sources
           else torch.zeros_like(masks[j]) for j in range(B)]
    own = torch.ones(S, dtype=torch.bool)
    gamma_img = propagation_mask([own if j == i else src[j] for j in range(B)], i)
    gamma_txt = propagation_mask([own if j == i else torch.zeros_like(src[j]) for j in range(B)], i)
    gamma = torch.stack([gamma_txt] * T + [gamma_img] * (S - T)).float()           # (S, K)
    logits = torch.einsum("shd,khd->hsk", q[i], keys) / math.sqrt(D) + gamma.log()
    return torch.einsum("hsk,khd->shd", logits.softmax(-1), values)


@pytest.mark.parametrize("case", ["all", "subset", "dropout", "empty"])
def test_cross_image_attention_equals_dense_eq7(case):
    torch.manual_seed(0)
    B, T, N, H, D = 3, 4, 9, 2, 8
    q, k, v = torch.randn(B, T + N, H, D), torch.randn(B, T + N, H, D), torch.randn(B, T + N, H, D)
    masks = [torch.rand(N) > 0.5 for _ in range(B)]
    if case == "empty":
        masks = [torch.zeros(N, dtype=torch.bool)] * B
    i = 2
    sources = [0] if case == "subset" else [0, 1]
    keep = [torch.rand(N) > 0.5 for _ in sources] if case == "dropout" else None
    got = cross_image_attention(q, k, v, T, masks, i, sources, keep)
    want = _dense_eq7(q, k, v, T, masks, i, sources, keep)
    assert torch.allclose(got, want, atol=1e-5)
    # the same as the engine's masked reference with the shared keys as the image queries' extra keys
    sel = [masks[j] & (keep[n] if keep is not None else True) for n, j in enumerate(sources)]
    ek = torch.cat([k[j, T:][s] for j, s in zip(sources, sel, strict=True)])
    ev = torch.cat([v[j, T:][s] for j, s in zip(sources, sel, strict=True)])
    ref = masked_reference_attention(q[i], k[i], v[i], [QueryGroup(torch.arange(T)),
                                                        QueryGroup(torch.arange(T, T + N), ek, ev)])
    assert torch.allclose(got, ref, atol=1e-5)
    own = masked_reference_attention(q[i], k[i], v[i], [QueryGroup(torch.arange(T + N))])
    assert torch.allclose(got[:T], own[:T], atol=1e-6)                   # text queries see no extra keys
    assert torch.allclose(got[T:], own[T:], atol=1e-6) == (case == "empty")


def test_subject_mask_from_constructed_text_attention():
    # 4x4 grid; text: 2 background tokens, 2 character tokens, 1 action token, then padding
    d = 8
    k_txt = torch.zeros(8, 2, d)
    k_txt[:2, :, 0] = 1.0
    k_txt[2:4, :, 1] = 1.0           # subject (character) keys along axis 1
    k_txt[4, :, 2] = 1.0
    k_txt[5:, :, 1] = 50.0           # padding would dominate if it were not excluded
    truth = torch.zeros(16, dtype=torch.bool)
    truth[torch.tensor([5, 6, 9, 10, 11])] = True
    q = torch.zeros(16, 2, d)
    q[~truth, :, 0] = 6.0
    q[truth, :, 1] = 6.0
    a = subject_attention(q[None], k_txt[None], [(2, 4, 5)])[0]
    assert a.shape == (16,) and float(a.max()) <= 1.0 + 1e-6
    assert torch.equal(subject_mask(a), truth)
    assert not subject_mask(torch.full((16,), 0.3)).any()               # a flat map: empty mask, no crash
    # batched over images with other spans and real lengths: each row as if alone
    k2 = k_txt.clone()
    k2[3] = 0.0
    both = subject_attention(torch.stack([q, q.flip(0)]), torch.stack([k_txt, k2]), [(2, 4, 5), (1, 3, 4)])
    alone = subject_attention(q.flip(0)[None], k2[:4][None], [(1, 3, 4)])[0]
    assert torch.allclose(both[0], a) and torch.allclose(both[1], alone, atol=1e-6)


def test_rfh_recovers_known_correspondence_and_applies_eq11():
    torch.manual_seed(1)
    N, C = 12, 16
    target = torch.randn(N, C)
    perm = torch.randperm(N)
    feat = target[perm] + 0.01 * torch.randn(N, C)        # region r of image i is region perm[r] of image j
    tmask = torch.ones(1, N, dtype=torch.bool)
    best, index = correspond(feat, target[None], tmask)
    assert torch.equal(index, perm) and bool((best > 0.99).all())
    # a target token outside Omega_j is never chosen
    tmask[0, perm[0]] = False
    _, index2 = correspond(feat, target[None], tmask)
    assert int(index2[0]) != int(perm[0]) and torch.equal(index2[1:], perm[1:])

    mask = torch.zeros(N, dtype=torch.bool)
    mask[:6] = True
    out = harmonize(feat, target[index], 0.3 * mask.float())
    assert torch.allclose(out[:6], feat[:6] + 0.3 * (target[perm[:6]] - feat[:6]), atol=1e-6)
    assert torch.equal(out[6:], feat[6:])                 # background untouched (M_i = 0)
    # several targets: flat index over K x N'
    best3, index3 = correspond(feat, torch.stack([torch.randn(N, C), target]), torch.ones(2, N, dtype=torch.bool))
    assert torch.equal(index3, N + perm)


def test_otsu_limits_harmonization_to_strong_correspondences():
    best = torch.tensor([0.95, 0.9, 0.92, 0.1, 0.15, 0.97, 0.05, 0.99])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    keep = otsu_limit(best, mask)
    assert keep.tolist() == [True, True, True, False, False, True, False, False]
    r, match = torch.zeros(8, 4), torch.ones(8, 4)
    out = harmonize(r, match, 0.3 * keep.float())
    assert torch.allclose(out[keep], torch.full((4, 4), 0.3)) and torch.equal(out[~keep], r[~keep])
    assert otsu_limit(torch.full((8,), 0.5), mask).tolist() == mask.tolist()      # equal similarities: all kept
    best_none, _ = correspond(torch.randn(8, 4), torch.randn(1, 8, 4), torch.zeros(1, 8, dtype=torch.bool))
    assert not otsu_limit(best_none, mask).any()                                  # no target subject: nothing


def test_bli_blend_eq12():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(layout_interpolate(x, y, 0.7), 0.3 * x + 0.7 * y, atol=1e-6)
    assert torch.equal(layout_interpolate(x, y, 0.0), x) and torch.allclose(layout_interpolate(x, y, 1.0), y)
    assert layout_interpolate(x.bfloat16(), y.bfloat16(), 0.7).dtype == torch.bfloat16


def test_seeded_dropout():
    a, b = dropout_keep(1000, 0.5, mix_seed(2025, 1, 3)), dropout_keep(1000, 0.5, mix_seed(2025, 1, 3))
    assert torch.equal(a, b) and 400 < int(a.sum()) < 600
    assert not torch.equal(a, dropout_keep(1000, 0.5, mix_seed(2025, 1, 4)))
    assert dropout_keep(10, 0.0, 1).all()
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**70, -1) < 2**63


def test_options_are_checked():
    with pytest.raises(ValueError, match="valid options"):
        StorySync(lambda_=0.5)
    with pytest.raises(ValueError, match="valid"):
        StorySync(share_blocks="middle")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        StorySync(gamma=1.5)
    m = StorySync(num_references=3)
    images = [StoryImage.parse(IDENTITY)] + [StoryImage.parse(f) for f in FRAMES * 2]
    assert m.dependencies(images, 4) == {1, 2} and m.dependencies(images, 2) == set()


def test_step_schedule_rescales_to_the_step_count():
    cfg = StorySyncConfig()
    assert step_schedule(cfg, 50) == {"share_start": 1, "share_end": 50, "bli_end": 10}
    assert step_schedule(cfg, 20) == {"share_start": 1, "share_end": 20, "bli_end": 4}
    assert step_schedule(cfg, 4) == {"share_start": 1, "share_end": 4, "bli_end": 2}   # BLI keeps a shared step
    assert step_schedule(StorySyncConfig(schedule_steps=None, bli_end=3), 8)["bli_end"] == 3


# ------------------------------------------------------------------ end to end on a tiny FLUX

@pytest.fixture(scope="module")
def vanilla(story_pipe):
    """Plain FLUX from StorySync's noise: one seed per image (its convention, ``StorySync.seeding``)."""
    return story_pipe(IDENTITY, FRAMES, method="vanilla", seed=story_seeds(2025, 3, "per_image"), **KW)


def test_switched_off_equals_plain_flux_exactly(story_pipe, vanilla):
    out = story_pipe(IDENTITY, FRAMES, method="storysync", **OFF, **KW)
    assert out.seeds == story_seeds(2025, 3, "per_image") and out.settings["seeding"] == "per_image"
    assert all(np.array_equal(a, b) for a, b in zip(out.images, vanilla.images, strict=True))
    late = story_pipe(IDENTITY, FRAMES, method="storysync", share_start=50, bli=False, **KW)
    assert all(np.array_equal(a, b) for a, b in zip(late.images, vanilla.images, strict=True))   # sharing never starts


def test_effect_on_changes_frames_stays_finite_and_is_deterministic(story_pipe, vanilla):
    a = story_pipe(IDENTITY, FRAMES, method="storysync", **KW)
    b = story_pipe(IDENTITY, FRAMES, method="storysync", **KW)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)) and a.notes == b.notes
    assert all(np.isfinite(x).all() for x in a.images)
    assert all(np.abs(x - y).max() > 1e-4 for x, y in zip(a.frames, vanilla.frames, strict=True))
    assert a.method == "storysync" and a.settings["method_options"]["gamma"] == 0.3
    assert any("every frame" in n for n in a.notes[0])       # the batch changes the identity: said so
    assert StorySync.seeding == "per_image"
    assert [m.shape for m in a.masks] == [(8, 8)] * 3
    c = story_pipe(IDENTITY, FRAMES[:1], method="storysync", dropout_seed=7, **KW)   # another dropout draw
    assert all(np.isfinite(x).all() for x in c.images) and c.settings["method_options"]["dropout_seed"] == 7


@pytest.mark.parametrize("options", [dict(share=False, bli=False), dict(rfh=False, bli=False),
                                     dict(rfh_features="layer", mask_dropout=0.3, rfh_dropout=0.3,
                                          share_blocks="all", mask_blocks="all", bli_blocks="single")])
def test_each_component_alone_acts(story_pipe, vanilla, options):
    out = story_pipe(IDENTITY, FRAMES, method="storysync", **options, **KW)
    assert all(np.isfinite(x).all() for x in out.images)
    assert any(np.abs(x - y).max() > 1e-5 for x, y in zip(out.frames, vanilla.frames, strict=True))


def test_bli_pulls_toward_the_vanilla_twins(story_pipe, vanilla):
    # lambda = 1 on every step and block: each layer's image outputs are the twin's, so the images are plain FLUX's
    full = story_pipe(IDENTITY, FRAMES, method="storysync", bli_lambda=1.0, bli_end=50, **KW)
    for x, y in zip(full.images, vanilla.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)
    # BLI alone interpolates between two plain passes: plain FLUX again
    alone = story_pipe(IDENTITY, FRAMES, method="storysync", share=False, rfh=False, **KW)
    for x, y in zip(alone.images, vanilla.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_subset_references_eq13(story_pipe, vanilla):
    frames = FRAMES + ["in the park#a red cat#waving"]
    one = story_pipe(IDENTITY, FRAMES, method="storysync", num_references=1, **KW)
    np.testing.assert_allclose(one.identity, vanilla.identity, atol=1e-4)   # the only reference: nobody to see
    assert not one.notes[0]
    assert one.matches[0] is not None                                      # frames harmonize toward the identity
    # references {identity, frame 1} run in every chunk; the other frames see only them: chunking changes nothing
    full = story_pipe(IDENTITY, frames, method="storysync", num_references=2, **KW)
    chunked = story_pipe(IDENTITY, frames, method="storysync", num_references=2, batch_size=3, **KW)
    for x, y in zip(full.images, chunked.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_image_of_another_size_is_noted(story_pipe):
    frames = [StoryImage("in the park", "a red cat", "running", height=48, width=32), FRAMES[1]]
    out = story_pipe(IDENTITY, frames, method="storysync", **KW)
    assert out.frames[0].shape == (48, 32, 3) and all(np.isfinite(x).all() for x in out.images)
    assert any("another size" in n for n in out.notes[1])


def test_cli_generate_with_storysync(tmp_path, tiny_pipe):
    from characonsist import cli

    tiny_pipe.save_pretrained(tmp_path / "flux")
    story = tmp_path / "story.txt"
    story.write_text("park#a cat#sitting\npark#a cat#running\n")
    code = cli.main(["generate", str(story), "--model", str(tmp_path / "flux"), "--out", str(tmp_path / "out"),
                     "--height", "32", "--width", "32", "--max-sequence-length", "32", "--steps", "3", "--quiet",
                     "--method", "storysync", "--option", "num_references=1", "--option", "rfh_features=layer"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    options = manifest["groups"][0]["engine_settings"]["method_options"]
    assert manifest["groups"][0]["engine_settings"]["method"] == "storysync"
    assert options["num_references"] == 1 and options["rfh_features"] == "layer"
