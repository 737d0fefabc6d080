"""CharaConsist (Wang et al., ICCV 2025) in the lockstep engine.

Components and where they are implemented:
- mask extraction from text-image attention (paper Sec. 3.2): ``characonsist.mask``;
- point matching on layer-averaged attention outputs (Sec. 3.1, S_t): ``characonsist.match``;
- point-tracking attention, identity keys re-encoded with the matched frame positions (Sec. 3.3):
  ``characonsist.rope.reencode`` + ``characonsist.attention.grouped_attention``;
- adaptive token merge (Sec. 3.4): ``characonsist.merge``;
- background kept / changed / mixed: the ``share_bg`` option and the scene rule below.

Only the single-stream blocks are changed (official code): foreground sharing on every ``fg_every``-th single
block (even ones), background sharing on every ``bg_every``-th (all). Masks and matches are averaged over
all single blocks. Defaults follow the official code (README.md, "How it differs from the official code"), not
the paper, where they differ:
- the mask softmax uses unscaled logits (code) rather than attention weights (paper); ``mask_scaled=True``
  gives the paper's reading;
- the layout pre-run (code only): each frame first runs ``mask_step + 1`` steps without foreground sharing;
  its step-``mask_step`` masks and matches drive the real run's steps 1..mask_step; the real run recomputes
  them at its own step ``mask_step``. Frame masks are refreshed after every step up to ``mask_step`` (code).
- Departure forced by lockstep (documented, measured by the toy benchmark): during the pre-run the identity's
  step-10 mask does not exist yet, so background sharing in the pre-run uses the identity's mask of the
  previous step; the real run uses the identity's step-10 mask as the official code does.

Scenes (mix mode): with ``share_bg``, a frame takes its background keys from the first earlier image (the
identity or a frame) whose background text is the same; a frame with a new background starts a scene and
shares only the foreground, as the official "update background" frame does. Images of another size than
their scene's first image cannot share its background (token positions differ): they share the foreground
only and the output notes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import QueryGroup, grouped_attention, row_bias
from ..engine import AttnCall, Phase, Run
from ..inputs import is_int
from ..mask import foreground_mask, span_weights, text_attention_spans_batched
from ..match import Matches, cosine_similarity_matrix, match_points
from ..merge import merge_tokens, merge_weight
from ..rope import reencode
from ..story import StoryImage
from .base import VOLATILE_BACKENDS, Method, check_config, use_volatile_backend


@dataclass
class CharaConsistConfig:
    """CharaConsist options; defaults are the official ones."""

    share_bg: bool = True            # keep the background (mix mode when frames' backgrounds differ)
    use_token_merge: bool = True     # adaptive token merge (official ``use_interpolate``)
    prerun: bool = True              # layout pre-run of mask_step + 1 steps per frame
    point_tracking: bool = True      # ablation: False keeps identity keys at their own positions
    use_mask: bool = True            # ablation: False treats every token as foreground (no bg sharing)
    share_start: int = 1             # first step with sharing (official attn_start_step)
    share_end: int = 41              # first step without sharing (official attn_end_step)
    mask_step: int = 10              # step of masks and matches (official save_mask_point_step)
    sim_threshold: float = 0.5       # official sim_thr (a cosine similarity: in [-1, 1])
    merge_weight: float = 0.8        # official interpolate_weight
    merge_start: int = 1
    merge_decay: int = 11
    merge_end: int = 31
    fg_every: int = 2                # foreground sharing on single blocks with index % fg_every == 0
    bg_every: int = 1                # background sharing on single blocks with index % bg_every == 0
    mask_erode: int = 3
    mask_dilate: int = 5
    mask_scaled: bool = False        # softmax of q k^T / sqrt(d) (paper) instead of q k^T (official code)
    schedule_steps: int | None = 50  # the step options above are written for this many steps and rescaled
                                     # to num_inference_steps (None: use them as given)
    reuse_prerun_step0: bool = True  # the main run takes step 0 over from the pre-run (same computation)
    volatile_backend: str = "flash"  # SDPA kernels of the background-sharing calls while masks change (steps
                                     # <= mask_step + 1): "flash" or "default" (PyTorch's choice: cuDNN on
                                     # Hopper, a new plan per shape)
    row_bucket: int = 256            # while masks change, query counts are padded to a multiple of this
                                     # (exact; 0 = off) so cuDNN reuses its plans

    def __post_init__(self):
        odd = [f"option {name}={getattr(self, name)}: must be 0, 1 or an odd window size (3 = 3x3)"
               for name in ("mask_erode", "mask_dilate")
               if is_int(getattr(self, name)) and getattr(self, name) > 1 and getattr(self, name) % 2 == 0]
        check_config(
            self, problems=odd,
            ranges={"share_start": (0, None), "share_end": (0, None), "mask_step": (0, None),
                    "sim_threshold": (-1.0, 1.0), "merge_weight": (0.0, 1.0), "merge_start": (0, None),
                    "merge_decay": (0, None), "merge_end": (0, None), "fg_every": (1, None), "bg_every": (1, None),
                    "mask_erode": (0, None), "mask_dilate": (0, None), "schedule_steps": (1, None),
                    "row_bucket": (0, None)},
            choices={"volatile_backend": VOLATILE_BACKENDS},
            order=[("share_start", "share_end"), ("merge_start", "merge_decay"), ("merge_decay", "merge_end")],
            steps={"mask_step": True, "share_start": False, "share_end": False, "merge_start": False,
                   "merge_decay": False, "merge_end": False})


_STEP_OPTIONS = ("share_start", "share_end", "mask_step", "merge_start", "merge_decay", "merge_end")


def step_schedule(config: CharaConsistConfig, num_steps: int) -> dict[str, int]:
    """The step options for ``num_steps`` steps: ``round(v * num_steps / schedule_steps)``.

    At the official 50 steps nothing changes; FLUX.1-schnell's 4 steps get masks and matches at step 1 and
    sharing on steps 1-2 instead of never reaching step 10. Sharing never starts at step 0 (no mask yet),
    and the mask step stays inside the run.
    """
    values = {name: getattr(config, name) for name in _STEP_OPTIONS}
    if config.schedule_steps and num_steps != config.schedule_steps:
        values = {k: int(round(v * num_steps / config.schedule_steps)) for k, v in values.items()}
    if config.share_start >= 1:
        values["share_start"] = max(values["share_start"], 1)
        values["merge_start"] = max(values["merge_start"], 1)
    values["mask_step"] = min(values["mask_step"], num_steps - 1)
    values["merge_decay"] = max(values["merge_decay"], values["merge_start"])
    values["merge_end"] = max(values["merge_end"], values["merge_decay"] + 1)
    return values


def _scene_key(image: StoryImage) -> str:
    return " ".join(image.background.lower().split())


class CharaConsist(Method):
    """Point-tracking attention + adaptive token merge on FLUX's single blocks."""

    name = "characonsist"
    Config = CharaConsistConfig

    # ------------------------------------------------------------------ planning
    def phases(self, num_steps: int) -> list[Phase]:
        """The layout pre-run (``mask_step + 1`` steps) and the main run.

        Step 0 has no sharing and no merge (``share_start``, ``merge_start`` >= 1), so the pre-run's step 0 is
        the main run's step 0, batch for batch: with ``reuse_prerun_step0`` the main run starts at step 1 from
        the pre-run's latents and step-0 masks (one forward of the whole chunk saved, bit-identical images).
        Only when the pre-run steps its step 0, i.e. the effective ``mask_step`` is at least 1: a pre-run of one
        step stops at that step's prediction (its last) and leaves the latents unstepped.
        """
        cfg, sch = self.config, step_schedule(self.config, num_steps)
        if not (cfg.prerun and num_steps > 1):
            return [Phase("main", num_steps, final=True)]
        start = int(cfg.reuse_prerun_step0 and sch["mask_step"] >= 1 and sch["share_start"] >= 1 and (
            not cfg.use_token_merge or sch["merge_start"] >= 1))
        return [Phase("prerun", sch["mask_step"] + 1, final=False), Phase("main", num_steps, final=True, start=start)]

    def settings(self) -> dict:
        out = super().settings()
        if getattr(self, "schedule", None):
            out["effective_schedule"] = dict(self.schedule)
        return out

    def _scene_anchor(self, images: list[StoryImage], k: int) -> int | None:
        if not self.config.share_bg or not self.config.use_mask:
            return None
        key = _scene_key(images[k])
        for j in range(k):
            if _scene_key(images[j]) == key:
                return j
        return None

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        anchor = self._scene_anchor(images, k)
        return {anchor} if anchor else set()

    def start(self, run: Run) -> None:
        cfg = self.config
        self.schedule = step_schedule(cfg, run.num_steps)
        images = [s.image for s in run.slots]
        self.bg_source: dict[int, int | None] = {}
        for s in run.slots[1:]:
            src = self._scene_anchor(images, s.pos)
            if src is not None and run.slots[src].grid != s.grid:
                run.note(s.pos, "size differs from its scene's first image: background not shared")
                src = None
            self.bg_source[s.pos] = src
        self.masks: dict[int, torch.Tensor] = {}
        self.id_mask_final: torch.Tensor | None = None
        self.matches: dict[int, Matches] = {}
        self.acc_mask: dict[int, list[torch.Tensor]] = {}
        self.acc_sim: dict[int, torch.Tensor] = {}
        self.store: dict[int, dict] = {}
        self.layouts: dict[tuple, dict | None] = {}
        self.row_index: dict[tuple, torch.Tensor] = {}
        self.merge_w = 0.0
        self.masks_step0: dict[int, torch.Tensor] = {}
        use_volatile_backend(run, cfg.volatile_backend)
        if not cfg.use_mask:
            for s in run.slots:
                self.masks[s.pos] = torch.ones(s.num_tokens, dtype=torch.bool)

    # ------------------------------------------------------------------ per step
    def begin_step(self, run: Run) -> None:
        cfg, step, final, sch = self.config, run.step, run.phase.final, self.schedule
        if final and run.phase.start and step == run.phase.start and cfg.use_mask:
            self.masks.update(self.masks_step0)   # step 0 was taken over from the pre-run: its masks too
        # masks (and at mask_step + 1 the matches) change: query counts and the shared background's key count
        # are new at every step. Queries are padded to buckets (plans reused); the background call's keys
        # cannot be padded exactly, so that call alone is volatile (``AttnCall.attend``).
        self.volatile = step <= sch["mask_step"] + 1
        self.sharing = sch["share_start"] <= step < sch["share_end"]
        self.fg_phase = final            # no foreground sharing in the pre-run
        self.collect_masks = step <= sch["mask_step"] and cfg.use_mask
        self.collect_sim = step == sch["mask_step"]
        self.merge_w = merge_weight(step, cfg.merge_weight, sch["merge_start"], sch["merge_decay"],
                                    sch["merge_end"]) if (cfg.use_token_merge and final) else 0.0
        self.acc_mask, self.acc_sim, self.store, self.layouts = {}, {}, {}, {}

    def _id_mask(self) -> torch.Tensor | None:
        return self.id_mask_final if self.id_mask_final is not None else self.masks.get(0)

    def end_step(self, run: Run) -> None:
        cfg = self.config
        if self.collect_masks:
            new = {}
            for s in run.slots:
                if s.pos not in self.acc_mask:    # the identity in the main run (see _mask_rows)
                    continue
                bg, fg = self.acc_mask[s.pos]
                if s.bg_len == 0 or s.real_len <= s.bg_len:
                    run.note(s.pos, "no background or no foreground text tokens: whole image taken as foreground")
                    new[s.pos] = torch.ones(s.num_tokens, dtype=torch.bool, device=bg.device)
                else:
                    new[s.pos] = foreground_mask(bg, fg, s.grid, cfg.mask_erode, cfg.mask_dilate)
            if new:   # one device-to-host copy for all images
                flat = torch.cat(list(new.values())).cpu()
                for pos, mask in zip(new, flat.split([m.numel() for m in new.values()]), strict=True):
                    self.masks[pos] = mask
            if run.step == self.schedule["mask_step"] and 0 in new:
                self.id_mask_final = self.masks[0]
            if run.step == 0 and not run.phase.final:
                self.masks_step0 = dict(self.masks)
        if self.collect_sim:
            id_fg = self._id_mask()
            for s in run.slots[1:]:
                sim = self.acc_sim[s.pos] / run.num_single_blocks
                frame_fg = self.masks[s.pos]
                if not bool(frame_fg.any()):
                    run.note(s.pos, f"{run.phase.name} step {run.step}: foreground mask empty, no foreground sharing")
                m = match_points(sim, frame_fg, id_fg, cfg.sim_threshold)
                if len(m) == 0 and bool(frame_fg.any()):
                    run.note(s.pos, f"{run.phase.name} step {run.step}: no match above sim_threshold="
                                    f"{cfg.sim_threshold}, no foreground sharing")
                self.matches[s.pos] = m.to("cpu")

    # ------------------------------------------------------------------ attention
    def attention(self, call: AttnCall) -> torch.Tensor:
        if call.kind != "single":
            return call.plain()
        cfg, run = self.config, call.run
        group, T, layer = run.group, call.text_len, call.block
        fg_layer = self.sharing and self.fg_phase and layer % cfg.fg_every == 0
        bg_layer = self.sharing and layer % cfg.bg_every == 0
        id_row = group.row_of(0)
        if id_row is not None:
            ident = {"k_raw": call.key[id_row, T:], "k_rot": call.k_rot[id_row, T:], "v": call.value[id_row, T:]}
        else:
            ident = self.store[layer]

        plans = {}
        for row, s in enumerate(group.slots):
            if s.is_identity:
                continue
            plan = self._plan(call, s, ident, fg_layer, bg_layer)
            if plan is not None:
                plans[row] = plan

        if not plans:
            out = call.plain()
        else:
            plain_rows = [r for r in range(call.query.shape[0]) if r not in plans]
            out = torch.empty(call.query.shape[0], call.query.shape[1], call.query.shape[2] * call.query.shape[3],
                              dtype=call.query.dtype, device=call.query.device)
            if plain_rows:
                idx = self._rows(plain_rows, call.query.device)
                out[idx] = call.own(idx).flatten(2, 3).to(out.dtype)
            for row, groups in plans.items():
                res = grouped_attention(call.q_rot[row], call.k_rot[row], call.value[row], groups,
                                        attend=call.attend, row_bucket=cfg.row_bucket if self.volatile else 0,
                                        bias=row_bias(call, row))
                out[row] = res.flatten(1, 2).to(out.dtype)

        id_out = out[id_row, T:] if id_row is not None else ident["out"]
        if self.collect_masks:
            self._collect_masks(call, group, T)
        for row, s in enumerate(group.slots):
            if s.is_identity:
                continue
            if self.collect_sim:
                sim = cosine_similarity_matrix(out[row, T:], id_out)
                self.acc_sim[s.pos] = self.acc_sim[s.pos] + sim if s.pos in self.acc_sim else sim
            lay = self._layout(s, T, out.device) if self.merge_w > 0 and fg_layer else None
            if lay is not None and lay["matches"] is not None:
                m = lay["matches"]
                out[row, T:] = merge_tokens(out[row, T:], id_out, m.frame_idx, m.id_idx, self.merge_w * m.sim)
        if id_row is not None and len(run.groups) > 1:
            ident["out"] = id_out
            ident["rotary"] = (call.rotary[0][T:], call.rotary[1][T:])
            self.store[layer] = ident
        return out

    def _mask_rows(self, group, T: int, device) -> tuple | None:
        """Rows of the group whose masks this step needs, and their span weights (built once per step).

        In the main run the identity's masks are not needed once the pre-run gave its step-``mask_step`` mask:
        the identity denoises exactly as in the pre-run, so its masks would be the same.
        """
        key = ("mask_rows", id(group), T, str(device))
        if key not in self.layouts:
            skip_id = self.id_mask_final is not None and self.fg_phase
            slots = [(row, s) for row, s in enumerate(group.slots) if not (s.is_identity and skip_id)]
            if not slots:
                self.layouts[key] = None
            else:
                rows = [row for row, _ in slots]
                real = [s.real_len for _, s in slots]
                self.layouts[key] = (self._rows(rows, device), [s.pos for _, s in slots], real,
                                     span_weights([s.bg_len for _, s in slots], real, device))
        return self.layouts[key]

    def _collect_masks(self, call: AttnCall, group, T: int) -> None:
        """Add this layer's text-image attention spans (``mask.text_attention_spans_batched``) to the step's."""
        plan = self._mask_rows(group, T, call.query.device)
        if plan is None:
            return
        idx, positions, real, weights = plan
        bg, fg = text_attention_spans_batched(call.q_rot[idx, T:], call.k_rot[idx, :T], real, weights,
                                              self.config.mask_scaled)
        for i, pos in enumerate(positions):
            acc = self.acc_mask.setdefault(pos, [torch.zeros_like(bg[i]), torch.zeros_like(fg[i])])
            acc[0] += bg[i]
            acc[1] += fg[i]

    def _rows(self, rows: list[int], device) -> slice | torch.Tensor:
        """Batch rows as a slice when contiguous (a view, no copy), else a cached index tensor: building an
        index tensor from a Python list at every layer would copy to the device and wait for it."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        key = (tuple(rows), str(device))
        if key not in self.row_index:
            self.row_index[key] = torch.tensor(rows, device=device)
        return self.row_index[key]

    def _layout(self, s, T: int, device) -> dict | None:
        """Index tensors of one frame for the current step, built once per step.

        Masks and matches live on the host and change only between steps; the indices are computed there and
        copied with ``non_blocking=True`` (from pageable memory: staged at once, no wait for the device), so
        the attention path never makes the host wait for the GPU.
        """
        key = (s.pos, T, str(device))
        if key in self.layouts:
            return self.layouts[key]
        mask = self.masks.get(s.pos)
        if mask is None:
            self.layouts[key] = None
            return None

        def up(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=True)

        mask = mask.cpu()
        layout = {"text": torch.arange(T, device=device), "fg": up(mask.nonzero(as_tuple=True)[0] + T),
                  "bg": up((~mask).nonzero(as_tuple=True)[0] + T), "matches": None, "bg_pos": None}
        m = self.matches.get(s.pos)
        if m is not None and len(m):
            m = m.to("cpu")
            layout["matches"] = Matches(up(m.frame_idx), up(m.id_idx), up(m.sim))
            layout["fg_pos"] = up(m.frame_idx + T)
        src = self.bg_source.get(s.pos)
        if src is not None:
            src_mask = self._id_mask() if src == 0 else self.masks.get(src)
            if src_mask is not None:
                pos = ((~src_mask.cpu()) & (~mask)).nonzero(as_tuple=True)[0]
                if pos.numel():
                    layout["bg_pos"], layout["bg_src"] = up(pos), src
        self.layouts[key] = layout
        return layout

    def _plan(self, call: AttnCall, s, ident: dict, fg_layer: bool, bg_layer: bool):
        """Query groups of one frame at this layer, or None when it attends plainly."""
        cfg, T = self.config, call.text_len
        lay = self._layout(s, T, call.query.device)
        if lay is None:
            return None
        fg_k = fg_v = bg_k = bg_v = None
        m = lay["matches"]
        if fg_layer and m is not None:
            if cfg.point_tracking:
                fg_k = reencode(ident["k_raw"].index_select(0, m.id_idx), call.rotary, lay["fg_pos"])
            else:
                fg_k = ident["k_rot"].index_select(0, m.id_idx)
            fg_v = ident["v"].index_select(0, m.id_idx)
        if bg_layer and lay["bg_pos"] is not None:
            src_row = call.run.group.row_of(lay["bg_src"])
            bg_k = call.k_rot[src_row, T:].index_select(0, lay["bg_pos"])
            bg_v = call.value[src_row, T:].index_select(0, lay["bg_pos"])
        if fg_k is None and bg_k is None:
            return None
        return [QueryGroup(lay["text"], volatile=False), QueryGroup(lay["fg"], fg_k, fg_v, volatile=False),
                QueryGroup(lay["bg"], bg_k, bg_v, volatile=self.volatile)]

    def results(self, run: Run) -> dict[int, dict]:
        out = {}
        for s in run.slots:
            mask = self.masks.get(s.pos)
            if s.is_identity and self.id_mask_final is not None:
                mask = self.id_mask_final     # its mask at the mask step (not collected again in the main run)
            out[s.pos] = {
                "mask": None if mask is None else mask.reshape(s.grid).numpy(),
                "matches": None if s.is_identity else self.matches.get(s.pos),
            }
        return out
