"""The lockstep engine: identity and frames denoise together, one step and one layer at a time.

DESIGN decision 1: instead of caching the identity's keys and values for every layer and step (the official
code keeps ~71 GiB on the host), the identity image runs in the same batch as its frames, so at every step
and layer its keys, values and attention outputs are right there. Images of another size than the
identity run in their own forward pass right after the identity's group; the identity's per-layer tensors
of *the current step* are kept for them (never across steps).

The engine owns the batch, the step schedule and the attention processors (installed with ``set_attn_processor``
and restored afterwards). A ``Method`` owns the math of one consistency method through
``characonsist.methods.base.Method``. What differs between model families (prompt encoding, token layout,
latents, the transformer call and its guidance, the layers' projections) is the backbone adapter's
(``characonsist.backbones``), found from the transformer's class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._compat import import_flux

import_flux()   # before diffusers' FLUX module is first imported below (mutes a torchvision notice)

from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402

from .inputs import InputError  # noqa: E402
from .rope import Rotary, apply_rope  # noqa: E402
from .story import StoryImage  # noqa: E402

_VOLATILE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Slot:
    """One image of a chunk: its story position, prompt layout and noise."""

    story_index: int            # 0 = identity, k = k-th frame
    image: StoryImage
    height: int
    width: int
    seed: int | None
    generator: torch.Generator | list | None
    grid: tuple[int, int]       # image token grid (rows, cols)
    bg_len: int                 # T5 tokens of the background field
    real_len: int               # T5 tokens of the whole prompt (no end token), <= text length
    char_len: int = 0           # T5 tokens of the character field (it starts at bg_len)
    pos: int = 0                # position in the chunk (identity = 0)
    picture: object = None      # the identity from a picture: ``inversion.PictureRow`` (its row follows it)

    @property
    def is_identity(self) -> bool:
        return self.story_index == 0

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Group:
    """Slots of one image size: they share one transformer forward pass per step."""

    slots: list[Slot]
    latents0: torch.Tensor
    img_ids: torch.Tensor
    text: object                # backbones.TextBatch of the group's rows
    latents: torch.Tensor | None = None
    scheduler: object = None
    timesteps: torch.Tensor | None = None

    twins: bool = False         # rows len(slots).. are plain "vanilla twins" of the slots, same order
                                # (``Method.twins_follow``: restarted from the slots' latents every step)
    kept: list = field(default_factory=list)   # latents after steps 0..k-1, for a next phase starting at k
    kept_x0: list = field(default_factory=list)   # their x0 estimates (only when a callback asks for "x0")
    velocity: torch.Tensor | None = None       # the last step's model output (only when a callback asks for it)

    def row_of(self, pos: int) -> int | None:
        for row, slot in enumerate(self.slots):
            if slot.pos == pos:
                return row
        return None

    def twin_row(self, pos: int) -> int | None:
        row = self.row_of(pos)
        return None if row is None or not self.twins else row + len(self.slots)

    @property
    def num_rows(self) -> int:
        return len(self.slots) * (2 if self.twins else 1)


@dataclass(frozen=True)
class Phase:
    """A denoising pass over the chunk. ``final`` passes produce the images; others (the layout pre-run)
    only produce masks and matches and stop after ``steps`` steps.

    ``start`` > 0: the pass begins at that step from the latents the *previous* pass had after step
    ``start - 1`` (the engine keeps them). A method may ask for it only where its steps before ``start`` are
    the same computation in both passes (CharaConsist: the pre-run's step 0 is its main run's step 0).
    """

    name: str
    steps: int
    final: bool
    start: int = 0


@dataclass(frozen=True)
class StepBatch:
    """What the rows of a ``callback_on_step_end`` call are (``pipe.step_batch`` during the call): the images'
    story indices (0 = identity, k = frame k), their size in pixels, and the noise level ``sigma`` of the latents
    after the step (the scheduler's next sigma; 0 after the last step)."""

    images: tuple[int, ...]
    height: int
    width: int
    sigma: float
    step: int
    steps: int


CALLBACK_TENSORS = ("latents", "x0", "noise_pred")   # what ``callback_on_step_end_tensor_inputs`` may name


@dataclass
class Run:
    """What a method sees of the chunk being generated."""

    slots: list[Slot]
    groups: list[Group]
    text_len: int
    num_steps: int
    num_single_blocks: int
    num_double_blocks: int
    group: Group | None = None
    phase: Phase | None = None
    step: int = 0
    notes: dict[int, list[str]] = field(default_factory=dict)
    volatile: bool = False            # this step's shared-attention shapes are new (set by the method)
    volatile_backend: str = "flash"   # SDPA kernels for volatile calls: "flash" or "default" (see AttnCall)

    def note(self, pos: int, message: str) -> None:
        """Record a fallback for the image at chunk position ``pos`` (each message once)."""
        bucket = self.notes.setdefault(pos, [])
        if message not in bucket:
            bucket.append(message)


@dataclass
class AttnCall:
    """One attention layer call for the current group: everything a method needs to compute attention.

    ``query``/``key``/``value``: (B, S, H, D) after the q/k RMS norms and *before* RoPE, text tokens first.
    ``attn_mask``: the mask the model itself passes to this layer (Chroma's text mask, (B, 1, S, S), added to the
    logits by SDPA as diffusers does), None for FLUX.1. Methods never read it: ``plain``, ``own`` and ``bias`` apply
    it, so a backbone with a mask needs no branch in a method.
    """

    kind: str                   # "double" or "single"
    block: int                  # block index within its kind
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rotary: Rotary
    text_len: int
    run: Run
    backend: object = None
    parallel_config: object = None
    attn_mask: torch.Tensor | None = None
    _q_rot: torch.Tensor | None = None
    _k_rot: torch.Tensor | None = None

    @property
    def q_rot(self) -> torch.Tensor:
        if self._q_rot is None:
            self._q_rot = apply_rope(self.query, self.rotary)
        return self._q_rot

    @property
    def k_rot(self) -> torch.Tensor:
        if self._k_rot is None:
            self._k_rot = apply_rope(self.key, self.rotary)
        return self._k_rot

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, volatile: bool | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of (B, Sq, H, D) queries over (B, Sk, H, D) keys through diffusers' backend dispatch.

        For a volatile call (``volatile``, default ``run.volatile``: query/key counts that change from step to
        step, e.g. while masks are being refreshed) with no backend chosen, PyTorch's SDPA is limited to the
        flash kernel (then memory-efficient, then math): its cuDNN kernel, PyTorch's first choice on Hopper,
        builds an execution plan for every new shape (~37 ms on an H100, BENCHMARKS.md), which costs more than
        it saves on shapes used for one step only. ``bias``: an additive mask from ``bias`` (None on FLUX.1).
        """
        volatile = self.run.volatile if volatile is None else volatile
        if (volatile and self.run.volatile_backend == "flash" and self.backend is None
                and q.is_cuda):
            with sdpa_kernel(_VOLATILE_KERNELS):
                return dispatch_attention_fn(q, k, v, attn_mask=bias, backend=None,
                                             parallel_config=self.parallel_config)
        return dispatch_attention_fn(q, k, v, attn_mask=bias, backend=self.backend,
                                     parallel_config=self.parallel_config)

    def plain(self) -> torch.Tensor:
        """Stock attention for the whole batch, (B, S, H*D): bit-identical to the backbone's stock processor."""
        out = self.attend(self.q_rot, self.k_rot, self.value, bias=self.attn_mask)
        return out.flatten(2, 3).to(self.query.dtype)

    def own(self, rows, queries: slice | None = None) -> torch.Tensor:
        """Stock attention of the batch rows ``rows`` (a slice or index tensor) over their own keys, (b, sq, H, D):
        all their queries, or the sequence positions ``queries`` (a slice). With the model's mask, as it applies."""
        queries = slice(None) if queries is None else queries
        mask = None if self.attn_mask is None else self.attn_mask[rows][:, :, queries]
        return self.attend(self.q_rot[rows][:, queries], self.k_rot[rows], self.value[rows], bias=mask)

    def bias(self, row: int, positions, num_keys: int) -> torch.Tensor | None:
        """The additive mask for queries at sequence ``positions`` (slice or index tensor) of batch row ``row``
        over ``num_keys`` keys: the row's own S keys first, then shared keys (counted as unmasked image tokens).
        None where the model passes no mask (FLUX.1): then every call stays mask-free."""
        if self.attn_mask is None:
            return None
        own = self.attn_mask[row, 0].diagonal()          # (S,): the token mask (m_i * m_i = m_i)
        keys = torch.cat([own, own.new_ones(num_keys - own.shape[0])])
        return (own[positions][:, None] * keys[None, :])[None, None]


def sampler_schedule(scheduler, num_steps: int, image_seq_len: int, device):
    """A copy of the pipeline's flow-matching scheduler set to ``num_steps`` steps for images of ``image_seq_len``
    tokens, as ``FluxPipeline`` sets it (linear sigmas shifted by the resolution-dependent ``mu``), and its
    timesteps. Every group of a chunk and a picture's inversion (``characonsist.inversion``) use this one rule."""
    sched = copy.deepcopy(scheduler)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, mu=mu)
    sched.set_begin_index(0)
    return sched, timesteps


def _name(fn) -> str:
    """A callable as messages name it (its qualified name)."""
    return getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", None) or repr(fn)


class Engine:
    """Runs one chunk (identity + frames) of a story through a method, in lockstep."""

    def __init__(self, pipe, method):
        self.pipe, self.method = pipe, method
        self.backbone = pipe.backbone      # the pipeline's adapter (``backbones.backbone_of``): the engine imports none
        self.run: Run | None = None
        self._wants: set[str] = set()
        self._plain = False

    @contextmanager
    def plain_pass(self):
        """Every layer attends plainly inside (the method is not called): a backbone's negative-prompt pass."""
        self._plain = True
        try:
            yield
        finally:
            self._plain = False

    def attention(self, kind: str, block: int, q, k, v, rotary, text_len: int | None, attn_mask, backend,
                  parallel_config) -> torch.Tensor:
        """One layer's attention output (B, S, H*D), called by the backbone's processor with q, k, v before RoPE."""
        run = self.run
        call = AttnCall(kind, block, q, k, v, rotary, run.text_len if text_len is None else text_len, run, backend,
                        parallel_config, attn_mask)
        return call.plain() if self._plain else self.method.attention(call)

    @contextmanager
    def installed(self):
        """Install the engine's processors on every attention layer; restore the originals afterwards."""
        transformer = self.pipe.transformer
        original = dict(transformer.attn_processors)
        new = {}
        for name, proc in original.items():
            p = self.backbone.processor(self, name, proc)
            p._attention_backend = getattr(proc, "_attention_backend", None)
            p._parallel_config = getattr(proc, "_parallel_config", None)
            new[name] = p
        transformer.set_attn_processor(new)
        try:
            yield
        finally:
            transformer.set_attn_processor(original)

    # ------------------------------------------------------------------ set-up
    def _groups(self, slots: list[Slot], text, device, dtype) -> list[Group]:
        sizes: list[tuple[int, int]] = []
        for s in slots:   # identity's size first, then in order of appearance
            if (s.height, s.width) not in sizes:
                sizes.append((s.height, s.width))
        groups = []
        for h, w in sizes:
            members = [s for s in slots if (s.height, s.width) == (h, w)]
            lats, ids = [], None
            for s in members:
                lat, ids = self.backbone.latents(self.pipe, h, w, dtype, device, s.generator)
                lats.append(lat)
            rows = torch.tensor([s.pos for s in members], device=text.embeds.device)
            groups.append(Group(members, torch.cat(lats), ids, text.rows(rows)))
        return groups

    def _reset(self, group: Group, num_steps: int, device, twin_steps: int = 0) -> None:
        sched, timesteps = self.backbone.schedule(self.pipe.scheduler, num_steps, group.latents0.shape[1], device)
        group.scheduler, group.timesteps, group.latents = sched, timesteps, group.latents0.clone()
        group.twins = bool(twin_steps)
        if group.twins:   # the twins start from the same noise and denoise plainly
            group.latents = torch.cat([group.latents, group.latents])
        self._follow_picture(group, 0, start=True)

    def _follow_picture(self, g: Group, step: int, start: bool = False) -> None:
        """Put the picture identity's row (and its twin) where the picture is at ``step`` (``Slot.picture``):
        at every step when it follows the picture's path (``follow="steps"``), only at the start otherwise."""
        for row, s in enumerate(g.slots):
            picture = s.picture
            if picture is None or not (start or picture.follow == "steps") or step >= len(picture.sigmas):
                continue
            x = picture.at(step).to(g.latents.device, g.latents.dtype)
            g.latents[row] = x[0]
            twin = g.twin_row(s.pos)
            if twin is not None and twin < g.latents.shape[0]:
                g.latents[twin] = x[0]

    # ------------------------------------------------------------------ the loop
    def generate(self, slots: list[Slot], *, num_inference_steps: int, guidance_scale: float,
                 max_sequence_length: int, progress=None, callback: Callable | None = None,
                 callback_tensor_inputs=("latents",)) -> tuple[list[torch.Tensor], Run]:
        """Denoise the chunk; returns the final packed latents per slot (chunk order) and the run state."""
        pipe = self.pipe
        device = pipe._execution_device
        text = self.backbone.encode(pipe, [s.image.prompt for s in slots], max_sequence_length, device,
                                    guidance_scale)
        groups = self._groups(slots, text, device, text.embeds.dtype)
        tr_config = pipe.transformer.config
        run = Run(slots, groups, text.length, num_inference_steps, tr_config.num_single_layers,
                  tr_config.num_layers)
        self.run = run
        self.method.start(run)
        names = tuple(callback_tensor_inputs or ()) if callback is not None else ()
        self._wants = {"x0", "noise_pred"} & set(names)   # read-only inputs: kept only when asked for
        phases = self.method.phases(num_inference_steps)
        with self.installed():
            for i, phase in enumerate(phases):
                run.phase = phase
                if progress is not None and hasattr(progress, "start_phase"):
                    progress.start_phase(phase)
                twin_steps = min(self.method.twin_steps(phase), phase.steps)
                follow = bool(twin_steps) and self.method.twins_follow(phase)
                nxt = phases[i + 1] if i + 1 < len(phases) else None
                keep = nxt.start if nxt is not None else 0
                if (phase.start and twin_steps) or (keep and (twin_steps or self.method.twin_steps(nxt))):
                    raise ValueError(f"phase {phase.name!r}: taking steps over from another phase needs no twins")
                for g in groups:
                    self._reset(g, num_inference_steps, device, twin_steps)
                    if phase.start:
                        g.latents = g.kept[phase.start - 1].clone()
                        g.scheduler.set_begin_index(phase.start)
                for step in range(phase.start):   # steps taken over from the previous phase
                    for g in groups:
                        if callback is not None and phase.final:
                            self._callback(callback, g, step, callback_tensor_inputs, g.kept[step],
                                           apply=step == phase.start - 1, taken_over=True,
                                           x0=g.kept_x0[step] if step < len(g.kept_x0) else None)
                for g in groups:
                    g.kept, g.kept_x0 = [], []
                for step in range(phase.start, phase.steps):
                    run.step = step
                    if twin_steps and step == twin_steps:
                        for g in groups:   # twins are no longer needed: drop their rows
                            g.twins, g.latents = False, g.latents[: len(g.slots)]
                    self.method.begin_step(run)
                    for g in groups:
                        run.group = g
                        if follow and g.twins:   # a plain forward on the images' current latents
                            g.latents = torch.cat([g.latents[:len(g.slots)]] * 2)
                        self._forward(g, step, guidance_scale, last=not phase.final and
                                      step == phase.steps - 1)
                        if step < keep:
                            g.kept.append(g.latents.clone())
                            if "x0" in self._wants:
                                g.kept_x0.append(self._x0(g, step))
                        if callback is not None and phase.final:
                            self._callback(callback, g, step, callback_tensor_inputs, g.latents)
                    self.method.end_step(run)
                    if progress is not None:
                        progress.update()
        for g in groups:
            g.twins, g.latents = False, g.latents[: len(g.slots)]
        final = {s.pos: g.latents[row:row + 1] for g in groups for row, s in enumerate(g.slots)}
        return [final[s.pos] for s in slots], run

    def _x0(self, g: Group, step: int) -> torch.Tensor | None:
        """The images' x0 estimate after ``step``: latents - sigma_next * velocity (the flow's straight line to
        sigma 0; rectified-flow x0 = x_t - sigma_t * v, taken from the stepped latents). None when the step ran no
        scheduler step (a pre-run's last)."""
        if g.velocity is None:
            return None
        n = len(g.slots)
        sigma = float(g.scheduler.sigmas[step + 1])
        return (g.latents[:n].float() - sigma * g.velocity[:n].float()).to(g.latents.dtype)

    def _callback(self, callback, g: Group, step: int, names, latents: torch.Tensor, apply: bool = True,
                  taken_over: bool = False, x0: torch.Tensor | None = None) -> None:
        """``callback_on_step_end`` for one group; it sees the images' rows, never the twins'. Latents it
        returns replace the group's (``apply``; for a step taken over from an earlier phase only the last one's
        can, the later ones already ran; returning them unchanged is fine). ``x0`` and ``noise_pred`` are read
        only (a step ``taken_over`` from an earlier phase has the x0 kept then and no ``noise_pred``).
        ``pipe.step_batch`` says what the rows are during the call."""
        n = len(g.slots)
        given = {"latents": latents[:n]}
        if "x0" in names:
            given["x0"] = x0 if taken_over else self._x0(g, step)
        if "noise_pred" in names and not taken_over and g.velocity is not None:
            given["noise_pred"] = g.velocity[:n]
        kwargs = {k: given.get(k) for k in names}
        self.pipe._step_batch = StepBatch(tuple(s.story_index for s in g.slots), g.slots[0].height,
                                          g.slots[0].width, float(g.scheduler.sigmas[step + 1]), step,
                                          len(g.timesteps))
        try:
            result = callback(self.pipe, step, g.timesteps[step], kwargs) or {}
        finally:
            self.pipe._step_batch = None
        if not isinstance(result, dict):
            raise InputError(f"callback_on_step_end {_name(callback)} returned {type(result).__name__} at step {step}; "
                             "return a dict (of the tensors to replace, e.g. {'latents': ...}) or None")
        if "latents" in result and result["latents"] is not kwargs.get("latents"):
            if not apply:
                raise ValueError(f"step {step} was taken over from the pre-run: its latents cannot be changed")
            given, expected = result.pop("latents"), latents[:n]
            if not isinstance(given, torch.Tensor) or given.shape != expected.shape:
                what = f"shape {tuple(given.shape)}" if isinstance(given, torch.Tensor) else type(given).__name__
                raise InputError(f"callback_on_step_end {_name(callback)} returned latents of {what} at step {step}; "
                                 f"expected shape {tuple(expected.shape)} (images, tokens, channels: the rows "
                                 "pipe.step_batch names)")
            g.latents = torch.cat([given.to(g.latents.device, g.latents.dtype), g.latents[n:]])

    def _forward(self, g: Group, step: int, guidance_scale: float, last: bool) -> None:
        t = g.timesteps[step]
        batch = g.latents.shape[0]
        text = g.text.doubled() if g.twins else g.text
        noise_pred = self.backbone.velocity(self, g.latents, t, text, g.img_ids, guidance_scale)
        if not last:   # a pre-run stops at its last step's prediction, as the official code does
            for row, s in enumerate(g.slots):   # a picture identity's own steps may be pulled toward it
                if s.picture is not None and s.picture.follow != "steps":
                    for r in (row, g.twin_row(s.pos)):
                        if r is not None and r < batch:
                            noise_pred[r] = s.picture.velocity(step, g.latents[r], noise_pred[r])
            g.latents = g.scheduler.step(noise_pred, t, g.latents, return_dict=False)[0]
            self._follow_picture(g, step + 1)
        g.velocity = noise_pred if self._wants and not last else None   # for a callback's x0 / noise_pred
