"""StoryDiffusion's Consistent Self-Attention (Zhou et al., NeurIPS 2024) on FLUX.1, in the lockstep engine.

StoryDiffusion (seeds 000 and 002 list it as an SDXL baseline of CharaConsist; "inter-image attention" in
CharaConsist Sec. 3) makes a batch of images consistent without training: in each self-attention layer, image
i's queries attend to its own tokens *and* to tokens randomly sampled from the other images of the batch (paper
Sec. 3.1, Consistent Self-Attention, Algorithm 1)::

    S_i = RandSample(I_1, ..., I_{i-1}, I_{i+1}, ..., I_B; rate)      # tokens of the other images
    P_i = [I_i ; S_i]                                                   # own tokens + sampled tokens
    O_i = Attention(Q_i, K(P_i), V(P_i))

The defaults follow the official demo (``app.py``: ``SpatialAttnProcessor2_0``, ``process_generation``; the same
processor is in ``predict.py``; the token masks come from ``cal_attn_mask_xl`` in ``utils/gradio_utils.py``):

- *Identity images, then frames.* The first ``id_length`` prompts are the identity images: they are generated
  together and share among themselves ("write"); every later frame attends to its own tokens and to the sampled
  tokens of the identity images only ("read"), never to another frame. ``identities`` = 2 (the demo's
  ``id_length`` default; its examples use 2 and 3): the story's identity and frame 1 are the identity images, so
  **the identity image is changed by frame 1**, as in the official code, and ``out.notes`` says so;
  ``identities=1`` leaves the identity untouched by the frames; ``identities=0`` is Algorithm 1 over the whole
  chunk (every image shares with every other). The identity images are in every chunk (``dependencies``), and
  since they never see a frame they come out the same whatever frames run with them.
- *Token masks.* The official code draws one keep/drop mask over every identity image's tokens per denoising
  step (``cal_attn_mask_xl``, ``rand < sa32/sa64``, called once per step) and every image of the step uses it:
  each identity image sees the kept tokens of the other identity images, each frame the kept tokens of all of
  them. Here too: one draw per source image and step, shared by every receiving image and every layer of the
  step. Keep rate ``sample_rate`` = 0.5 (``sa32``/``sa64`` in ``app.py``'s globals, ``predict.py`` and the demo's
  examples; the demo's sliders start at 0.7).
- *First steps.* While ``cur_step < 5`` (of the demo's 50) the official processor runs no sampled sharing: the
  identity images attend plainly, and the frames attend to their own tokens plus **every** token of the identity
  images (the read branch passes the identity images' hidden states without a mask). ``share_start`` = 5;
  ``early_full_read=False`` gives the frames plain attention there too.
- *Random skips.* From ``share_start`` on, every call of a shared layer is skipped (plain attention for every
  image of the call) with probability ``skip_early`` = 0.3 before step ``skip_switch`` = 20 and ``skip_late``
  = 0.1 after it (``random.random()`` per processor call against 0.3 / 0.1). One draw per layer and step, shared
  by the images of the step (the demo reseeds its RNGs before the identity batch and before every frame, so the
  identity pass and every frame pass see the same sequence of skips and masks).
- *Steps.* ``share_start``, ``share_end`` and ``skip_switch`` are written for the demo's 50 steps and rescaled to
  the step count (``schedule_steps``, as CharaConsist's), so 20-step toy runs and 28-step FLUX runs put them at
  the same fraction of the run (the official code uses 5 and 20 whatever the step count).
- *Seeding.* Every image starts from its own noise (one generator for the identity batch, continued by the
  frames): ``seeding = "per_image"``; the pipeline spreads one seed that way (``seeds.story_seeds``: the identity
  keeps it, each frame gets its own), the toy benchmark too.

Port to FLUX (documented departures):
- *Where.* FLUX has no separate self-attention: its joint attention over [text; image] tokens is the
  self-attention. StoryDiffusion changes the self-attention of SDXL's decoder (up) blocks; the FLUX analogue is
  the 38 single-stream blocks, the second half of the network where the image stream is refined after the
  double blocks have mixed text and image, and where CharaConsist shares too (official CharaConsist code).
  ``blocks`` = "single" (default), "double" or "all". SDXL's two resolutions (``sa32``, ``sa64``) are one here.
- *Keys.* The sampled tokens are the other images' image keys *after* RoPE (their own positions), values as
  they are: the plain port that CharaConsist Sec. 3 calls inter-image attention. Text queries see no extra
  keys; image queries see their own text and image keys plus the shared ones.
- *Lockstep.* The frames read the identity images' keys of the same step and layer straight from the batch
  instead of the official per-step cache of their hidden states (the same values: the identity images never see
  a frame). Images of another size run in another forward pass and share only with images of their size (noted).
- *Randomness.* The draws come from CPU ``torch.Generator``s seeded from ``seed`` (default: the identity's seed),
  one per source image (its story index) and one for the skips, so a run is deterministic and an image's draws
  do not depend on which other images share its chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import QueryGroup, grouped_attention, row_bias
from ..engine import AttnCall, Run, Slot
from ..story import StoryImage
from .base import (
    BLOCKS,
    VOLATILE_BACKENDS,
    Method,
    check_config,
    mix_seed,
    rescale_step,
    use_volatile_backend,
    uses_block,
)

_DRAWS = 0x5D   # tag of the token-mask and skip draws' seeds


@dataclass
class StoryDiffusionConfig:
    """Consistent Self-Attention options; defaults from the official demo (see the module docstring)."""

    sample_rate: float = 0.5        # share of an identity image's tokens kept at a step (official sa32 / sa64)
    identities: int = 2             # official id_length: the first n images share among themselves, the other
                                    # frames only read them; 0 = every image of a chunk shares (Algorithm 1)
    share_start: int = 5            # first step of sampled sharing (official: cur_step < 5 runs without it)
    share_end: int | None = None    # first step without any sharing; None = to the end
    early_full_read: bool = True    # before share_start the frames see every token of the identity images (official)
    skip_switch: int = 20           # official: a shared call is skipped with p 0.3 before step 20, 0.1 from it
    skip_early: float = 0.3
    skip_late: float = 0.1
    blocks: str = "single"          # "single" | "double" | "all": FLUX blocks with consistent self-attention
    seed: int | None = None         # seed of the token masks and skips; None = the identity image's seed
    volatile_backend: str = "flash"  # SDPA kernels of the shared calls (the sample size changes every step):
                                     # "flash", or "default" (cuDNN on Hopper: a new plan per shape)
    schedule_steps: int | None = 50  # the step options are written for this many steps (the demo's) and rescaled
                                     # to num_inference_steps (None: use them as given)

    def __post_init__(self):
        check_config(self, ranges={"sample_rate": (0.0, 1.0), "share_start": (0, None), "identities": (0, None),
                                   "skip_switch": (0, None), "skip_early": (0.0, 1.0), "skip_late": (0.0, 1.0),
                                   "seed": (0, 2**63 - 1), "schedule_steps": (1, None)},
                     choices={"blocks": BLOCKS, "volatile_backend": VOLATILE_BACKENDS},
                     order=[("share_start", "share_end")],
                     steps={"share_start": False, "share_end": False, "skip_switch": False})


def sample_tokens(num_tokens: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """RandSample of Algorithm 1 for one other image: indices of the tokens kept, each with probability ``rate``.

    Returns a sorted (M,) long tensor, M ~ Binomial(num_tokens, rate); rate 0 keeps none, rate 1 keeps all.
    """
    keep = torch.rand(num_tokens, generator=generator) < rate
    return keep.nonzero(as_tuple=True)[0]


def shared_layers(num_layers: int, skip: float, generator: torch.Generator) -> torch.Tensor:
    """The official random skip for one step: (num_layers,) bool, True where the layer call shares (probability
    1 - ``skip``), False where it runs plain attention for every image of the call."""
    return torch.rand(num_layers, generator=generator) >= skip


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


def step_schedule(config: StoryDiffusionConfig, num_steps: int) -> dict[str, int]:
    """The step options for ``num_steps`` steps: ``round(v * num_steps / schedule_steps)``; ``share_end`` None is
    the end of the run."""
    def scaled(v: int) -> int:
        return rescale_step(v, num_steps, config.schedule_steps)

    end = num_steps if config.share_end is None else min(scaled(config.share_end), num_steps)
    return {"share_start": scaled(config.share_start), "share_end": end, "skip_switch": scaled(config.skip_switch)}


class StoryDiffusion(Method):
    """Consistent Self-Attention: each image also attends to randomly sampled tokens of the identity images."""

    name = "storydiffusion"
    Config = StoryDiffusionConfig
    seeding = "per_image"

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        return set(range(1, min(self.config.identities, len(images))))

    def settings(self) -> dict:
        out = super().settings()
        if getattr(self, "schedule", None):
            out["effective_schedule"] = dict(self.schedule)
        return out

    def _reader(self, s: Slot) -> bool:
        """A frame that reads the identity images (official "read" mode) rather than one of them."""
        return 0 < self.config.identities <= s.story_index

    def start(self, run: Run) -> None:
        cfg = self.config
        use_volatile_backend(run, cfg.volatile_backend)
        self.schedule = step_schedule(cfg, run.num_steps)
        identity = next(s for s in run.slots if s.story_index == 0)
        base = cfg.seed if cfg.seed is not None else (identity.seed or 0)
        # tagged with _DRAWS so that no draw shares a seed with an image's noise (story_seeds: mix_seed(seed, k))
        self.gens = {s.pos: torch.Generator("cpu").manual_seed(mix_seed(base, _DRAWS, 1, s.story_index))
                     for s in run.slots}
        self.skip_gen = torch.Generator("cpu").manual_seed(mix_seed(base, _DRAWS, 2))
        self.sources: dict[int, list[int]] = {}
        grid_of = {s.pos: s.grid for s in run.slots}
        for s in run.slots:
            src = sharing_sources(run.slots, s.pos, cfg.identities)
            same = [p for p in src if grid_of[p] == s.grid]
            if len(same) < len(src):
                run.note(s.pos, "some images have another size: tokens shared only with images of the same size")
            self.sources[s.pos] = same
        frames = sorted(run.slots[p].story_index for p in self.sources[identity.pos])
        sampled = (self.schedule["share_start"] < self.schedule["share_end"] and cfg.sample_rate > 0
                   and min(cfg.skip_early, cfg.skip_late) < 1)
        if frames and sampled:
            which = "every frame of its chunk" if cfg.identities == 0 else f"frame(s) {frames}"
            run.note(identity.pos, f"StoryDiffusion: the identity image shares with {which} (the first "
                                   f"identities={cfg.identities} images share among themselves, as the official "
                                   "identity images do); identities=1 keeps it independent of the frames")
        self.readers = {s.pos for s in run.slots if self._reader(s)}
        self.sources_all = sorted({p for src in self.sources.values() for p in src})

    def begin_step(self, run: Run) -> None:
        cfg, sch, step = self.config, self.schedule, run.step
        self.mode = None                      # None: plain; "read": early full read; "sample": sampled sharing
        if run.phase.final and step < sch["share_end"]:
            if step < sch["share_start"]:
                self.mode = "read" if cfg.early_full_read and self.readers else None
            else:
                self.mode = "sample"
        if self.mode == "sample":            # one mask per source image and one skip per layer, for the whole step
            self.keep = {p: sample_tokens(run.slots[p].num_tokens, cfg.sample_rate, self.gens[p])
                         for p in self.sources_all}
            skip = cfg.skip_early if step < sch["skip_switch"] else cfg.skip_late
            self.shared = shared_layers(run.num_double_blocks + run.num_single_blocks, skip, self.skip_gen)
        run.volatile = self.mode == "sample"

    def attention(self, call: AttnCall) -> torch.Tensor:
        if self.mode is None or not uses_block(self.config.blocks, call.kind):
            return call.plain()
        run = call.run
        if self.mode == "sample" and not bool(self.shared[call.block + (run.num_double_blocks
                                                                          if call.kind == "single" else 0)]):
            return call.plain()                # the official random skip: plain attention for every image
        group, T = run.group, call.text_len
        device, S = call.query.device, call.query.shape[1]
        plans = {}
        for row, s in enumerate(group.slots):
            if self.mode == "read" and s.pos not in self.readers:
                continue                       # identity images attend plainly in the first steps
            extra_k, extra_v = [], []
            for src in self.sources[s.pos]:
                src_row = group.row_of(src)
                if src_row is None:
                    continue
                if self.mode == "read":
                    idx = torch.arange(T, S, device=device)
                else:
                    idx = T + self.keep[src].to(device)
                if idx.numel():
                    extra_k.append(call.k_rot[src_row].index_select(0, idx))
                    extra_v.append(call.value[src_row].index_select(0, idx))
            if extra_k:
                plans[row] = [QueryGroup(torch.arange(T, device=device)),
                              QueryGroup(torch.arange(T, S, device=device), torch.cat(extra_k), torch.cat(extra_v))]
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
        out[idx] = call.own(idx).flatten(2, 3).to(out.dtype)
    for row, groups in plans.items():
        q = call.q_rot[row] if queries is None or row not in queries else queries[row]
        res = grouped_attention(q, call.k_rot[row], call.value[row], groups, attend=call.attend,
                                bias=row_bias(call, row))
        out[row] = res.flatten(1, 2).to(out.dtype)
    return out
