"""The identity from a picture: its row of the lockstep batch follows the picture's latents, step by step.

FLUX is a rectified flow: a latent at noise level sigma is ``x = (1 - sigma) x0 + sigma eps`` and the model predicts
the velocity ``v = dx/dsigma`` (``eps - x0``); the sampler (``FlowMatchEulerDiscreteScheduler``) steps
``x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k, sigma_k)`` from sigma_0 = 1 to sigma_N = 0. For a picture x0 (its
VAE latents) the identity's row must be, at step k, a latent the model would have there on its way to x0. Modes
(``InversionConfig.mode``), all along the sampler's own sigmas:

- ``euler`` (default): plain Euler inversion of the flow ODE, from x0 at sigma = 0 up to sigma = 1, the velocity
  taken at the current point: ``x_k = x_{k+1} + (sigma_k - sigma_{k+1}) v(x_{k+1}, sigma_{k+1})``. N model calls.
- ``renoise``: ``x_k = (1 - sigma_k) x0 + sigma_k eps``, eps the identity's own seed noise: the flow's forward
  process, no model call. At the end (sigma_N = 0) the row is x0 exactly.
- ``fireflow``: FireFlow (Deng et al., 2024, arXiv 2412.07517), a midpoint step whose first velocity is the previous
  step's midpoint velocity, reused: ``m = x + (h/2) v_prev``, ``v_prev <- v(m, sigma + h/2)``, ``x <- x + h v_prev``
  (second order at Euler's cost: N + 1 model calls).
- ``rf``: RF-Inversion's controlled forward ODE (Rout et al., 2024, arXiv 2410.10792, Eq. 8): the model's velocity
  pulled toward the straight path to the noise eps, ``v + gamma ((eps - x) / (1 - sigma) - v)``, Euler steps.
  ``gamma = 0`` is ``euler`` and ``gamma = 1`` is ``renoise`` exactly (both are tested).

The inversions use the identity's prompt and the run's guidance, with plain attention (the stock processors: no
method acts), before the story's passes; the story then runs as usual. How the row follows (``follow``):

- ``"steps"`` (default): the row is put on the path at every step (after each scheduler step, so callbacks and
  later passes see it there); the method's attention changes nothing of it. The output identity is the path's
  end, the picture's own latents: the reconstruction is the VAE's round trip.
- ``"start"``: the row starts from the inverted noise (``x_0`` of the path) and then takes the model's own steps in
  the batch, as classic inversion-and-regeneration does; ``eta`` > 0 pulls those steps toward the picture for the
  first ``eta_end`` of the run (RF-Inversion's reverse controller, ``v + eta ((x - x0) / sigma - v)``). The output
  identity is what the model made of it (a method that changes its identity changes it too).

Every backbone here (FLUX.1, Chroma, FLUX.2 [klein]) is such a flow; what differs (the picture's latents, the
sigmas, the model call and its guidance) is the backbone adapter's (``prepare_picture_row``).

``docs/API.md`` ("the identity from a picture") and docs/TOY_WORLD.md have the measurements behind the default.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch

from .backbones import backbone_of
from .inputs import InputError, excerpt
from .methods.base import check_config, parse_option

MODES = ("renoise", "euler", "fireflow", "rf")
FOLLOWS = ("steps", "start")


@dataclass
class InversionConfig:
    """How the identity's row follows its picture (module docstring)."""

    mode: str = "euler"         # renoise | euler | fireflow | rf (docs/API.md: the measurement behind the default)
    follow: str = "steps"       # steps: on the path at every step; start: from the inverted noise, then free
    gamma: float = 0.5          # rf: pull toward the straight path to the noise (RF-Inversion's gamma)
    eta: float = 0.0            # follow="start": pull of the model's own steps toward the picture (RF-Inversion's eta)
    eta_end: float = 0.25       # ... for this fraction of the steps (RF-Inversion's stopping time tau)

    def __post_init__(self):
        problems = []
        if self.mode == "renoise" and self.follow == "start":
            problems.append("inversion mode 'renoise' follows the picture at every step (follow=steps); "
                            "follow=start needs an inversion (euler, fireflow or rf)")
        check_config(self, ranges={"gamma": (0.0, 1.0), "eta": (0.0, 1.0), "eta_end": (0.0, 1.0)},
                     choices={"mode": MODES, "follow": FOLLOWS}, problems=problems)

    def spec(self) -> str:
        """The text form (``parse_inversion`` reads it back): the mode, then the options that differ from their
        defaults, ``:``-separated, e.g. ``rf:gamma=0.7`` or ``euler:follow=start``."""
        default = InversionConfig()
        extra = [f"{f.name}={getattr(self, f.name):g}" if isinstance(getattr(self, f.name), float)
                 else f"{f.name}={getattr(self, f.name)}"
                 for f in fields(self) if f.name != "mode" and getattr(self, f.name) != getattr(default, f.name)]
        return ":".join([self.mode, *extra])

    def settings(self) -> dict:
        return asdict(self)


def parse_inversion(value) -> InversionConfig:
    """An ``InversionConfig`` from itself, None (the default), a dict of options, or text ``MODE[:KEY=VALUE...]``
    (``euler``, ``rf:gamma=0.7``, ``euler:follow=start:eta=0.5``). Raises InputError listing every problem."""
    if value is None:
        return InversionConfig()
    if isinstance(value, InversionConfig):
        return value
    if isinstance(value, dict):
        options = dict(value)
    elif isinstance(value, str):
        mode, *rest = [p.strip() for p in value.split(":")]
        options = {"mode": mode}
        for item in rest:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise InputError(f"inversion {excerpt(value)}: {excerpt(item)} is not KEY=VALUE "
                                 "(e.g. rf:gamma=0.7 or euler:follow=start)")
            options[key.strip()] = parse_option(InversionConfig, key.strip(), text)
    else:
        raise InputError(f"inversion: expected a mode name ({', '.join(MODES)}), 'MODE:KEY=VALUE...', a dict or an "
                         f"InversionConfig, got {type(value).__name__} {excerpt(value)}")
    valid = [f.name for f in fields(InversionConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"inversion: no option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
    try:
        return InversionConfig(**options)
    except InputError as e:
        raise InputError([f"inversion: {p}" for p in e.problems]) from None


# ---------------------------------------------------------------------------------------------- the row

@dataclass
class PictureRow:
    """Where the identity's row is at every step (``Slot.picture``; the engine reads ``at``, ``follow`` and
    ``velocity``). Tensors are float32, packed ``(1, tokens, channels)``; ``sigmas`` has N + 1 values (last 0)."""

    config: InversionConfig
    latents: torch.Tensor           # x0: the picture's latents
    noise: torch.Tensor             # eps: the identity's seed noise
    sigmas: torch.Tensor
    path: list[torch.Tensor] | None = None   # inverted latents at sigmas[k], k = 0..N (path[N] = x0)

    @property
    def follow(self) -> str:
        return self.config.follow

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def at(self, k: int) -> torch.Tensor:
        """The row's latents at step ``k`` (before the forward of step k; k = N: the end)."""
        if self.path is not None:
            return self.path[k]
        sigma = float(self.sigmas[k])
        if sigma == 0.0:
            return self.latents.clone()
        return (1.0 - sigma) * self.latents + sigma * self.noise

    def velocity(self, k: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The velocity the row steps with at step ``k`` when it denoises on its own (``follow="start"``): the
        model's ``v``, pulled toward the straight path to the picture by ``eta`` on the first ``eta_end`` of the run
        (RF-Inversion's reverse controller); ``v`` unchanged otherwise."""
        cfg = self.config
        sigma = float(self.sigmas[k])
        if cfg.eta <= 0 or k >= round(cfg.eta_end * self.num_steps) or sigma <= 0:
            return v
        x0 = self.latents[0].to(v.device, torch.float32)
        target = (x.float() - x0) / sigma
        return (v.float() + cfg.eta * (target - v.float())).to(v.dtype)


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def invert(velocity: VelocityFn, x0: torch.Tensor, sigmas: torch.Tensor, config: InversionConfig,
           noise: torch.Tensor | None = None, progress: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The inverted path ``[x at sigmas[0], ..., x at sigmas[N] = x0]`` of ``x0`` (float32) along ``sigmas``
    (descending, last 0), by ``config.mode`` (module docstring). ``velocity(x, sigma)`` is the model's prediction;
    ``noise`` is the target of ``rf``. ``progress()`` is called after every step."""
    n = len(sigmas) - 1
    s = [float(v) for v in sigmas]
    path: list[torch.Tensor | None] = [None] * (n + 1)
    x = x0.float()
    path[n] = x.clone()
    reused = None                                   # fireflow: the previous step's midpoint velocity
    for k in range(n - 1, -1, -1):                 # from sigma_{k+1} up to sigma_k
        here, h = s[k + 1], s[k] - s[k + 1]
        if config.mode == "fireflow":
            v = reused if reused is not None else velocity(x, here).float()
            reused = velocity(x + 0.5 * h * v, here + 0.5 * h).float()
            x = x + h * reused
        elif config.mode in ("euler", "rf"):
            v = velocity(x, here).float()
            if config.mode == "rf" and config.gamma > 0:
                toward_noise = (noise.float() - x) / max(1.0 - here, 1e-6)
                v = v + config.gamma * (toward_noise - v)
            x = x + h * v
        else:
            raise ValueError(f"invert: mode {config.mode!r} is not an inversion (valid: euler, fireflow, rf)")
        path[k] = x.clone()
        if progress is not None:
            progress()
    return path


def inversion_calls(config: InversionConfig, num_steps: int) -> int:
    """Model calls the inversion makes (0 for ``renoise``; FireFlow one more than Euler)."""
    return 0 if config.mode == "renoise" else num_steps + (config.mode == "fireflow")


# ---------------------------------------------------------------------------------------------- with a pipeline

class _StockLayers:
    """What ``Backbone.velocity`` needs of an engine for a pass with the stock attention processors (the inversion
    runs before the engine installs its own): the pipeline, and a negative-prompt pass that is plain already."""

    def __init__(self, pipe):
        self.pipe = pipe

    @contextmanager
    def plain_pass(self):
        yield


@torch.no_grad()
def encode_picture(pipe, image, device) -> torch.Tensor:
    """The packed latents ``(1, tokens, channels)`` of a fitted RGB picture, float32, by the pipeline's backbone
    (``Backbone.encode_picture``: FLUX.1 and Chroma the VAE posterior's mode, then FLUX's shift and scale, packed
    2x2; klein its reference-image encoding)."""
    return backbone_of(pipe).encode_picture(pipe, image, device).float()


@torch.no_grad()
def prepare_picture_row(pipe, image, config: InversionConfig, *, prompt: str, height: int, width: int,
                        num_inference_steps: int, guidance_scale: float, max_sequence_length: int, seed: int | None,
                        progress=None) -> PictureRow:
    """Encode the fitted ``image`` and, for an inversion mode, invert it with the pipeline's model (``prompt``, the
    run's guidance, plain attention); returns the ``PictureRow`` the engine follows. ``progress`` (the pipeline's
    step bars) gets one "inversion" pass of ``num_inference_steps`` steps.

    Everything model-specific is the backbone adapter's (``characonsist.backbones``): the seed noise and positions
    (``latents``), the picture's latents (``encode_picture``), the sigmas (``schedule``), the prompt (``encode``) and
    the model call with its guidance (``velocity``; a negative-prompt pass where the model runs real guidance)."""
    from .engine import Phase

    backbone = backbone_of(pipe)
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    gen = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
    noise, img_ids = backbone.latents(pipe, height, width, dtype, device, gen)
    x0 = encode_picture(pipe, image, device)
    sched, _ = backbone.schedule(pipe.scheduler, num_inference_steps, x0.shape[1], device)
    sigmas = sched.sigmas.detach().float().cpu()
    row = PictureRow(config, x0.float(), noise.float(), sigmas)
    if config.mode == "renoise":
        return row
    text = backbone.encode(pipe, [prompt], max_sequence_length, device, guidance_scale)
    layers = _StockLayers(pipe)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full([1], float(sigma) * 1000, device=x.device, dtype=torch.float32)   # the scheduler's timestep
        return backbone.velocity(layers, x.to(dtype), t, text, img_ids, guidance_scale)

    step = None
    if progress is not None:
        progress.start_phase(Phase("inversion", num_inference_steps, final=False))
        step = progress.update
    row.path = invert(velocity, x0, sigmas, config, noise, step)
    return row
