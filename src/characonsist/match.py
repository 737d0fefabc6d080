"""Point matching between a frame and the identity image (CharaConsist Sec. 3.1, Eq. for S_t).

The similarity of frame token j and identity token i is the cosine similarity of their attention outputs,
averaged over all single blocks at one step (step 10 by default). Each frame token is matched to the argmax
over *all* identity tokens; the pair is kept only if both tokens are foreground and the similarity exceeds
the threshold (official ``sim_thr = 0.5``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Matches:
    """Kept point pairs of one frame: frame token ``frame_idx[k]`` <-> identity token ``id_idx[k]``."""

    frame_idx: torch.Tensor   # (M,) long, flat row-major token index in the frame
    id_idx: torch.Tensor      # (M,) long, flat token index in the identity image
    sim: torch.Tensor         # (M,) float32 averaged cosine similarity of the pair

    def __len__(self) -> int:
        return int(self.frame_idx.numel())

    def to(self, device) -> Matches:
        return Matches(self.frame_idx.to(device), self.id_idx.to(device), self.sim.to(device))

    @classmethod
    def empty(cls, device=None) -> Matches:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return cls(z, z.clone(), torch.zeros(0, device=device))


def cosine_similarity_matrix(frame_feats: torch.Tensor, id_feats: torch.Tensor) -> torch.Tensor:
    """(Nf, C) x (Ni, C) -> (Nf, Ni) cosine similarities, returned in float32.

    Rows are normalised in float32; the product runs in the features' dtype (bf16 on a GPU: one fused
    matmul instead of an fp32 one, about 3 significant digits, enough against a 0.5 threshold).
    """
    a = F.normalize(frame_feats.float(), dim=-1).to(frame_feats.dtype)
    b = F.normalize(id_feats.float(), dim=-1).to(id_feats.dtype)
    return (a @ b.T).float()


def match_points(sim: torch.Tensor, frame_fg: torch.Tensor, id_fg: torch.Tensor, threshold: float) -> Matches:
    """Argmax matching with foreground filtering and a similarity threshold.

    ``sim``: (Nf, Ni) layer-averaged similarities; ``frame_fg`` (Nf,), ``id_fg`` (Ni,) bool masks.
    """
    best, arg = sim.max(dim=1)
    keep = frame_fg.to(sim.device) & id_fg.to(sim.device)[arg] & (best > threshold)
    frame_idx = keep.nonzero(as_tuple=True)[0]
    return Matches(frame_idx, arg[frame_idx], best[frame_idx])
