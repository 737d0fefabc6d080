"""ConsiStory (Tewel et al., SIGGRAPH 2024, arXiv 2402.03286) on FLUX.1, in the lockstep engine.

ConsiStory makes the subject of a batch of images consistent without training, on SDXL. Its components, their
sections, the official files they follow (NVlabs/consistory: ``consistory_run.py``, ``consistory_pipeline.py``,
``attention_processor.py``, ``consistory_utils.py``, ``utils/ptp_utils.py``) and how each is ported to FLUX:

1. Subject masks (Sec. 3.1 "subject localization"): the cross-attention maps of the subject tokens, averaged
   over heads, layers and **the last 20 recorded steps** (``AttentionStore.aggregate_last_steps_attention``,
   ``x[-20:]`` of every layer's maps, recomputed after every step), thresholded with Otsu's method. On FLUX there
   is no cross-attention layer: the image-query x text-key block of the joint attention is the cross-attention.
   Subject tokens = the T5 tokens of the prompt's character field; softmax over the real text tokens (padding
   excluded), scaled q.k/sqrt(d), averaged over heads and the single blocks of a step (``subject_attention``),
   then over the last ``mask_window`` steps of the pass (``window_map``) and Otsu-thresholded (``subject_mask``).
   A step's mask is used from the next step on, as officially (the store aggregates after the step): step 0 has
   no mask and no sharing (official shared attention on steps 1..n).
2. Subject-driven shared attention, SDSA (Sec. 3.1): image i's queries attend to their own keys and to the
   *subject* keys of the other images (or of the anchors). On FLUX the other images' image keys are taken after
   RoPE (their own positions) with their values; text queries see no extra keys. Applied in the single-stream
   blocks (``blocks="single"``): ConsiStory extends the self-attention of SDXL's decoder (up) blocks only
   (``extend_kv_unet_parts=['up']``); the single blocks are FLUX's second half, where CharaConsist shares too.
   Shared attention via ``attention.grouped_attention`` (per-query-group extra keys, no dense mask).
3. Attention dropout (Sec. 3.2): each image's subject mask loses each patch with probability ``dropout`` = 0.5
   (``mask_dropout``) once per step, and every image that reads it sees the same dropped mask
   (``last_mask_dropout``, drawn with the masks). Here: one draw per source image and step, shared by all its
   receivers, from a CPU generator per image (seeded from ``seed`` or the image's seed and its story index)
   restarted at each pass, as the official store reseeds (``torch.manual_seed(0)``) for each pass.
4. Vanilla query blending (Sec. 3.2): on steps 0..n//10 the official pipeline first runs a plain forward on the
   *current* latents and caches its queries (``QueryStore``, mode 'cache'), then the SDSA forward blends them
   into the queries of the shared layers, ``q = s_t q_vanilla + (1 - s_t) q``, ``s_t`` = linspace(0.9,
   0.81836735) over those steps (``query_store_kwargs``; the paper says 0.8); blending acts only where SDSA acts
   (steps >= 1). Here the engine's vanilla twins **follow** the images (``twins_follow``): at every blending step
   they restart from the images' current latents, so in the same batch they are that plain forward, with no
   extra pass and no cache. Only image queries are blended (text queries see no shared keys), and only of images
   that receive shared keys: an image that never receives stays a plain forward, where blending changes nothing.
5. Correspondence-based feature injection (Sec. 3.3, ``FeatureInjector.inject_outputs``): every subject patch's
   self-attention output is blended toward its nearest neighbour among the subject patches of the other images /
   anchors, ``x_i = (1 - a) x_i + a x_nn(i)``, a = 0.8, on steps n//10..n//3 inclusive (``inject_range_alpha``),
   the nearest neighbour over all source images ('min' strategy), kept when its distance passes Otsu's threshold
   over the image's nearest-neighbour distances (``dist_thr='dynamic'``) and the patch is in the image's subject
   mask. The official injector updates the batch **in place**, image by image: an image reads the already
   injected outputs of the images before it (and frames read the anchors' injected outputs in the cached-anchor
   mode too); ``inject_in_order`` does the same. The correspondences come from a first ConsiStory pass (SDSA, no
   injection): official ``run_batch_generation`` runs it to the end and takes the DIFT features at t=261 (DDIM
   step 36 of 50) and the pass's final masks (``last_mask``). ``feature_pass="full"`` (default) does that;
   ``"short"`` stops the pass at the feature step and uses that step's masks (n - 37 steps fewer, a departure).
   Features: ConsiStory uses DIFT (SDXL decoder features); on FLUX block outputs give degenerate matches and
   single-layer attention outputs unstable ones (CharaConsist paper, Sec. 3.1), so we use the cosine
   similarity of the single blocks' attention outputs (before the output projection) averaged over the blocks,
   CharaConsist's S_t. Injection acts on the attention output before the output projection: the projection is
   affine and the blend weights sum to 1, so blending before or after it is the same.
6. Anchors (Sec. 3.4): with ``anchors=n`` (``n_achors=2``) every image shares with (and injects from) the
   first n images of the story, and the anchors share among themselves (``create_anchor_mapping``; the cached
   mode generates them together): **the identity is changed by frame 1**, as officially, and ``out.notes`` says
   so; ``anchors=1`` keeps the identity independent of the frames. The anchors are in every chunk and never see a
   frame, so frames can be added to existing anchors later and long stories run in chunks. ``anchors=0``: every
   image shares with every other image of its chunk (the store's default mapping).
7. Seeding: every image starts from its own noise (``create_latents``, ``same_latent=False``): ``seeding =
   "per_image"``; the pipeline spreads one seed that way (``seeds.story_seeds``: the identity keeps it, each frame
   gets its own), the toy benchmark too. A list with one seed repeated is ``same_latent=True``.
8. Steps: the step options are written for the official 50 steps and rescaled to the step count
   (``schedule_steps``, as CharaConsist's): the official ranges scale with n too (n//10, n//3), except the
   20-step mask window and the DIFT timestep t=261, which the official code keeps fixed (and which is not on
   every DDIM schedule: at 20 or 25 steps the official first pass never records it).

Departures, forced by the engine or FLUX: images of another size run in another forward pass and share only
with images of their size (noted); an image whose character tokens fall beyond ``max_sequence_length`` has no
subject mask (noted): its patches are not shared and it gets no feature injection (it still sees the others').
Cost: the features pass adds n steps (``"short"``: round(0.72 n) + 1), as the official code's first pass; the
twins add n//10 + 1 steps of a second batch row per image, as the official plain query forwards.
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
from .base import BLOCKS, VOLATILE_BACKENDS, Method, check_config, rescale_step, use_volatile_backend, uses_block
from .storydiffusion import attend_rows, image_generator, sharing_sources

FEATURE_PASSES = ("full", "short")


@dataclass
class ConsiStoryConfig:
    """ConsiStory options; defaults from the official release (see the module docstring), step options for 50 steps."""

    anchors: int = 2                    # official n_achors; 0 = every image shares with every other of its chunk
    sdsa: bool = True                   # subject-driven shared attention
    share_start: int = 1                # first shared step (official t_range (1, n_steps))
    share_end: int | None = None        # first step without sharing; None = to the end
    mask_window: int = 20               # subject maps averaged over the last 20 steps (official x[-20:])
    dropout: float = 0.5                # attention dropout on the shared subject patches (official mask_dropout)
    query_blending: bool = True         # vanilla query blending
    blend_steps: int = 6                # steps 0..5 with the vanilla forward (official t_range [0, n//10])
    blend_start: float = 0.9
    blend_end: float = 0.81836735       # official strength_end (the paper: 0.8)
    injection: bool = True              # correspondence-based feature injection (adds the "features" pass)
    inject_alpha: float = 0.8
    inject_start: int = 5               # official n//10
    inject_end: int = 16                # last injected step, inclusive (official n//3)
    inject_threshold: float | None = None   # min cosine similarity; None = Otsu over the image's NN similarities
    feature_step: int = 36              # step of the correspondence features (official DIFT t=261: step 36 of 50)
    feature_pass: str = "full"          # "full": the features pass runs to the end and its final masks select the
                                        # correspondences (official); "short": it stops at feature_step
    blocks: str = "single"              # FLUX blocks of SDSA, blending, injection, masks and features
    seed: int | None = None             # seed of the dropout draws; None = each image's own seed
    volatile_backend: str = "flash"     # SDPA kernels of the shared calls (masks and dropout change every
                                        # step): "flash", or "default" (cuDNN on Hopper: a new plan per shape)
    schedule_steps: int | None = 50     # the step options are written for this many steps (the official) and
                                        # rescaled to num_inference_steps (None: use them as given)

    def __post_init__(self):
        check_config(self, ranges={"anchors": (0, None), "share_start": (0, None), "dropout": (0.0, 1.0),
                                   "blend_steps": (0, None), "blend_start": (0.0, 1.0), "blend_end": (0.0, 1.0),
                                   "inject_alpha": (0.0, 1.0), "inject_start": (0, None),
                                   "inject_threshold": (-1.0, 1.0),
                                   "feature_step": (0, None), "mask_window": (1, None),
                                   "seed": (0, 2**63 - 1), "schedule_steps": (1, None)},
                     choices={"blocks": BLOCKS, "volatile_backend": VOLATILE_BACKENDS,
                              "feature_pass": FEATURE_PASSES},
                     order=[("share_start", "share_end"), ("inject_start", "inject_end")],
                     steps={"share_start": False, "share_end": False, "mask_window": False, "blend_steps": False,
                            "inject_start": True, "inject_end": True, "feature_step": True})


def step_schedule(config: ConsiStoryConfig, num_steps: int) -> dict[str, int]:
    """The step options for ``num_steps`` steps: ``round(v * num_steps / schedule_steps)``.

    Sharing never starts at step 0 (no mask yet); ``blend_steps`` counts steps from 0, so its last step is the one
    rescaled (official [0, n//10], inclusive); the mask window keeps at least one step; the feature step stays
    inside the run.
    """
    def scaled(v: int) -> int:
        return rescale_step(v, num_steps, config.schedule_steps)

    start = scaled(config.share_start)
    return {
        "share_start": max(start, 1) if config.share_start >= 1 else start,
        "share_end": num_steps if config.share_end is None else min(scaled(config.share_end), num_steps),
        "mask_window": max(scaled(config.mask_window), 1),
        "blend_steps": scaled(config.blend_steps - 1) + 1 if config.blend_steps > 0 else 0,
        "inject_start": scaled(config.inject_start),
        "inject_end": scaled(config.inject_end),
        "feature_step": max(0, min(scaled(config.feature_step), num_steps - 1)),
    }


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


def window_map(history: list[torch.Tensor], window: int) -> torch.Tensor:
    """The subject map of the last ``window`` steps (Sec. 3.1; official ``aggregate_last_steps_attention``, which
    averages every layer's maps of the last 20 steps): the mean of the last ``window`` per-step maps."""
    return torch.stack(history[-window:]).mean(dim=0)


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


def inject_in_order(feats: torch.Tensor, pairs: dict[int, dict[int, tuple]], alpha: float) -> None:
    """Feature injection over a batch, in place and image by image in row order (official
    ``FeatureInjector.inject_outputs``: the batch tensor is updated while it is read), so an image reads the
    already injected outputs of the sources before it.

    ``feats``: (B, N, C) image-token outputs of the batch; ``pairs[row]``: {source row: (target_idx, source_idx,
    sim)} as :func:`nearest_subject_patches` gives them.
    """
    for row in sorted(pairs):
        sources = {src: feats[src] for src in pairs[row]}
        feats[row] = inject_features(feats[row], sources, pairs[row], alpha)


# ---------------------------------------------------------------------------------------------- the method
class ConsiStory(Method):
    """Subject-driven shared attention + dropout + vanilla query blending + feature injection, with anchors."""

    name = "consistory"
    Config = ConsiStoryConfig
    seeding = "per_image"

    # ------------------------------------------------------------------ schedule
    def _blending(self) -> bool:
        return self.config.query_blending and self.config.sdsa

    def _injecting(self) -> bool:
        return self.config.injection and self.config.inject_alpha > 0

    def phases(self, num_steps: int) -> list[Phase]:
        if not self._injecting():
            return [Phase("main", num_steps, final=True)]
        steps = num_steps if self.config.feature_pass == "full" else step_schedule(self.config, num_steps)[
            "feature_step"] + 1
        return [Phase("features", steps, final=False), Phase("main", num_steps, final=True)]

    def twin_steps(self, phase: Phase) -> int:
        return self.schedule["blend_steps"] if self._blending() else 0

    def twins_follow(self, phase: Phase) -> bool:
        return True     # the vanilla queries come from a plain forward on the current latents (official)

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        return set(range(1, min(self.config.anchors, len(images))))

    def settings(self) -> dict:
        out = super().settings()
        if getattr(self, "schedule", None):
            out["effective_schedule"] = dict(self.schedule)
        return out

    # ------------------------------------------------------------------ state
    def start(self, run: Run) -> None:
        cfg = self.config
        use_volatile_backend(run, cfg.volatile_backend)
        self.schedule = step_schedule(cfg, run.num_steps)
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
        identity = next(s for s in run.slots if s.story_index == 0)
        frames = sorted(run.slots[p].story_index for p in self.sources[identity.pos])
        if frames and (cfg.sdsa or self._injecting()):
            which = "every frame of its chunk" if cfg.anchors == 0 else f"frame(s) {frames}"
            run.note(identity.pos, f"ConsiStory: the identity shares the subject of {which} (anchors={cfg.anchors}: "
                                   "the anchors share among themselves, as officially); anchors=1 keeps it "
                                   "independent of the frames")
        self.masks: dict[int, torch.Tensor] = {}
        self.pairs: dict[int, dict] = {}

    def begin_step(self, run: Run) -> None:
        cfg, sch, step, phase = self.config, self.schedule, run.step, run.phase
        if step == phase.start:   # a new pass: its own masks and mask history, its dropout draws from the start
            self.masks, self.history = {}, {}
            self.gens = {s.pos: image_generator(cfg.seed if cfg.seed is not None else s.seed, s.story_index)
                         for s in run.slots}
        self.sharing = cfg.sdsa and sch["share_start"] <= step < sch["share_end"] and bool(self.masks)
        run.volatile = self.sharing
        blend = self._blending() and self.sharing
        self.strength = blend_strength(step, sch["blend_steps"], cfg.blend_start, cfg.blend_end) if blend else 0.0
        self.inject = (phase.final and self._injecting() and sch["inject_start"] <= step <= sch["inject_end"]
                       and bool(self.pairs))
        self.collect_features = not phase.final and step == sch["feature_step"]
        self.correspond = not phase.final and step == phase.steps - 1
        self.acc_map: dict[int, list] = {}
        if self.collect_features:
            self.acc_sim: dict[tuple[int, int], torch.Tensor] = {}
            self.num_sim: dict[tuple[int, int], int] = {}
        self.keep: dict[int, torch.Tensor] = {}
        if self.sharing:   # attention dropout: one draw per source image and step, read by all its receivers
            for s in run.slots:
                self.keep[s.pos] = dropout_keep(s.num_tokens, cfg.dropout, self.gens[s.pos])

    def end_step(self, run: Run) -> None:
        new = {}
        for s in run.slots:
            if s.char_len == 0 or s.pos not in self.acc_map:
                continue
            total, count = self.acc_map[s.pos]
            history = self.history.setdefault(s.pos, [])
            history.append(total / count)
            del history[:-self.schedule["mask_window"]]
            mask = subject_mask(window_map(history, self.schedule["mask_window"])).cpu()
            if not bool(mask.any()):
                run.note(s.pos, f"{run.phase.name} pass: subject mask empty at some step(s), nothing shared then")
            new[s.pos] = mask
        self.masks = new
        if self.correspond:
            self._correspondences(run)

    def _correspondences(self, run: Run) -> None:
        """Nearest subject patches from the block-averaged attention-output similarities of the features step,
        within the subject masks the features pass has now (its last step's, or the features step's)."""
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
                    idx = (self.masks[src] & self.keep[src]).nonzero(as_tuple=True)[0].to(device)
                    extra_k.append(call.k_rot[src_row, T:].index_select(0, idx))
                    extra_v.append(call.value[src_row, T:].index_select(0, idx))
                if extra_k:
                    plans[row] = [QueryGroup(torch.arange(T, device=device)),
                                  QueryGroup(torch.arange(T, S, device=device), torch.cat(extra_k),
                                             torch.cat(extra_v))]
                twin = group.twin_row(s.pos)
                if self.strength > 0 and twin is not None and self.sources[s.pos]:
                    q = call.q_rot[row].clone()
                    q[T:] = blend_queries(q[T:], call.q_rot[twin, T:], self.strength)
                    queries[row] = q
                    plans.setdefault(row, [QueryGroup(torch.arange(S, device=device))])
        out = attend_rows(call, plans, queries)

        for row, s in enumerate(group.slots):   # rows len(slots).. are vanilla twins: plain, never measured
            if s.char_len > 0:
                m = subject_attention(call.q_rot[row, T:], call.k_rot[row, :T], s.bg_len, s.bg_len + s.char_len,
                                      s.real_len)
                acc = self.acc_map.setdefault(s.pos, [torch.zeros_like(m), 0])
                acc[0] += m
                acc[1] += 1
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
            pairs = {}
            for row, s in enumerate(group.slots):
                mine = {group.row_of(src): tuple(t.to(device) for t in p)
                        for src, p in self.pairs.get(s.pos, {}).items() if group.row_of(src) is not None}
                if mine:
                    pairs[row] = mine
            inject_in_order(out[:, T:], pairs, self.config.inject_alpha)
        return out
