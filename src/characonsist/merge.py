"""Adaptive token merge (CharaConsist Sec. 3.4).

After attention in the foreground-sharing layers, each matched frame token is pulled towards the attention
output of its identity token: ``h[j] = (1 - a_j) h[j] + a_j h_id[i*(j)]`` with ``a_j = w(t) * S(j)``, where S is
the pair's matching similarity and w(t) the step schedule: 0.8 for steps 1-10, a cosine decay from 0.8 at
step 11 to ~0 at step 30, and off from step 31 (official ``interpolate_*`` defaults).
"""

from __future__ import annotations

import math

import torch


def merge_weight(step: int, weight: float = 0.8, start: int = 1, decay: int = 11, end: int = 31) -> float:
    """w(t): ``weight`` on [start, decay), ``weight * (1 + cos(pi * k / (end - decay))) / 2`` at
    step ``decay + k`` for k in [0, end - decay), and 0 outside [start, end)."""
    if step < start or step >= end:
        return 0.0
    if step < decay:
        return weight
    k = step - decay
    return weight * 0.5 * (1.0 + math.cos(math.pi * k / (end - decay)))


def merge_tokens(frame_out: torch.Tensor, id_out: torch.Tensor, frame_idx: torch.Tensor, id_idx: torch.Tensor,
                 alpha: torch.Tensor) -> torch.Tensor:
    """Interpolate matched rows: ``out[j] = (1 - a) frame_out[j] + a id_out[i]`` for each pair (j, i, a).

    ``frame_out``: (N, C) frame image-token outputs, ``id_out``: (Ni, C); returns a new (N, C) tensor.
    """
    a = alpha.to(frame_out.dtype).unsqueeze(-1)
    mixed = (1 - a) * frame_out.index_select(0, frame_idx) + a * id_out.index_select(0, id_idx)
    return frame_out.index_copy(0, frame_idx, mixed)
