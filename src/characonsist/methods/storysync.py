"""StorySync (Gaur, Zolfaghari, Brox) in the lockstep engine, on FLUX.1's joint attention.

Components (paper equations) and where they act on FLUX:

- **Subject masks** (Eqs. 2-4 + Otsu): image-query x text-key attention of the joint attention (FLUX's
  image->text part is its cross-attention), softmax over the real T5 tokens with the 1/sqrt(d) of Eq. 2, summed
  over the subject tokens (the ``character`` field; Eq. 4), averaged over heads and over the ``mask_blocks``
  (single blocks by default, where the official CharaConsist code takes its FLUX masks from), then
  Otsu-thresholded (``mask.otsu_threshold``). The paper aggregates the current timestep only; in lockstep a
  step's map is complete only after the step, so the mask of step s is used at step s + 1 (hence sharing
  starts at step 1).
- **Masked cross-image attention sharing** (Eqs. 5-8): every image query of image i attends to its own joint
  keys (text + image) plus the subject keys of the other images of the batch (propagation mask Gamma_i of
  Eq. 5); text queries see no extra keys. Computed per image over its own keys concatenated with the gathered
  shared keys, through diffusers' attention dispatch (flash kernels apply), never a dense mask; the text
  queries of all sharing images go in one batched call. Shared keys keep their own RoPE positions (post-RoPE
  ``k_rot``), as StorySync does (re-encoding them is CharaConsist's contribution, not StorySync's).
  Default blocks: the single blocks (``share_blocks``); the double blocks run plainly, they lay out the image
  and FLUX's RoPE already pulls poses together when keys are shared (paper Sec. 4.1).
- **Regional Feature Harmonization** (Eqs. 9-11): the region features R are the attention outputs of the
  single blocks (before the output projection). DIFT-like block outputs do not give correspondences on FLUX,
  layer-averaged attention outputs do (CharaConsist, seeds 000/002), so by default the correspondence
  (Eq. 10, the argmax of Eq. 9's softmax = the argmax of the cosine similarity over the target's subject
  tokens Omega_j) comes from the single-block-averaged attention outputs of the previous step (lockstep, as the
  masks); ``rfh_features="layer"`` uses the current layer's outputs (the paper's real-time reading). Each
  single block's outputs are then pulled toward their correspondents by Eq. 11 with gamma = 0.3, restricted to
  subject tokens (M_i) and, with Otsu on the correspondence similarity, to well-matched tokens.
- **Base Layout Interpolation** (Eq. 12, lambda = 0.7): the engine's vanilla twins give the plain pass's
  activations at the same step and layer without a cache; the image-token attention outputs (the patch
  embeddings of the layer) are blended (1 - lambda) X_consist + lambda X_vanilla in the ``bli_blocks`` (all
  by default, as the paper blends in every self-attention layer) on steps < ``bli_end`` (10 of 50: the
  layout-forming steps, where the pose is decided; the paper leaves its "T steps" open). The twins run only
  for those steps, so the batch is doubled for the first fifth of the run only.
- **Dropouts** (Sec. 3.3): of the shared subject keys (per receiving image, source image, step and block),
  of RFH updates, and of the subject masks (per image and step). Seeded from the image seeds (or
  ``dropout_seed``), story index, step and block, so they do not depend on chunking. The paper gives no rates:
  shared-key dropout defaults to 0.5 (ConsiStory's attention dropout, the mechanism StorySync cites), the other
  two to 0.
- **Subset references** (Eq. 13): with ``num_references = K`` the first K story images (identity first) are
  the references: they share among themselves, every other image sees (and harmonizes toward) the references
  only. The references run in every chunk (``dependencies``), so long stories go in chunks of K + frames.

Chunks: with ``num_references = 0`` every image of a chunk shares with every other (the paper's batch), so the
way a long story is cut into chunks (``batch_size``) changes its frames; with ``num_references = K`` it does not.

The identity image: StorySync's algorithm shares across the whole batch (Eqs. 5-8), so with the default
``num_references = 0`` **the identity is changed by the frames**, and with K >= 2 by the other references;
``out.notes`` says so. ``num_references = 1`` keeps it independent of the frames.

Seeding: there is no official code; the paper generates a batch with one sampler call and says nothing of shared
noise, and a batch drawn from one generator gives every image its own noise (as ConsiStory's code, whose benchmark
StorySync uses): ``seeding = "per_image"``; the pipeline spreads one seed that way (``seeds.story_seeds``), the
toy benchmark too.

Steps: sharing and RFH on steps [``share_start``, ``share_end``) = 1-49 of 50 (the paper shares at every step;
step 0 has no mask yet). Step options are written for 50 steps and rescaled to the step count
(``schedule_steps``), as CharaConsist's are, so FLUX.1-schnell's 4 steps and the toy model's 20 get the same
fractions of the schedule.

Images of another size than the others run in another group: they share only within their own group; the
output notes an image that is left without anyone to share with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttendFn, sdpa_attend
from ..engine import AttnCall, Phase, Run, Slot
from ..mask import otsu_threshold
from ..match import Matches
from ..story import StoryImage
from .base import VOLATILE_BACKENDS, Method, check_config, mix_seed, use_volatile_backend, uses_block

BLOCKS = ("single", "double", "all")
FEATURES = ("averaged", "layer")


# ============================================================================ pure functions

def subject_attention(q_img: torch.Tensor, k_txt: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """Eqs. 2 and 4 for one layer: attention of every image token to the subject tokens, summed over them.

    ``q_img`` (B, N, H, D) image queries, ``k_txt`` (B, T, H, D) text keys, both after RoPE; ``spans[b]`` =
    (start, end, real_len) of image b. The softmax of Eq. 2 runs over the ``real_len`` real text tokens
    (padding and the end token excluded); the subject tokens are [start, end). All images in one batched
    product. Returns (B, N) float32, averaged over heads. (Eq. 3's layer average is the caller's.)
    """
    R = max(r for _, _, r in spans)
    q = q_img.float().transpose(1, 2)                                  # (B, H, N, D)
    k = k_txt[:, :R].float().transpose(1, 2)                           # (B, H, R, D)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])          # (B, H, N, R)
    pos = torch.arange(R, device=q.device)
    real = torch.stack([pos < r for _, _, r in spans])                 # (B, R)
    subject = torch.stack([(pos >= a) & (pos < e) for a, e, _ in spans]).float()
    probs = logits.masked_fill(~real[:, None, None], float("-inf")).softmax(dim=-1)
    return (probs * subject[:, None, None]).sum(dim=-1).mean(dim=1)


def subject_mask(aggregated: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold on the aggregated subject map A_i (Eq. 3 -> M_i). A flat map gives an empty mask."""
    if aggregated.numel() == 0 or float(aggregated.max() - aggregated.min()) <= 1e-12:
        return torch.zeros(aggregated.shape, dtype=torch.bool, device=aggregated.device)
    return aggregated > otsu_threshold(aggregated.cpu())     # mask.otsu_threshold builds its bins on the CPU


def propagation_mask(masks: list[torch.Tensor], i: int, sources: list[int] | None = None) -> torch.Tensor:
    """Eq. 5: Gamma_i, the concatenation over images j of 1 (j = i) or M_j (j != i).

    With subset references (Eq. 13) only the images in ``sources`` contribute their masks, the others 0.
    ``masks``: one (N_j,) bool mask per image. Returns a bool vector over all images' tokens.
    """
    parts = []
    for j, m in enumerate(masks):
        if j == i:
            parts.append(torch.ones_like(m, dtype=torch.bool))
        elif sources is None or j in sources:
            parts.append(m.bool())
        else:
            parts.append(torch.zeros_like(m, dtype=torch.bool))
    return torch.cat(parts)


def extended_keys(k: torch.Tensor, v: torch.Tensor, text_len: int, masks: list[torch.Tensor], i: int,
                  sources: list[int], keep: list[torch.Tensor] | None = None):
    """Eq. 6 restricted by Gamma_i (Eq. 5): image i's own joint keys, then the sources' subject image keys.

    ``k``, ``v``: (B, S, H, D) joint sequences of the batch (text first, keys after RoPE: a shared key keeps its
    own image's positions). ``keep``: optional per-source bool dropout masks. Returns (S + M, H, D) keys and
    values in one concatenation each.
    """
    ks, vs = [k[i]], [v[i]]
    for n, j in enumerate(sources):
        if j == i:
            continue
        sel = masks[j].to(k.device)
        if keep is not None:
            sel = sel & keep[n].to(k.device)
        idx = text_len + sel.nonzero(as_tuple=True)[0]
        if idx.numel():
            ks.append(k[j].index_select(0, idx))
            vs.append(v[j].index_select(0, idx))
    return torch.cat(ks), torch.cat(vs)


def cross_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, masks: list[torch.Tensor],
                          i: int, sources: list[int], keep: list[torch.Tensor] | None = None,
                          attend: AttendFn = sdpa_attend) -> torch.Tensor:
    """Eqs. 7-8 for image i of a batch, without a dense mask: h_i = softmax(Q_i K_all^T / sqrt(d) + log Gamma_i) V_all.

    ``q``, ``k``, ``v``: (B, S, H, D). Image queries of image i see its own keys plus the shared subject keys of
    ``sources``; its text queries see its own keys only (the method batches those over images). Returns (S, H, D).
    """
    keys, values = extended_keys(k, v, text_len, masks, i, sources, keep)
    txt = attend(q[i:i + 1, :text_len], k[i:i + 1], v[i:i + 1])[0]
    img = attend(q[i:i + 1, text_len:], keys[None], values[None])[0]
    return torch.cat([txt, img])


def correspond(feat: torch.Tensor, targets: torch.Tensor, target_masks: torch.Tensor):
    """Eqs. 9-10: the best region of the target images' subject tokens for every region of image i.

    ``feat`` (N, C) features of image i; ``targets`` (K, N', C) features of the K target images;
    ``target_masks`` (K, N') their subject masks (Omega_j). The argmax of Eq. 9's softmax over Omega_j is the
    argmax of the normalized inner product, whatever tau, so tau is not needed. Returns ``best`` (N,) float32
    cosine similarity (-inf where no target has a subject token) and ``index`` (N,) long, a flat index into the
    K x N' target tokens.
    """
    n = feat.shape[0]
    flat_mask = target_masks.reshape(-1).to(feat.device)
    cols = flat_mask.nonzero(as_tuple=True)[0]
    if cols.numel() == 0:
        return (torch.full((n,), float("-inf"), device=feat.device),
                torch.zeros(n, dtype=torch.long, device=feat.device))
    cand = targets.reshape(-1, targets.shape[-1]).index_select(0, cols)
    sim = F.normalize(feat.float(), dim=-1) @ F.normalize(cand.float(), dim=-1).T
    best, arg = sim.max(dim=1)
    return best, cols[arg]


def otsu_limit(best: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold on the correspondence similarity of image i's subject tokens (Sec. 3.2.2).

    Returns the subject tokens whose best similarity lies above the threshold (all of them when their
    similarities are all equal, none when there is no correspondence).
    """
    valid = mask.to(best.device) & torch.isfinite(best)
    vals = best[valid]
    if vals.numel() < 2 or float(vals.max() - vals.min()) <= 1e-6:
        return valid
    return valid & (best > otsu_threshold(vals.cpu()))


def harmonize(r_i: torch.Tensor, r_match: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 11: R^_i(r) = R_i(r) + weight(r) (R_j(C_i(r)) - R_i(r)), weight = gamma M_i(r) [Otsu] [dropout].

    ``r_i``, ``r_match`` (N, C); ``weight`` (N,). Computed in float32, returned in ``r_i``'s dtype.
    """
    w = weight.float().unsqueeze(-1)
    return (r_i.float() + w * (r_match.float() - r_i.float())).to(r_i.dtype)


def layout_interpolate(x_consist: torch.Tensor, x_vanilla: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 12: X_final = (1 - lambda) X_consist + lambda X_vanilla (Base Layout Interpolation)."""
    return ((1.0 - lam) * x_consist.float() + lam * x_vanilla.float()).to(x_consist.dtype)


def dropout_keep(n: int, p: float, seed: int) -> torch.Tensor:
    """A seeded dropout draw (Sec. 3.3's dropouts): (n,) bool, True = kept (probability 1 - p). CPU tensor."""
    if p <= 0:
        return torch.ones(n, dtype=torch.bool)
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.rand(n, generator=gen) >= p


# ============================================================================ the method

@dataclass
class StorySyncConfig:
    """StorySync options. Paper defaults where the paper gives one (gamma, lambda, Otsu); ours otherwise."""

    share: bool = True               # masked cross-image attention sharing (Eqs. 5-8)
    rfh: bool = True                 # Regional Feature Harmonization (Eqs. 9-11)
    bli: bool = True                 # Base Layout Interpolation (Eq. 12)
    gamma: float = 0.3               # harmonization coefficient (paper Table 3b)
    bli_lambda: float = 0.7          # interpolation weight toward the vanilla pass (paper Table 3b)
    share_start: int = 1             # first step of sharing and RFH: the first mask exists after step 0
    share_end: int = 50              # first step without sharing and RFH (paper: every step)
    bli_end: int = 10                # first step without BLI: BLI on the layout steps (ours; paper: "T steps")
    share_blocks: str = "single"     # blocks with cross-image sharing: single | double | all
    mask_blocks: str = "single"      # blocks whose image->text attention makes the masks (Eq. 3's L)
    bli_blocks: str = "all"          # blocks whose image attention outputs are interpolated (Eq. 12's l)
    rfh_features: str = "averaged"   # correspondence features: single-block-averaged (previous step) | layer
    rfh_otsu: bool = True            # Otsu on the correspondence similarity limits RFH
    attn_dropout: float = 0.5        # dropout of shared subject keys (paper: rate not given; ConsiStory's 0.5)
    rfh_dropout: float = 0.0         # dropout of RFH updates (rate not given in the paper)
    mask_dropout: float = 0.0        # dropout of subject-mask tokens (rate not given in the paper)
    num_references: int = 0          # Eq. 13: first K images are the references; 0 = every image shares
    dropout_seed: int = -1           # seed of the dropouts; -1 = each image's own seed
    volatile_backend: str = "flash"  # SDPA kernels of the shared calls (masks change every step): "flash",
                                     # or "default" (cuDNN on Hopper: a new plan per shape)
    schedule_steps: int | None = 50  # the step options are written for this many steps and rescaled to
                                     # num_inference_steps (None: use them as given), as CharaConsist's

    def __post_init__(self):
        check_config(self, ranges={**dict.fromkeys(("gamma", "bli_lambda", "attn_dropout", "rfh_dropout",
                                                    "mask_dropout"), (0.0, 1.0)),
                                   **dict.fromkeys(("num_references", "share_start", "share_end", "bli_end"), (0, None)),
                                   "dropout_seed": (-1, 2**63 - 1), "schedule_steps": (1, None)},
                     choices={"share_blocks": BLOCKS, "mask_blocks": BLOCKS, "bli_blocks": BLOCKS,
                              "rfh_features": FEATURES, "volatile_backend": VOLATILE_BACKENDS},
                     order=[("share_start", "share_end")],
                     steps={"share_start": False, "share_end": False, "bli_end": False})


def step_schedule(config: StorySyncConfig, num_steps: int) -> dict[str, int]:
    """The step options for ``num_steps`` steps: ``round(v * num_steps / schedule_steps)``.

    Sharing and RFH never start at step 0 (no mask exists yet); BLI keeps at least one step after the first
    shared one when it is on, otherwise it would only blend two identical plain passes.
    """
    values = {k: getattr(config, k) for k in ("share_start", "share_end", "bli_end")}
    if config.schedule_steps and num_steps != config.schedule_steps:
        values = {k: int(round(v * num_steps / config.schedule_steps)) for k, v in values.items()}
    values["share_start"] = max(values["share_start"], 1)
    if config.bli_end > config.share_start:
        values["bli_end"] = max(values["bli_end"], values["share_start"] + 1)
    values = {k: min(v, num_steps) for k, v in values.items()}
    return values


class StorySync(Method):
    """Masked cross-image attention sharing + RFH + BLI on FLUX's joint attention (see the module docstring)."""

    name = "storysync"
    Config = StorySyncConfig
    seeding = "per_image"   # no official code; a batch from one generator gives each image its own noise (and
                            # StorySync is evaluated on ConsiStory's benchmark, whose code does so)

    # ------------------------------------------------------------------ planning
    def twin_steps(self, phase: Phase) -> int:
        """BLI needs the vanilla pass at the same step and layer: plain twins for the BLI steps."""
        cfg = self.config
        return step_schedule(cfg, phase.steps)["bli_end"] if cfg.bli and cfg.bli_lambda > 0 else 0

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        """Eq. 13: every chunk holds the references (story images 0..K-1), so every frame can see them."""
        K = self.config.num_references
        return set(range(1, min(K, len(images)))) if K > 1 and k >= K else set()

    def _is_ref(self, s: Slot) -> bool:
        K = self.config.num_references
        return K == 0 or s.story_index < K

    def start(self, run: Run) -> None:
        cfg = self.config
        use_volatile_backend(run, cfg.volatile_backend)
        self.sources: dict[int, list[int]] = {}      # pos -> positions whose subject keys it sees / harmonizes to
        group_of = {s.pos: g for g in run.groups for s in g.slots}
        for s in run.slots:
            wanted = [o for o in run.slots if o.pos != s.pos and self._is_ref(o)]   # Eq. 13: references only
            same = [o.pos for o in wanted if group_of[o.pos] is group_of[s.pos]]
            if len(same) < len(wanted) and (cfg.share or cfg.rfh):
                lost = [o.story_index for o in wanted if o.pos not in same]
                run.note(s.pos, f"images {lost} have another size: no cross-image sharing with them")
            self.sources[s.pos] = same
        identity = next(s for s in run.slots if s.story_index == 0)
        frames = sorted(run.slots[p].story_index for p in self.sources[identity.pos])
        if frames and (cfg.share or cfg.rfh):
            which = ("every frame of its chunk (the paper's batch: every image shares with every other)"
                     if cfg.num_references == 0 else f"frame(s) {frames} (the references share among themselves)")
            run.note(identity.pos, f"StorySync: the identity shares with and harmonizes toward {which}; "
                                   "num_references=1 keeps it independent of the frames")
        self.masks_raw: dict[int, torch.Tensor | None] = {}
        self.masks: dict[int, torch.Tensor | None] = {}
        self.corr: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.schedule = step_schedule(cfg, run.num_steps)
        self.active = range(self.schedule["share_start"], self.schedule["share_end"])   # sharing / RFH steps
        self.bli_stop = self.twin_steps(Phase("main", run.num_steps, True))

    def settings(self) -> dict:
        out = super().settings()
        if getattr(self, "schedule", None):
            out["effective_schedule"] = dict(self.schedule)
        return out

    def _base_seed(self, s: Slot) -> int:
        cfg = self.config
        return cfg.dropout_seed if cfg.dropout_seed >= 0 else (s.seed if s.seed is not None else 0)

    # ------------------------------------------------------------------ per step
    def begin_step(self, run: Run) -> None:
        cfg, step = self.config, run.step
        on = step in self.active
        self.sharing = cfg.share and on
        run.volatile = self.sharing
        self.harmonizing = cfg.rfh and cfg.gamma > 0 and on
        self.blending = cfg.bli and cfg.bli_lambda > 0 and step < self.bli_stop
        nxt = step + 1 in self.active
        self.collect_masks = (cfg.share or cfg.rfh) and nxt
        self.collect_feats = cfg.rfh and cfg.gamma > 0 and cfg.rfh_features == "averaged" and nxt
        self.acc_mask: dict[int, list] = {}
        self.acc_feat: dict[int, list] = {}

    def end_step(self, run: Run) -> None:
        cfg = self.config
        if self.collect_masks:
            for s in run.slots:
                if s.char_len == 0:
                    run.note(s.pos, "no character tokens: no subject mask, the image only receives shared keys")
                    self.masks_raw[s.pos] = self.masks[s.pos] = None
                    continue
                total, count = self.acc_mask[s.pos]
                mask = subject_mask((total / count).cpu())
                if not bool(mask.any()):
                    run.note(s.pos, f"step {run.step}: subject mask empty, nothing shared from this image")
                self.masks_raw[s.pos] = mask
                keep = dropout_keep(mask.numel(), cfg.mask_dropout,
                                    mix_seed(self._base_seed(s), s.story_index, run.step, 3))
                self.masks[s.pos] = mask & keep
        if self.collect_feats:
            self.corr = {}
            for s in run.slots:
                mask, targets = self.masks.get(s.pos), self.sources[s.pos]
                targets = [t for t in targets if self.masks.get(t) is not None]
                if mask is None or not targets or s.pos not in self.acc_feat:
                    continue
                feat, count = self.acc_feat[s.pos]
                tfeat = torch.stack([self.acc_feat[t][0] / self.acc_feat[t][1] for t in targets])
                tmask = torch.stack([self.masks[t] for t in targets])
                best, index = correspond(feat / count, tfeat, tmask.to(tfeat.device))
                keep = otsu_limit(best, mask) if cfg.rfh_otsu else (mask.to(best.device) & torch.isfinite(best))
                self.corr[s.pos] = (best.cpu(), index.cpu(), keep.cpu())
        self.acc_feat = {}

    # ------------------------------------------------------------------ attention
    def attention(self, call: AttnCall) -> torch.Tensor:
        cfg, run = self.config, call.run
        group, T = run.group, call.text_len
        n = len(group.slots)
        share = self.sharing and uses_block(cfg.share_blocks, call.kind)
        rfh = self.harmonizing and call.kind == "single"
        bli = self.blending and group.twins and uses_block(cfg.bli_blocks, call.kind)

        plans = {}
        if share:
            masks = [self._row_mask(s, call) for s in group.slots]
            for row, s in enumerate(group.slots):
                plan = self._plan(call, s, masks)
                if plan is not None:
                    plans[row] = plan
        if not plans:
            out = call.plain()
        else:
            B = call.query.shape[0]
            out = torch.empty(B, call.query.shape[1], call.query.shape[2] * call.query.shape[3],
                              dtype=call.query.dtype, device=call.query.device)
            plain_rows = [r for r in range(B) if r not in plans]
            if plain_rows:   # images that share nothing here, and every twin: plain attention
                idx = torch.tensor(plain_rows, device=call.query.device)
                out[idx] = call.own(idx).flatten(2, 3).to(out.dtype)
            rows = sorted(plans)
            idx = torch.tensor(rows, device=call.query.device)   # text queries of sharing images: own keys only
            txt = call.own(idx, slice(0, T))
            out[idx, :T] = txt.flatten(2, 3).to(out.dtype)
            for row in rows:   # image queries: own keys + the sources' subject keys (Eqs. 5-8)
                sources, keep = plans[row]
                keys, values = extended_keys(call.k_rot, call.value, T, masks, row, sources, keep)
                res = call.attend(call.q_rot[row:row + 1, T:], keys[None], values[None],
                                  bias=call.bias(row, slice(T, None), keys.shape[0]))[0]
                out[row, T:] = res.flatten(1, 2).to(out.dtype)

        if self.collect_masks and uses_block(cfg.mask_blocks, call.kind):
            rows = [row for row, s in enumerate(group.slots) if s.char_len > 0]
            if rows:
                idx = torch.tensor(rows, device=call.query.device)
                spans = [(s.bg_len, s.bg_len + s.char_len, s.real_len) for s in (group.slots[r] for r in rows)]
                maps = subject_attention(call.q_rot[idx, T:], call.k_rot[idx, :T], spans)
                for a, row in zip(maps, rows, strict=True):
                    acc = self.acc_mask.setdefault(group.slots[row].pos, [torch.zeros_like(a), 0])
                    acc[0] += a
                    acc[1] += 1
        if self.collect_feats and call.kind == "single":
            for row, s in enumerate(group.slots):
                f = out[row, T:].float()
                acc = self.acc_feat.setdefault(s.pos, [torch.zeros_like(f), 0])
                acc[0] += f
                acc[1] += 1
        if rfh:
            self._harmonize(call, out, n)
        if bli:   # Eq. 12 on the image tokens; twin rows follow the slots' rows
            out[:n, T:] = layout_interpolate(out[:n, T:], out[n:2 * n, T:], cfg.bli_lambda)
        return out

    def _row_mask(self, s: Slot, call: AttnCall) -> torch.Tensor:
        mask = self.masks.get(s.pos)
        n = call.query.shape[1] - call.text_len
        return torch.zeros(n, dtype=torch.bool) if mask is None else mask

    def _plan(self, call: AttnCall, s: Slot, masks: list[torch.Tensor]):
        """Source rows and their seeded key dropouts for image ``s`` at this layer (Eqs. 5-7, 13), or None."""
        cfg, run = self.config, call.run
        group = run.group
        sources, keep = [], []
        for src in self.sources[s.pos]:
            row = group.row_of(src)
            if not bool(masks[row].any()):
                continue
            sources.append(row)
            if cfg.attn_dropout > 0:
                kind = 0 if call.kind == "double" else 1
                keep.append(dropout_keep(masks[row].numel(), cfg.attn_dropout,
                                         mix_seed(self._base_seed(s), s.story_index, run.slots[src].story_index,
                                                  run.step, kind, call.block, 1)))
        if not sources:
            return None
        return sources, (keep if cfg.attn_dropout > 0 else None)

    def _harmonize(self, call: AttnCall, out: torch.Tensor, n: int) -> None:
        """Eq. 11 on the image tokens of every image with a correspondence, from one snapshot of the outputs."""
        cfg, run, T = self.config, call.run, call.text_len
        group = run.group
        feats = out[:n, T:]
        snapshot = None
        for row, s in enumerate(group.slots):
            mask = self.masks.get(s.pos)
            targets = [t for t in self.sources[s.pos] if self.masks.get(t) is not None]
            if mask is None or not targets:
                continue
            t_rows = torch.tensor([group.row_of(t) for t in targets], device=out.device)
            if snapshot is None:
                snapshot = feats.clone()
            if cfg.rfh_features == "layer":
                tmask = torch.stack([self.masks[t] for t in targets]).to(out.device)
                best, index = correspond(snapshot[row], snapshot.index_select(0, t_rows), tmask)
                keep = otsu_limit(best, mask) if cfg.rfh_otsu else (mask.to(out.device) & torch.isfinite(best))
            elif s.pos in self.corr:
                _, index, keep = self.corr[s.pos]
                index, keep = index.to(out.device), keep.to(out.device)
            else:
                continue
            N = snapshot.shape[1]
            match = snapshot[t_rows[index // N], index % N]
            weight = cfg.gamma * keep.float()
            if cfg.rfh_dropout > 0:
                kind = 0 if call.kind == "double" else 1
                drop = dropout_keep(N, cfg.rfh_dropout, mix_seed(self._base_seed(s), s.story_index, run.step, kind,
                                                                  call.block, 2))
                weight = weight * drop.to(out.device).float()
            out[row, T:] = harmonize(snapshot[row], match, weight)

    def results(self, run: Run) -> dict[int, dict]:
        out = {}
        for s in run.slots:
            mask = self.masks_raw.get(s.pos)
            matches = None
            if self.sources.get(s.pos) == [0] and s.pos in self.corr:   # harmonized toward the identity only
                best, index, keep = self.corr[s.pos]
                frame_idx = keep.nonzero(as_tuple=True)[0]
                matches = Matches(frame_idx, index[frame_idx], best[frame_idx])
            out[s.pos] = {"mask": None if mask is None else mask.reshape(s.grid).numpy(), "matches": matches}
        return out
