"""StoryDiffusion's Consistent Self-Attention (Zhou et al., 2024) on FLUX.1, in the lockstep engine.

StoryDiffusion (seeds 000 and 002 list it as an SDXL baseline of CharaConsist; "inter-image attention" in
CharaConsist Sec. 3) makes a batch of images consistent without training: in each self-attention layer, image
i's queries attend to its own tokens *and* to tokens randomly sampled from the other images of the batch (paper
Sec. 3.1, Consistent Self-Attention, Algorithm 1)::

    S_i = RandSample(I_1, ..., I_{i-1}, I_{i+1}, ..., I_B; rate)      # tokens of the other images
    P_i = [I_i ; S_i]                                                   # own tokens + sampled tokens
    O_i = Attention(Q_i, K(P_i), V(P_i))

Port to FLUX (documented choices):
- *Where.* FLUX has no separate self-attention: its joint attention over [text; image] tokens is the
  self-attention. StoryDiffusion changes the self-attention of SDXL's decoder (up) blocks; the FLUX analogue is
  the 38 single-stream blocks, the second half of the network where the image stream is refined after the
  double blocks have mixed text and image, and where CharaConsist shares too (official CharaConsist code).
  ``blocks`` = "single" (default), "double" or "all".
- *Keys.* The sampled tokens are the other images' image keys *after* RoPE (their own positions), values as
  they are: the plain port that CharaConsist Sec. 3 calls inter-image attention (its locality bias is exactly
  what CharaConsist fixes; StoryDiffusion itself has no answer to it). Text queries see no extra keys; image
  queries see their own text and image keys plus the sampled ones.
- *When.* No sharing at the first step (official code: the first step runs plain attention, there is no
  layout yet); every later step shares (``share_start=1``, ``share_end=None`` = to the end).
- *Sampling.* Each query image draws, at every shared layer and step, an independent Bernoulli(``sample_rate``)
  keep-mask over every other image's tokens (paper and official default rate 0.5). The draws come from a CPU
  ``torch.Generator`` per image seeded from ``seed`` (or the image's own seed) and its story index, so a run is
  deterministic and an image's draws do not depend on which other images share its chunk.
- *Who shares with whom.* ``identities=0`` (paper Algorithm 1): every image of a chunk shares with every other
  image of the chunk. ``identities=n`` (the official "identity images" then "read mode"): the first n images of
  the story are in every chunk and share only among themselves, the other frames attend to the identities'
  sampled tokens only; so frames can be added later and see the same identities.
- Images of another size run in another forward pass: they share only with images of their own size (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import QueryGroup, grouped_attention
from ..engine import AttnCall, Run, Slot
from ..story import StoryImage
from .base import BLOCKS, VOLATILE_BACKENDS, Method, check_config, use_volatile_backend, uses_block


@dataclass
class StoryDiffusionConfig:
    """Consistent Self-Attention options; defaults from the paper / official code."""

    sample_rate: float = 0.5        # share of the other images' tokens each image sees (paper, official sa32/sa64)
    share_start: int = 1            # first step with sharing (official: none at the first step)
    share_end: int | None = None    # first step without sharing; None = to the end
    identities: int = 0             # 0: all images of a chunk share (Algorithm 1); n: first n are identity images
    blocks: str = "single"          # "single" | "double" | "all": FLUX blocks with consistent self-attention
    seed: int | None = None         # seed of the token sampling; None = each image's own seed
    volatile_backend: str = "flash"  # SDPA kernels of the shared calls (the sample size changes at every layer):
                                     # "flash", or "default" (cuDNN on Hopper: a new plan per shape)

    def __post_init__(self):
        check_config(self, ranges={"sample_rate": (0.0, 1.0), "share_start": (0, None), "identities": (0, None),
                                   "seed": (0, 2**63 - 1)},
                     choices={"blocks": BLOCKS, "volatile_backend": VOLATILE_BACKENDS},
                     order=[("share_start", "share_end")])


def coerce_optional(config, types: dict[str, type]) -> None:
    """Options whose default is None arrive as text from ``--option KEY=VALUE``: convert them ("none" = None)."""
    for name, typ in types.items():
        value = getattr(config, name)
        if isinstance(value, str):
            try:
                setattr(config, name, None if value.strip().lower() in ("", "none") else typ(value))
            except ValueError:
                raise ValueError(f"option {name}={value!r} is not a {typ.__name__}") from None


def sample_tokens(num_tokens: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """RandSample of Algorithm 1 for one other image: indices of the tokens kept, each with probability ``rate``.

    Returns a sorted (M,) long tensor, M ~ Binomial(num_tokens, rate); rate 0 keeps none, rate 1 keeps all.
    """
    keep = torch.rand(num_tokens, generator=generator) < rate
    return keep.nonzero(as_tuple=True)[0]


def image_generator(base_seed: int | None, story_index: int) -> torch.Generator:
    """The CPU generator of one image's random draws: seeded from the run seed and the image's story index."""
    seed = (0 if base_seed is None else int(base_seed)) * 1_000_003 + story_index
    return torch.Generator("cpu").manual_seed(seed % (2**63))


def sharing_sources(slots: list[Slot], pos: int, identities: int) -> list[int]:
    """Chunk positions whose tokens image ``pos`` may see: all others (identities=0), or the identity images."""
    me = next(s for s in slots if s.pos == pos)
    if identities <= 0:
        return [s.pos for s in slots if s.pos != pos]
    ids = [s.pos for s in slots if s.story_index < identities]
    return [p for p in ids if p != pos] if me.story_index < identities else ids


class StoryDiffusion(Method):
    """Consistent Self-Attention: each image also attends to randomly sampled tokens of the other images."""

    name = "storydiffusion"
    Config = StoryDiffusionConfig

    def __init__(self, **options):
        super().__init__(**options)

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        return set(range(1, min(self.config.identities, len(images))))

    def start(self, run: Run) -> None:
        cfg = self.config
        use_volatile_backend(run, cfg.volatile_backend)
        self.gens = {s.pos: image_generator(cfg.seed if cfg.seed is not None else s.seed, s.story_index)
                     for s in run.slots}
        self.sources: dict[int, list[int]] = {}
        grid_of = {s.pos: s.grid for s in run.slots}
        for s in run.slots:
            src = sharing_sources(run.slots, s.pos, cfg.identities)
            same = [p for p in src if grid_of[p] == s.grid]
            if len(same) < len(src) and cfg.sample_rate > 0:
                run.note(s.pos, "some images have another size: tokens shared only with images of the same size")
            self.sources[s.pos] = same

    def begin_step(self, run: Run) -> None:
        cfg = self.config
        end = run.num_steps if cfg.share_end is None else cfg.share_end
        self.sharing = run.phase.final and cfg.share_start <= run.step < end and cfg.sample_rate > 0
        run.volatile = self.sharing

    def attention(self, call: AttnCall) -> torch.Tensor:
        if not (self.sharing and uses_block(self.config.blocks, call.kind)):
            return call.plain()
        group, T = call.run.group, call.text_len
        device = call.query.device
        plans = {}
        for row, s in enumerate(group.slots):
            extra_k, extra_v = [], []
            for src in self.sources[s.pos]:
                src_row = group.row_of(src)
                if src_row is None:
                    continue
                idx = T + sample_tokens(call.query.shape[1] - T, self.config.sample_rate, self.gens[s.pos]).to(device)
                extra_k.append(call.k_rot[src_row].index_select(0, idx))
                extra_v.append(call.value[src_row].index_select(0, idx))
            if extra_k:
                plans[row] = [QueryGroup(torch.arange(T, device=device)),
                              QueryGroup(torch.arange(T, call.query.shape[1], device=device),
                                         torch.cat(extra_k), torch.cat(extra_v))]
        return attend_rows(call, plans)


def attend_rows(call: AttnCall, plans: dict[int, list[QueryGroup]],
                queries: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The layer's attention output (B, S, H*D): rows in ``plans`` through ``grouped_attention`` with their query
    groups (and their query ``queries[row]`` (S, H, D) after RoPE where given), all other rows (other images,
    vanilla twins) in one plain batched call."""
    if not plans:
        return call.plain()
    B, S, H, D = call.query.shape
    out = torch.empty(B, S, H * D, dtype=call.query.dtype, device=call.query.device)
    plain_rows = [r for r in range(B) if r not in plans]
    if plain_rows:
        idx = torch.tensor(plain_rows, device=call.query.device)
        res = call.attend(call.q_rot[idx], call.k_rot[idx], call.value[idx])
        out[idx] = res.flatten(2, 3).to(out.dtype)
    for row, groups in plans.items():
        q = call.q_rot[row] if queries is None or row not in queries else queries[row]
        res = grouped_attention(q, call.k_rot[row], call.value[row], groups, attend=call.attend)
        out[row] = res.flatten(1, 2).to(out.dtype)
    return out
