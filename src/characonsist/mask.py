"""Foreground masks from text-image attention (CharaConsist Sec. 3.2, "Mask extraction").

For every image token the attention weights to the real text tokens are split into the background span
(tokens of the ``background`` field) and the foreground span (character + action, as the official code
does). Averaged within each span, summed over heads and averaged over the single blocks, a token is
foreground where its mean foreground weight is at least its mean background weight; a 3x3 erosion and a
5x5 dilation clean the mask (official post-processing).

Paper vs code: the paper speaks of attention weights; the official code applies the softmax to *unscaled*
logits ``q k^T`` (no 1/sqrt(d)). We follow the code by default (``scaled=False``) and offer the paper's
reading with ``scaled=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_attention_spans(q_img: torch.Tensor, k_txt: torch.Tensor, bg_len: int, real_len: int,
                         scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention of each image token to the background and to the foreground text span.

    ``q_img``: (N, H, D) image queries after RoPE; ``k_txt``: (T, H, D) text keys after RoPE. The softmax runs
    over the ``real_len`` real text tokens only (padding and the end token excluded). Returns two (N,) float32
    maps, summed over heads: mean weight on tokens [0, bg_len) and on [bg_len, real_len).
    The engine uses ``text_attention_spans_batched`` (all images at once); this one image form is its reference.
    """
    q = q_img.float().transpose(0, 1)                       # (H, N, D)
    k = k_txt[:real_len].float().transpose(0, 1)            # (H, R, D)
    logits = q @ k.transpose(1, 2)                          # (H, N, R)
    if scaled:
        logits = logits / q.shape[-1] ** 0.5
    probs = logits.softmax(dim=-1).sum(dim=0)               # (N, R), summed over heads
    return probs[:, :bg_len].mean(dim=1), probs[:, bg_len:real_len].mean(dim=1)


def span_weights(bg_lens: list[int], real_lens: list[int], device=None) -> torch.Tensor:
    """(2, B, R) averaging weights of the background span [0, bg_len) and the foreground span
    [bg_len, real_len) of each row, R = max real_len (for ``text_attention_spans_batched``)."""
    R = max(real_lens)
    w = torch.zeros(2, len(bg_lens), R)
    for i, (b, r) in enumerate(zip(bg_lens, real_lens, strict=True)):
        if b > 0:
            w[0, i, :b] = 1.0 / b
        if r > b:
            w[1, i, b:r] = 1.0 / (r - b)
    return w.to(device, non_blocking=True)


def text_attention_spans_batched(q_img: torch.Tensor, k_txt: torch.Tensor, real_lens: list[int],
                                 weights: torch.Tensor, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``text_attention_spans`` for B images in one go (one kernel chain instead of B).

    ``q_img``: (B, N, H, D), ``k_txt``: (B, T, H, D); row i's softmax runs over its first ``real_lens[i]``
    text tokens; ``weights`` from ``span_weights``. Returns two (B, N) float32 maps.
    """
    R = max(real_lens)
    q = q_img.float().transpose(1, 2)                       # (B, H, N, D)
    k = k_txt[:, :R].float().transpose(1, 2)                # (B, H, R, D)
    logits = q @ k.transpose(2, 3)                          # (B, H, N, R)
    if scaled:
        logits = logits / q.shape[-1] ** 0.5
    if min(real_lens) < R:                                  # tokens past a row's real length take no weight
        valid = torch.arange(R) < torch.tensor(real_lens)[:, None]
        logits = logits.masked_fill(~valid.to(logits.device, non_blocking=True)[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).sum(dim=1)               # (B, N, R), summed over heads
    spans = torch.einsum("bnr,sbr->sbn", probs, weights)
    return spans[0], spans[1]


def _binary_filter(mask: torch.Tensor, size: int, dilate: bool) -> torch.Tensor:
    """Square erosion (dilate=False) or dilation of a 2-D bool mask with a ``size`` x ``size`` window."""
    if size <= 1:
        return mask
    x = mask.float()[None, None]
    pad = size // 2
    if dilate:
        out = F.max_pool2d(F.pad(x, (pad, pad, pad, pad), value=0.0), size, stride=1)
    else:   # erosion = not dilate(not x); outside the image counts as background, as OpenCV's default border
        out = 1.0 - F.max_pool2d(F.pad(1.0 - x, (pad, pad, pad, pad), value=0.0), size, stride=1)
    return out[0, 0] > 0.5


def foreground_mask(bg_attn: torch.Tensor, fg_attn: torch.Tensor, grid: tuple[int, int], erode: int = 3,
                    dilate: int = 5) -> torch.Tensor:
    """Foreground where mean fg attention >= mean bg attention, then erode and dilate (official 3x3 / 5x5).

    ``bg_attn``, ``fg_attn``: (N,) maps (sums or means over layers: only their comparison matters).
    Returns a flat (N,) bool mask in row-major token order.
    """
    h, w = grid
    mask = (fg_attn >= bg_attn).reshape(h, w)
    mask = _binary_filter(mask, erode, dilate=False)
    mask = _binary_filter(mask, dilate, dilate=True)
    return mask.reshape(-1)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D set of values: the cut maximising the between-class variance.

    Used by ConsiStory and StorySync to turn a soft subject map into a mask. Returns a value t; the
    foreground is ``values > t``.
    """
    v = values.detach().float().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centers = torch.linspace(lo, hi, bins + 1, device=v.device)[:-1] + (hi - lo) / bins / 2
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    sum0 = (hist * centers).cumsum(0)
    mean0 = sum0 / weight0.clamp_min(1e-12)
    mean1 = (sum0[-1] - sum0) / weight1.clamp_min(1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    between[(weight0 == 0) | (weight1 == 0)] = -1
    k = int(between.argmax())
    return float(centers[k] + (hi - lo) / bins / 2)
