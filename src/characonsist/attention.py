"""Attention with extra (shared) keys per query group, without a dense mask (DESIGN decision 3).

Point-tracking attention gives different query groups of a frame different extra keys: text queries see no
extra keys, foreground queries see the re-encoded identity foreground keys, background queries see the
shared background keys. Instead of one attention call with a dense float mask over all keys (which rules out
flash kernels), each group is gathered and attends to exactly the keys it may see, through diffusers'
``dispatch_attention_fn`` so any attention backend applies. ``masked_reference_attention`` is the
straightforward masked computation the grouped one must equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BiasFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]   # (query positions, key count) -> additive mask


@dataclass
class QueryGroup:
    """Query rows ``rows`` (indices into the sequence) that also see ``extra_k`` / ``extra_v`` (M, H, D).

    ``volatile``: whether this group's key count is new at this step (passed to ``attend``, which may pick a
    kernel that needs no per-shape set-up); None leaves the choice to ``attend``.
    """

    rows: torch.Tensor
    extra_k: torch.Tensor | None = None
    extra_v: torch.Tensor | None = None
    volatile: bool | None = None


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, volatile: bool | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention on (B, S, H, D) tensors (the default ``attend``; ``volatile`` is ignored), with an optional
    additive mask ``bias``."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=bias).transpose(1, 2)


def _padded(rows: torch.Tensor, bucket: int) -> torch.Tensor:
    """``rows`` followed by copies of its first row up to a multiple of ``bucket`` (their outputs are dropped):
    query counts that change from step to step then fall on a few shapes whose kernel plans are reused."""
    n = rows.numel()
    if bucket <= 1 or n % bucket == 0:
        return rows
    return torch.cat([rows, rows[:1].expand(bucket - n % bucket)])


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[QueryGroup],
                      attend: AttendFn = sdpa_attend, row_bucket: int = 0, bias: BiasFn | None = None) -> torch.Tensor:
    """Attention of one image's queries (S, H, D) over its own keys plus each group's extra keys.

    Every query row must belong to exactly one group. Groups without extra keys are merged into one call.
    With ``row_bucket`` the query rows of each call are padded to a multiple of it (exact: queries are
    independent). ``bias(positions, num_keys)``: the backbone's additive mask for those query positions over
    [own keys; extra keys] (``engine.AttnCall.bias``; None: no mask). Returns (S, H, D).
    """
    out = torch.empty_like(q)
    plain = [g for g in groups if g.extra_k is None or g.extra_k.shape[0] == 0]
    calls = []
    if plain:
        calls.append((torch.cat([g.rows for g in plain]), None, None, plain[0].volatile))
    calls += [(g.rows, g.extra_k, g.extra_v, g.volatile) for g in groups
              if g.extra_k is not None and g.extra_k.shape[0] > 0]
    for rows, ek, ev, volatile in calls:
        n = rows.numel()
        if n == 0:
            continue
        keys, values = (k, v) if ek is None else (torch.cat([k, ek.to(k.dtype)]), torch.cat([v, ev.to(v.dtype)]))
        padded = _padded(rows, row_bucket)
        qq = q.index_select(0, padded).unsqueeze(0)
        kw = {} if volatile is None else {"volatile": volatile}
        mask = None if bias is None else bias(padded, keys.shape[0])
        if mask is not None:
            kw["bias"] = mask
        res = attend(qq, keys.unsqueeze(0), values.unsqueeze(0), **kw)[0]
        out.index_copy_(0, rows, res[:n].to(out.dtype))
    return out


def masked_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               groups: list[QueryGroup]) -> torch.Tensor:
    """The same result as ``grouped_attention`` from one dense computation with a boolean mask.

    Keys are [own; extra of group 0; extra of group 1; ...]; a query sees all own keys and the extra keys of
    its own group. Slow and memory-hungry: for tests only.
    """
    extra = [(g.extra_k, g.extra_v) for g in groups if g.extra_k is not None]
    keys = torch.cat([k] + [e[0] for e in extra])
    values = torch.cat([v] + [e[1] for e in extra])
    allow = torch.zeros(q.shape[0], keys.shape[0], dtype=torch.bool)
    allow[:, : k.shape[0]] = True
    offset = k.shape[0]
    for g in groups:
        if g.extra_k is None:
            continue
        n = g.extra_k.shape[0]
        allow[g.rows.unsqueeze(1), torch.arange(offset, offset + n).unsqueeze(0)] = True
        offset += n
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=allow[None, None])
    return out[0].transpose(0, 1)


def row_bias(call, row: int) -> BiasFn | None:
    """``grouped_attention``'s ``bias`` for batch row ``row`` of an ``engine.AttnCall``: None where the backbone
    passes no mask (FLUX.1), so nothing changes there."""
    if call.attn_mask is None:
        return None
    return lambda positions, num_keys: call.bias(row, positions, num_keys)
