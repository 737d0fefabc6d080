"""The interface between the engine and a consistency method, and plain FLUX as the ``vanilla`` method.

A method sees the chunk through ``Run`` and every attention layer through ``AttnCall``; it returns the
attention output of the layer, (B, S, H*D). Between steps it may update its own state (masks, matches).
Options are a dataclass ``Config``; unknown option names raise with the list of valid ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from ..engine import AttnCall, Phase, Run
from ..story import StoryImage


@dataclass
class VanillaConfig:
    """Plain FLUX: no options."""


def uses_block(blocks: str, kind: str) -> bool:
    """Whether a layer of ``kind`` ("single"/"double") is in the ``blocks`` selection."""
    if blocks not in ("single", "double", "all"):
        raise ValueError(f"blocks={blocks!r}; valid: 'single', 'double', 'all'")
    return blocks == "all" or blocks == kind


VOLATILE_BACKENDS = ("flash", "default")


def use_volatile_backend(run: Run, backend: str) -> None:
    """Check a method's ``volatile_backend`` option and hand it to the engine (``AttnCall.attend``)."""
    if backend not in VOLATILE_BACKENDS:
        raise ValueError(f"volatile_backend={backend!r}; valid: {', '.join(map(repr, VOLATILE_BACKENDS))}")
    run.volatile_backend = backend


def rescale_step(value: int, num_steps: int, schedule_steps: int | None) -> int:
    """A step option written for ``schedule_steps`` steps, at the same fraction of a ``num_steps`` run:
    ``round(value * num_steps / schedule_steps)`` (CharaConsist's ``step_schedule`` rule; None: as given)."""
    if not schedule_steps or num_steps == schedule_steps:
        return int(value)
    return int(round(value * num_steps / schedule_steps))


_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), independent of Python's hash randomization."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


SEEDINGS = ("shared", "per_image")


def story_seeds(seed: int, num_images: int, seeding: str) -> list[int]:
    """The noise seeds of a story's images (identity first) from one seed, by a seeding convention.

    ``"shared"``: every image starts from the same noise (CharaConsist's official convention: seed 2025 for the
    identity, its pre-runs and its frames). ``"per_image"``: every image its own noise, as ConsiStory
    (``create_latents`` draws one latent per prompt from one generator, ``same_latent=False``) and StoryDiffusion
    (one generator for the identity batch, continued by the frames) do; here the identity keeps ``seed`` and
    frame k gets ``mix_seed(seed, k)``, so the identity starts from the same noise under both conventions.
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding={seeding!r}; valid: {', '.join(map(repr, SEEDINGS))}")
    if seeding == "shared":
        return [int(seed)] * num_images
    return [int(seed)] + [mix_seed(seed, k) for k in range(1, num_images)]


class Method:
    """Base class: plain attention everywhere, one final pass."""

    name = "vanilla"
    Config = VanillaConfig
    seeding = "shared"   # the official noise convention of a story generated from one seed (``story_seeds``)

    def __init__(self, **options):
        valid = {f.name for f in fields(self.Config)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; valid options: {sorted(valid)}")
        self.config = self.Config(**options)

    def settings(self) -> dict:
        return asdict(self.config)

    def phases(self, num_steps: int) -> list[Phase]:
        return [Phase("main", num_steps, final=True)]

    def twin_steps(self, phase: Phase) -> int:
        """Run a plain "vanilla twin" of every image in the same batch for the first N steps of ``phase``.

        Twin rows follow the slots' rows (``Group.twin_row``); the method must give them plain attention.
        They start from the same noise, so they reproduce plain FLUX exactly while they run.
        """
        return 0

    def twins_follow(self, phase: Phase) -> bool:
        """Whether the twins restart every step from their images' current latents.

        False: each twin denoises on its own, a plain trajectory from the shared noise (StorySync's vanilla pass).
        True: at every step the twin rows take the images' latents before the forward, so a twin's activations
        are those of a plain forward on the image's current latents (ConsiStory's vanilla query pass); the
        twins' own scheduler steps are then discarded.
        """
        return False

    def dependencies(self, images: list[StoryImage], k: int) -> set[int]:
        """Story indices (besides the identity) that must run in the same chunk as image ``k``."""
        return set()

    def start(self, run: Run) -> None:
        """Called once per chunk before the first step."""

    def begin_step(self, run: Run) -> None:
        """Called before each step (``run.phase``, ``run.step`` are set)."""

    def attention(self, call: AttnCall) -> torch.Tensor:
        return call.plain()

    def end_step(self, run: Run) -> None:
        """Called after every group has run this step."""

    def results(self, run: Run) -> dict[int, dict]:
        """Per chunk position: optional ``mask`` (bool numpy grid) and ``matches``."""
        return {}


class Vanilla(Method):
    """Plain FLUX.1: every image generated independently (the baseline of every comparison)."""
