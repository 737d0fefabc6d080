"""ConsiStory (Tewel et al., SIGGRAPH 2024, arXiv 2402.03286; seed 003) on FLUX.1, in the lockstep engine.

ConsiStory makes the subject of a batch of images consistent without training, on SDXL. Its components, their
equations / sections, and how each is ported to FLUX's joint attention:

1. Subject masks (Sec. 3.1 "subject localization"): the cross-attention maps of the subject tokens, averaged
   over heads and layers, thresholded with Otsu's method. On FLUX there is no cross-attention layer: the
   image-query x text-key block of the joint attention is the cross-attention. Subject tokens = the T5 tokens
   of the prompt's character field; softmax over the real text tokens (padding excluded), scaled q.k/sqrt(d)
   (true attention weights), averaged over heads and over the single blocks of one step
   (``subject_attention``, ``subject_mask``). A step's mask is used from the next step on: step 0 has no mask
   and no sharing, which is also the official schedule (shared attention on steps 1..n-1).
2. Subject-driven shared attention, SDSA (Sec. 3.1, the extended self-attention with mask M_i^+): image i's
   queries attend to their own keys and to the *subject* keys of the other images (or of the anchors). On
   FLUX the other images' image keys are taken after RoPE (their own positions) with their values; text queries
   see no extra keys. Applied in the single-stream blocks (``blocks="single"``): ConsiStory extends the
   self-attention of SDXL's decoder (up) blocks only (official ``extend_kv_unet_parts=['up']``); the single
   blocks are FLUX's second half, where CharaConsist shares too (seed 002). Shared attention via
   ``attention.grouped_attention`` (per-query-group extra keys, no dense mask).
3. Attention dropout (Sec. 3.2 "enriching layout diversity"): each shared subject patch is dropped with
   probability ``dropout`` = 0.5 (official ``mask_dropout``), drawn once per step for every (image, source image)
   pair from a CPU generator per image (seeded from ``seed`` or the image's seed and its story index).
4. Vanilla query blending (Sec. 3.2): in the first steps the queries of the shared layers are blended with the
   queries of a plain (vanilla) generation from the same noise, at the same step and layer:
   ``q = s_t q_vanilla + (1 - s_t) q``, ``s_t`` falling linearly from 0.9 to 0.8 over steps 0..n//10 (official
   ``t_range=[0, n//10]``, start 0.9; the official end value is 0.818, the paper's description 0.8, taken
   here). The vanilla queries come from the engine's vanilla twins (plain copies in the same batch), so no
   separate vanilla pass and no cache. Only image queries are blended (text queries see no shared keys).
5. Correspondence-based feature injection (Sec. 3.3): every subject patch's self-attention output is blended
   toward its nearest neighbour among the subject patches of the other images / anchors,
   ``x_i = (1 - a) x_i + a x_nn(i)``, a = 0.8, on steps n//10..n//3 (official ``inject_range_alpha``), the
   nearest neighbour taken over all source images ('min' strategy), kept only when its similarity passes
   Otsu's threshold over the image's nearest-neighbour similarities (official ``dist_thr='dynamic'`` = Otsu on
   the distances) and the patch is in the image's subject mask. As in the official code the correspondences
   come from a first ConsiStory pass (SDSA, no injection) that stops at the feature step, here
   round(0.72 n) (DIFT features at t=261 = DDIM step 36 of 50), followed by the real pass with injection
   (phases "features" and "main"). Features: ConsiStory uses DIFT (SDXL decoder features); on FLUX, block
   outputs give degenerate matches and single-layer attention outputs unstable ones (CharaConsist Sec. 3.1,
   seed 002), so we use the cosine similarity of the single blocks' attention outputs (before the output
   projection) averaged over the blocks, CharaConsist's S_t. Injection acts on the attention output before the
   output projection: the projection is affine, so blending before or after it is the same.
6. Anchors (Sec. 3.4 "anchor images and reusable subjects"): with ``anchors=n`` (official ``n_achors=2``) the
   first n images of the story share only among themselves and every other image shares with (and injects
   from) the anchors only. The anchors are in every chunk and never see a frame, so they come out the same
   whatever frames run with them: frames can be added to existing anchors later (the extension mode) and long
   stories run in chunks. ``anchors=0``: every image shares with every other image of its chunk.

Departures, forced by the engine or FLUX: images of another size run in another forward pass and share only
with images of their size (noted); an image whose character tokens fall beyond ``max_sequence_length`` has no
subject mask (noted): its patches are not shared and it gets no feature injection (it still sees the others').
Cost: the features pre-pass adds round(0.72 n) + 1 steps (the official code runs two full passes), the twins
add n//10 + 1 steps of a second batch row per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import QueryGroup
from ..engine import AttnCall, Phase, Run
from ..mask import otsu_threshold
from ..match import cosine_similarity_matrix
from ..merge import merge_tokens
from ..story import StoryImage
from .base import BLOCKS, VOLATILE_BACKENDS, Method, check_config, use_volatile_backend, uses_block
from .storydiffusion import attend_rows, image_generator, sharing_sources


@dataclass
class ConsiStoryConfig:
    """ConsiStory options; defaults from the paper and the official release (see the module docstring)."""

    anchors: int = 2                    # official n_achors; 0 = every image shares with every other of its chunk
    sdsa: bool = True                   # subject-driven shared attention
    share_start: int = 1                # first shared step (official t_range (1, n_steps))
    share_end: int | None = None        # first step without sharing; None = to the end
    dropout: float = 0.5                # attention dropout on the shared subject patches (official mask_dropout)
    query_blending: bool = True         # vanilla query blending
    blend_steps: int | None = None      # steps with blending; None = num_steps // 10 + 1 (official [0, n//10])
    blend_start: float = 0.9
    blend_end: float = 0.8
    injection: bool = True              # correspondence-based feature injection (adds the "features" pre-pass)
    inject_alpha: float = 0.8
    inject_start: int | None = None     # None = num_steps // 10
    inject_end: int | None = None       # last injected step, inclusive; None = num_steps // 3
    inject_threshold: float | None = None   # min cosine similarity; None = Otsu over the image's NN similarities
    feature_step: int | None = None     # step of the correspondence features; None = round(0.72 * num_steps)
    blocks: str = "single"              # FLUX blocks of SDSA, blending, injection, masks and features
    seed: int | None = None             # seed of the dropout draws; None = each image's own seed
    volatile_backend: str = "flash"     # SDPA kernels of the shared calls (masks and dropout change every
                                        # step): "flash", or "default" (cuDNN on Hopper: a new plan per shape)

    def __post_init__(self):
        check_config(self, ranges={"anchors": (0, None), "share_start": (0, None), "dropout": (0.0, 1.0),
                                   "blend_steps": (0, None), "blend_start": (0.0, 1.0), "blend_end": (0.0, 1.0),
                                   "inject_alpha": (0.0, 1.0), "inject_start": (0, None),
                                   "feature_step": (0, None),
                                   "seed": (0, 2**63 - 1)},
                     choices={"blocks": BLOCKS, "volatile_backend": VOLATILE_BACKENDS},
                     order=[("share_start", "share_end"), ("inject_start", "inject_end")])


# ---------------------------------------------------------------------------------------------- pure functions
def subject_attention(q_img: torch.Tensor, k_txt: torch.Tensor, start: int, end: int, real_len: int) -> torch.Tensor:
    """Cross-attention map of the subject tokens (Sec. 3.1): for each image token, the mean attention weight on
    text tokens [start, end), softmax of q.k/sqrt(d) over the ``real_len`` real text tokens, mean over heads.

    ``q_img``: (N, H, D) image queries, ``k_txt``: (T, H, D) text keys (both after RoPE). Returns (N,) float32.
    """
    q = q_img.float().transpose(0, 1)                         # (H, N, D)
    k = k_txt[:real_len].float().transpose(0, 1)              # (H, R, D)
    probs = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(dim=-1)
    return probs[:, :, start:end].mean(dim=(0, 2))


def subject_mask(attn_map: torch.Tensor) -> torch.Tensor:
    """Subject patches: the map above its Otsu threshold (Sec. 3.1). A constant map gives an empty mask."""
    return attn_map > otsu_threshold(attn_map)


def dropout_keep(num_tokens: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Attention dropout (Sec. 3.2): a (N,) bool mask keeping each shared patch with probability 1 - p."""
    return torch.rand(num_tokens, generator=generator) >= p


def blend_strength(step: int, blend_steps: int, start: float = 0.9, end: float = 0.8) -> float:
    """Vanilla query blending strength s_t (Sec. 3.2): linear from ``start`` at step 0 to ``end`` at step
    ``blend_steps - 1``; 0 from ``blend_steps`` on."""
    if step < 0 or step >= blend_steps:
        return 0.0
    if blend_steps == 1:
        return start
    return start + (end - start) * step / (blend_steps - 1)


def blend_queries(q: torch.Tensor, q_vanilla: torch.Tensor, strength: float) -> torch.Tensor:
    """``s q_vanilla + (1 - s) q`` (Sec. 3.2)."""
    return strength * q_vanilla + (1.0 - strength) * q


def nearest_subject_patches(sims: dict[int, torch.Tensor], source_masks: dict[int, torch.Tensor],
                            target_mask: torch.Tensor, threshold: float | None = None
                            ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Correspondences of feature injection (Sec. 3.3): each target patch's nearest subject patch over all
    source images ('min' strategy of the official code, here max similarity).

    ``sims[src]``: (N, M_src) similarities of the target's patches to source ``src``'s patches;
    ``source_masks[src]``: (M_src,) subject masks; ``target_mask``: (N,). A pair is kept when the target patch is
    in its subject mask and its best similarity exceeds ``threshold`` (None: Otsu over the best similarities of
    all target patches, the official dynamic threshold). Returns per source: (target_idx, source_idx, sim).
    """
    best, arg, which = None, None, None
    for k, (src, sim) in enumerate(sorted(sims.items())):
        s = sim.float().masked_fill(~source_masks[src].to(sim.device), float("-inf"))
        b, a = s.max(dim=1)
        if best is None:
            best, arg, which = b, a, torch.zeros_like(a)
        else:
            better = b > best
            best, arg = torch.where(better, b, best), torch.where(better, a, arg)
            which = torch.where(better, torch.full_like(which, k), which)
    if best is None:
        return {}
    finite = torch.isfinite(best)
    if threshold is None:
        threshold = otsu_threshold(best[finite]) if bool(finite.any()) else 0.0
    keep = target_mask.to(best.device) & finite & (best > threshold)
    out = {}
    for k, src in enumerate(sorted(sims)):
        tgt = (keep & (which == k)).nonzero(as_tuple=True)[0]
        if tgt.numel():
            out[src] = (tgt, arg[tgt], best[tgt])
    return out


def inject_features(out: torch.Tensor, sources: dict[int, torch.Tensor],
                    pairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], alpha: float) -> torch.Tensor:
    """Feature injection (Sec. 3.3): ``x_i = (1 - a) x_i + a x_src[nn(i)]`` for each kept pair.

    ``out``: (N, C) target image-token outputs; ``sources[src]``: (M, C) the source's outputs (before any
    injection of this layer). Returns a new (N, C) tensor.
    """
    for src, (tgt, idx, _) in pairs.items():
        a = torch.full((tgt.numel(),), alpha, device=out.device)
        out = merge_tokens(out, sources[src], tgt, idx, a)
    return out


# ---------------------------------------------------------------------------------------------- the method
class ConsiStory(Method):
    """Subject-driven shared attention + dropout + vanilla query blending + feature injection, with anchors."""

    name = "consistory"
    Config = ConsiStoryConfig

    def __init__(self, **options):
        super().__init__(**options)

    # ------------------------------------------------------------------ schedule
    def _blend_steps(self, num_steps: int) -> int:
        cfg = self.config
        if not (cfg.query_blending and cfg.sdsa):
            return 0
        return num_steps // 10 + 1 if cfg.blend_steps is None else cfg.blend_steps

    def _feature_step(self, num_steps: int) -> int:
        fs = round(0.72 * num_steps) if self.config.feature_step is None else self.config.feature_step
        return max(0, min(fs, num_steps - 1))

    def _inject_range(self, num_steps: int) -> tuple[int, int]:
        cfg = self.config
        start = num_steps // 10 if cfg.inject_start is None else cfg.inject_start
        end = num_steps // 3 if cfg.inject_end is None else cfg.inject_end
        return start, end

    def _injecting(self) -> bool:
        return self.config.injection and self.config.inject_alpha > 0

    def phases(self, num_steps: int) -> list[Phase]:
        first = [Phase("features", self._feature_step(num_steps) + 1, final=False)] if self._injecting() else []
        return first + [Phase("main", num_steps, final=True)]

    def twin_steps(self, phase: Phase) -> int:
        return self._blend_steps(self._num_steps)

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        return set(range(1, min(self.config.anchors, len(images))))

    # ------------------------------------------------------------------ state
    def start(self, run: Run) -> None:
        cfg = self.config
        use_volatile_backend(run, cfg.volatile_backend)
        self._num_steps = run.num_steps
        self.gens = {s.pos: image_generator(cfg.seed if cfg.seed is not None else s.seed, s.story_index)
                     for s in run.slots}
        grid_of = {s.pos: s.grid for s in run.slots}
        self.sources: dict[int, list[int]] = {}
        for s in run.slots:
            src = sharing_sources(run.slots, s.pos, cfg.anchors)
            same = [p for p in src if grid_of[p] == s.grid]
            if len(same) < len(src):
                run.note(s.pos, "some images have another size: subject shared only with images of the same size")
            self.sources[s.pos] = same
            if s.char_len == 0:
                run.note(s.pos, "no character tokens within max_sequence_length: no subject mask; its patches are "
                                "not shared and it gets no feature injection")
        self.masks: dict[int, torch.Tensor] = {}
        self.pairs: dict[int, dict] = {}

    def begin_step(self, run: Run) -> None:
        cfg, step, phase = self.config, run.step, run.phase
        if step == 0:
            self.masks = {}
        end = run.num_steps if cfg.share_end is None else cfg.share_end
        self.sharing = cfg.sdsa and cfg.share_start <= step < end and bool(self.masks)
        run.volatile = self.sharing
        self.strength = blend_strength(step, self._blend_steps(run.num_steps), cfg.blend_start, cfg.blend_end)
        lo, hi = self._inject_range(run.num_steps)
        self.inject = phase.final and self._injecting() and lo <= step <= hi and bool(self.pairs)
        self.collect_features = not phase.final and step == phase.steps - 1
        self.acc_map: dict[int, torch.Tensor] = {}
        self.acc_sim: dict[tuple[int, int], torch.Tensor] = {}
        self.num_sim: dict[tuple[int, int], int] = {}
        self.keep: dict[tuple[int, int], torch.Tensor] = {}
        if self.sharing:   # attention dropout: one draw per (image, source) pair and step, in a fixed order
            for s in run.slots:
                for src in self.sources[s.pos]:
                    self.keep[(s.pos, src)] = dropout_keep(run.slots[src].num_tokens, cfg.dropout, self.gens[s.pos])

    def end_step(self, run: Run) -> None:
        new = {}
        for s in run.slots:
            if s.char_len == 0 or s.pos not in self.acc_map:
                continue
            mask = subject_mask(self.acc_map[s.pos]).cpu()
            if not bool(mask.any()):
                run.note(s.pos, f"{run.phase.name} pass: subject mask empty at some step(s), nothing shared then")
            new[s.pos] = mask
        self.masks = new
        if self.collect_features:
            self._correspondences(run)

    def _correspondences(self, run: Run) -> None:
        """Nearest subject patches from the block-averaged attention-output similarities of the pre-pass."""
        cfg = self.config
        self.pairs = {}
        for s in run.slots:
            if s.pos not in self.masks:
                continue
            sims = {src: self.acc_sim[(s.pos, src)] / self.num_sim[(s.pos, src)]
                    for src in self.sources[s.pos] if (s.pos, src) in self.acc_sim and src in self.masks}
            pairs = nearest_subject_patches(sims, {src: self.masks[src] for src in sims}, self.masks[s.pos],
                                            cfg.inject_threshold)
            if sims and not pairs:
                run.note(s.pos, "no correspondence passed the threshold: no feature injection")
            self.pairs[s.pos] = {src: tuple(t.cpu() for t in p) for src, p in pairs.items()}

    def results(self, run: Run) -> dict[int, dict]:
        return {s.pos: {"mask": self.masks[s.pos].reshape(s.grid).numpy() if s.pos in self.masks else None}
                for s in run.slots}

    # ------------------------------------------------------------------ attention
    def attention(self, call: AttnCall) -> torch.Tensor:
        if not uses_block(self.config.blocks, call.kind):
            return call.plain()
        run, T = call.run, call.text_len
        group = run.group
        device = call.query.device
        S = call.query.shape[1]
        plans, queries = {}, {}
        if self.sharing:
            for row, s in enumerate(group.slots):
                extra_k, extra_v = [], []
                for src in self.sources[s.pos]:
                    src_row = group.row_of(src)
                    if src_row is None or src not in self.masks:
                        continue
                    idx = (self.masks[src] & self.keep[(s.pos, src)]).nonzero(as_tuple=True)[0].to(device)
                    extra_k.append(call.k_rot[src_row, T:].index_select(0, idx))
                    extra_v.append(call.value[src_row, T:].index_select(0, idx))
                if not extra_k:
                    continue
                plans[row] = [QueryGroup(torch.arange(T, device=device)),
                              QueryGroup(torch.arange(T, S, device=device), torch.cat(extra_k), torch.cat(extra_v))]
                twin = group.twin_row(s.pos)
                if self.strength > 0 and twin is not None:
                    q = call.q_rot[row].clone()
                    q[T:] = blend_queries(q[T:], call.q_rot[twin, T:], self.strength)
                    queries[row] = q
        out = attend_rows(call, plans, queries)

        n = len(group.slots)   # rows n.. are vanilla twins: plain, never measured
        for row, s in enumerate(group.slots):
            if s.char_len > 0:
                m = subject_attention(call.q_rot[row, T:], call.k_rot[row, :T], s.bg_len, s.bg_len + s.char_len,
                                      s.real_len)
                self.acc_map[s.pos] = self.acc_map[s.pos] + m if s.pos in self.acc_map else m
            if self.collect_features:
                for src in self.sources[s.pos]:
                    src_row = group.row_of(src)
                    if src_row is None:
                        continue
                    sim = cosine_similarity_matrix(out[row, T:], out[src_row, T:])
                    key = (s.pos, src)
                    self.acc_sim[key] = self.acc_sim[key] + sim if key in self.acc_sim else sim
                    self.num_sim[key] = self.num_sim.get(key, 0) + 1
        if self.inject:
            before = {r: out[r, T:].clone() for r in range(n)}
            for row, s in enumerate(group.slots):
                pairs = self.pairs.get(s.pos)
                if not pairs:
                    continue
                pairs = {src: tuple(t.to(device) for t in p) for src, p in pairs.items()
                         if group.row_of(src) is not None}
                srcs = {src: before[group.row_of(src)] for src in pairs}
                out[row, T:] = inject_features(out[row, T:], srcs, pairs, self.config.inject_alpha)
        return out
