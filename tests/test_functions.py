"""Pure functions of the method on synthetic tensors."""

import math

import pytest
import torch

from characonsist.attention import QueryGroup, grouped_attention, masked_reference_attention, sdpa_attend
from characonsist.mask import foreground_mask, otsu_threshold, text_attention_spans
from characonsist.match import cosine_similarity_matrix, match_points
from characonsist.merge import merge_tokens, merge_weight
from characonsist.rope import apply_rope, reencode


def _rotary(n, dim=16, theta=10000.0):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.stack([torch.zeros(n), torch.arange(n) // 4, torch.arange(n) % 4], dim=-1).float()
    return FluxPosEmbed(theta, [4, 4, 8])(ids)


def test_match_recovers_known_shift():
    torch.manual_seed(0)
    h = w = 6
    feats = torch.randn(h, w, 32)
    shifted = torch.roll(feats, shifts=(2, 1), dims=(0, 1))   # frame[y, x] = id[y - 2, x - 1]
    sim = cosine_similarity_matrix(shifted.reshape(-1, 32), feats.reshape(-1, 32))
    m = match_points(sim, torch.ones(h * w, dtype=torch.bool), torch.ones(h * w, dtype=torch.bool), 0.5)
    assert len(m) == h * w
    fy, fx = m.frame_idx // w, m.frame_idx % w
    iy, ix = m.id_idx // w, m.id_idx % w
    assert torch.equal(iy, (fy - 2) % h) and torch.equal(ix, (fx - 1) % w)
    assert torch.allclose(m.sim, torch.ones_like(m.sim))


def test_match_recovers_permutation_and_filters():
    torch.manual_seed(1)
    n = 20
    feats = torch.randn(n, 16)
    perm = torch.randperm(n)
    sim = cosine_similarity_matrix(feats[perm], feats)
    frame_fg = torch.ones(n, dtype=torch.bool)
    frame_fg[:5] = False
    id_fg = torch.ones(n, dtype=torch.bool)
    id_fg[perm[5]] = False                      # frame token 5 matches a background identity token
    m = match_points(sim, frame_fg, id_fg, 0.5)
    assert set(m.frame_idx.tolist()) == set(range(6, n))
    assert torch.equal(m.id_idx, perm[m.frame_idx])
    assert len(match_points(sim, frame_fg, id_fg, 1.01)) == 0     # nothing above the threshold


def test_mask_from_constructed_attention():
    # 4x4 grid, 2 heads, head dim 8; text: 3 background tokens, 2 foreground tokens, then padding
    grid, d = (4, 4), 8
    k_txt = torch.zeros(7, 2, d)
    k_txt[:3, :, 0] = 1.0            # background keys point along axis 0
    k_txt[3:5, :, 1] = 1.0           # foreground keys along axis 1
    k_txt[5:, :, 1] = 50.0           # padding would dominate if it were not excluded
    fg_true = torch.zeros(16, dtype=torch.bool)
    fg_true[torch.tensor([5, 6, 9, 10])] = True     # a 2x2 square in the middle
    q = torch.zeros(16, 2, d)
    q[~fg_true, :, 0] = 4.0
    q[fg_true, :, 1] = 4.0
    bg, fg = text_attention_spans(q, k_txt, bg_len=3, real_len=5)
    assert torch.equal(fg >= bg, fg_true)
    # erode 3x3 removes the 2x2 square entirely; dilate 5x5 cannot bring it back
    assert not foreground_mask(bg, fg, grid).any()
    assert torch.equal(foreground_mask(bg, fg, grid, erode=1, dilate=1), fg_true)
    # a 3x3 block survives a 3x3 erosion as its centre and grows back to a 5x5 window (clipped to the grid)
    big = torch.zeros(6, 6, dtype=torch.bool)
    big[1:4, 1:4] = True
    out = foreground_mask((~big).float().reshape(-1), big.float().reshape(-1), (6, 6)).reshape(6, 6)
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[0:5, 0:5] = True
    assert torch.equal(out, expect)


def test_reencoded_key_equals_key_computed_at_position():
    torch.manual_seed(2)
    n, heads, dim = 16, 2, 16
    cos, sin = _rotary(n)
    raw = torch.randn(1, n, heads, dim)
    rotated = apply_rope(raw, (cos, sin))
    src = torch.tensor([3, 7, 12])
    dst = torch.tensor([10, 0, 5])
    moved = torch.zeros_like(raw)
    moved[0, dst] = raw[0, src]                        # the same content computed at the target positions
    expected = apply_rope(moved, (cos, sin))[0, dst]
    got = reencode(raw[0, src], (cos, sin), dst)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, rotated[0, src], atol=1e-3)   # different from the key at its own position


@pytest.mark.parametrize("empty", ["none", "fg", "bg", "both"])
def test_grouped_attention_equals_masked_reference(empty):
    torch.manual_seed(3)
    T, N, H, D = 5, 12, 2, 8
    S = T + N
    q, k, v = torch.randn(S, H, D), torch.randn(S, H, D), torch.randn(S, H, D)
    fg_rows = T + torch.tensor([0, 1, 4, 5, 9])
    bg_rows = torch.tensor([r for r in range(T, S) if r not in fg_rows.tolist()])
    n_fg = 0 if empty in ("fg", "both") else 4
    n_bg = 0 if empty in ("bg", "both") else 7
    groups = [QueryGroup(torch.arange(T)),
              QueryGroup(fg_rows, torch.randn(n_fg, H, D), torch.randn(n_fg, H, D)),
              QueryGroup(bg_rows, torch.randn(n_bg, H, D), torch.randn(n_bg, H, D))]
    got = grouped_attention(q, k, v, groups)
    ref = masked_reference_attention(q, k, v, groups)
    assert torch.allclose(got, ref, atol=1e-5)
    plain = masked_reference_attention(q, k, v, [QueryGroup(torch.arange(S))])
    assert torch.allclose(got[:T], plain[:T], atol=1e-5)     # text queries never see extra keys
    if empty != "both":
        assert not torch.allclose(got[T:], plain[T:], atol=1e-3)


def test_merge_weight_schedule():
    assert merge_weight(0) == 0.0
    assert all(merge_weight(s) == 0.8 for s in range(1, 11))
    assert merge_weight(11) == pytest.approx(0.8)
    assert merge_weight(21) == pytest.approx(0.4)                    # half way through the cosine
    assert merge_weight(30) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert merge_weight(31) == 0.0 and merge_weight(45) == 0.0
    ws = [merge_weight(s) for s in range(11, 31)]
    assert all(a > b for a, b in zip(ws, ws[1:], strict=False))   # consecutive pairs: one fewer than ws


def test_merge_tokens_interpolates_matched_rows_only():
    frame = torch.zeros(4, 3)
    ident = torch.ones(5, 3) * torch.arange(5).unsqueeze(1)
    out = merge_tokens(frame, ident, torch.tensor([1, 3]), torch.tensor([4, 2]), torch.tensor([0.5, 0.25]))
    assert torch.equal(out[0], frame[0]) and torch.equal(out[2], frame[2])
    assert torch.allclose(out[1], torch.full((3,), 2.0)) and torch.allclose(out[3], torch.full((3,), 0.5))


def test_otsu_separates_two_modes():
    torch.manual_seed(4)
    low, high = torch.randn(500) * 0.1, torch.randn(300) * 0.1 + 3.0
    x = torch.cat([low, high])
    t = otsu_threshold(x)
    assert float(low.max()) <= t < float(high.min())     # any cut in the gap is optimal
    assert int((x > t).sum()) == 300


def test_step_schedule_rescales_from_50_steps():
    from characonsist.methods.characonsist import CharaConsistConfig, step_schedule

    cfg = CharaConsistConfig()
    assert step_schedule(cfg, 50) == dict(share_start=1, share_end=41, mask_step=10, merge_start=1, merge_decay=11,
                                          merge_end=31)
    s4 = step_schedule(cfg, 4)
    assert s4["share_start"] == 1 and s4["mask_step"] == 1 and s4["share_end"] == 3
    s20 = step_schedule(cfg, 20)
    assert s20["mask_step"] == 4 and s20["share_end"] == 16 and s20["merge_end"] == 12
    assert step_schedule(CharaConsistConfig(schedule_steps=None), 20)["mask_step"] == 10


def test_batched_text_spans_equal_per_image_ones():
    from characonsist.mask import span_weights, text_attention_spans_batched

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 20, 2, 8, generator=g)
    k = torch.randn(3, 9, 2, 8, generator=g)
    bg_lens, real_lens = [2, 3, 1], [6, 9, 4]
    w = span_weights(bg_lens, real_lens)
    for scaled in (False, True):
        bg, fg = text_attention_spans_batched(q, k, real_lens, w, scaled)
        for i in range(3):
            ref_bg, ref_fg = text_attention_spans(q[i], k[i], bg_lens[i], real_lens[i], scaled)
            torch.testing.assert_close(bg[i], ref_bg, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fg[i], ref_fg, rtol=1e-5, atol=1e-6)


def test_padded_query_rows_give_the_same_result():
    g = torch.Generator().manual_seed(3)
    S, H, D = 40, 2, 8
    q, k, v = (torch.randn(S, H, D, generator=g) for _ in range(3))
    groups = [QueryGroup(torch.arange(0, 7), volatile=False),
              QueryGroup(torch.arange(7, 30), torch.randn(5, H, D, generator=g), torch.randn(5, H, D, generator=g),
                         volatile=True),
              QueryGroup(torch.arange(30, 40), torch.randn(3, H, D, generator=g), torch.randn(3, H, D, generator=g))]
    seen = []

    def attend(q, k, v, volatile=None):
        seen.append((q.shape[1], volatile))
        return sdpa_attend(q, k, v)

    ref = grouped_attention(q, k, v, groups)
    got = grouped_attention(q, k, v, groups, attend=attend, row_bucket=16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert seen == [(16, False), (32, True), (16, None)]
