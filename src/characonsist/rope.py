"""Rotary position embedding (RoPE) helpers: point tracking's re-encoding (CharaConsist Sec. 3.3).

FLUX applies RoPE to queries and keys inside every attention layer, so a key can be kept *before* RoPE and
rotated later with any position's frequencies. Point-tracking attention does exactly that:
``K_re = RoPE(K_id_raw[i*], pos_frame[j])`` for each matched pair (frame token j, identity token i*).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

Rotary = tuple[torch.Tensor, torch.Tensor]


def apply_rope(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate ``x`` of shape (B, S, H, D) with per-row frequencies ``rotary = (cos, sin)`` of shape (S, D).

    Same arithmetic as diffusers' FLUX attention processor (``apply_rotary_emb(..., sequence_dim=1)``), so a
    plain layer computed here is bit-identical to the stock processor.
    """
    return apply_rotary_emb(x, rotary, sequence_dim=1)


def rope_rows(rotary: Rotary, rows: torch.Tensor) -> Rotary:
    """The frequencies of the sequence positions ``rows`` (indices into the S rows of ``rotary``)."""
    cos, sin = rotary
    rows = rows.to(cos.device)
    return cos.index_select(0, rows), sin.index_select(0, rows)


def reencode(raw_keys: torch.Tensor, rotary: Rotary, positions: torch.Tensor) -> torch.Tensor:
    """Point-tracking re-encoding: rotate keys kept before RoPE with the RoPE of ``positions``.

    ``raw_keys``: (M, H, D) keys without position; ``positions``: (M,) row indices into ``rotary`` (the target
    image's sequence rows). Returns (M, H, D) keys that behave as if they had been computed at ``positions``.
    """
    return apply_rope(raw_keys.unsqueeze(0), rope_rows(rotary, positions))[0]
