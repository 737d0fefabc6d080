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


class Method:
    """Base class: plain attention everywhere, one final pass."""

    name = "vanilla"
    Config = VanillaConfig

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
