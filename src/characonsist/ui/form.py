"""The UI's form and settings: a run's settings as the editor holds them (``Settings``), how the UI loads its one
model (``Loading``), the ``characonsist generate`` command that re-runs a story from the command line
(``cli_command``), and the error the UI answers with (``UiError``). No threads, no files: the workspace
(``workspace.py``) and the worker (``worker.py``) build on these.
"""

from __future__ import annotations

import dataclasses
import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..app import model as models
from ..inputs import InputError
from ..seeds import DEFAULT_SEED

STORY_FILE = "story.yaml"
MAX_SEED = 2**32 - 1    # re-rolled seeds: small enough to read and type


class UiError(Exception):
    """A request the UI refuses (status 400 unless ``status`` says otherwise), with every problem."""

    def __init__(self, problems: list[str] | str, status: int = 422):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.status = status
        super().__init__("; ".join(self.problems))

def new_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


@dataclass(frozen=True)
class Loading:
    """How the UI loads its one model, the same for every story (``characonsist ui --memory --quantize --vae-tiling
    --gpu-ids --dtype``, as ``characonsist generate`` takes them): what a small GPU needs to run the UI at all."""

    memory: str = "none"
    quantize: str = "none"
    vae_tiling: bool = False
    gpu_ids: str = "0"
    dtype: str = "auto"

    def check(self, ref) -> Loading:
        """The options with their names resolved (``0``-``3`` -> the mode's name), checked before the UI starts:
        InputError for an unknown one, ``auto`` (the UI's stories have no fixed size to plan for), or a mode that
        needs a CUDA GPU where none is visible."""
        mode, gpus = models.check_memory(self.memory, self.gpu_ids)
        quantize = models.check_quantize(self.quantize, ref)
        models.resolve_dtype(self.dtype)
        if "auto" in (mode, quantize):
            raise InputError("ui: --memory/--quantize auto plans for one story's size; the UI loads one model for "
                             "stories of any size: give the mode and format (`characonsist generate ... --memory auto` "
                             "prints what it picks for a story)")
        models.check_memory_device(mode)
        return Loading(mode, quantize, bool(self.vae_tiling), ",".join(map(str, gpus)), self.dtype)

    def flags(self) -> list[str]:
        """The ``characonsist generate`` flags that load the model the same way (those not at their default)."""
        default, parts = Loading(), []
        for name, flag in (("memory", "--memory"), ("quantize", "--quantize"), ("gpu_ids", "--gpu-ids"),
                           ("dtype", "--dtype")):
            if getattr(self, name) != getattr(default, name):
                parts += [flag, str(getattr(self, name))]
        return parts + (["--vae-tiling"] if self.vae_tiling else [])


@dataclass
class Settings:
    """A run's settings as the editor holds them (None = the model's default)."""

    method: str = "characonsist"
    options: dict = field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = DEFAULT_SEED
    save_masks: bool = True
    inversion: str | None = None   # how an identity picture is followed (None: the default, euler)

    @classmethod
    def parse(cls, data) -> Settings:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise UiError("settings: expected a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UiError(f"settings: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        values = {k: (None if v == "" else v) for k, v in data.items()}
        if values.get("seed") is None:
            values.pop("seed", None)
        if values.get("options") is None:
            values["options"] = {}
        if not isinstance(values.get("options", {}), dict):
            raise UiError("settings.options: expected a mapping of option names to values")
        return cls(**values)

    @classmethod
    def from_manifest(cls, settings: dict) -> Settings:
        options = dict(settings.get("method_options") or {})
        return cls(method=settings.get("method", "characonsist"), options=options, height=settings.get("height"),
                   width=settings.get("width"), steps=settings.get("num_inference_steps"),
                   guidance=settings.get("guidance_scale"), seed=settings.get("seed", DEFAULT_SEED),
                   save_masks=bool(settings.get("save_masks", True)), inversion=settings.get("inversion"))


def cli_command(model: str, folder: Path, settings: Settings, loading: Loading | None = None) -> str:
    """The ``characonsist generate`` command that resumes or re-runs this story from the command line."""

    parts = ["characonsist", "generate", str(folder / STORY_FILE), "--model", model, "--out", str(folder),
             "--method", settings.method, *(loading or Loading()).flags()]
    options = dict(settings.options)
    for key, flag in (("share_bg", "share-bg"), ("use_token_merge", "token-merge")):
        if key in options:
            value = options.pop(key)
            parts.append(f"--{flag}" if value in (True, "true", "True", "1") else f"--no-{flag}")
    for key, value in options.items():
        parts += ["--option", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    for flag, value in (("--height", settings.height), ("--width", settings.width), ("--steps", settings.steps),
                        ("--guidance", settings.guidance), ("--seed", settings.seed),
                        ("--inversion", settings.inversion)):
        if value is not None:
            parts += [flag, str(value)]
    if settings.save_masks:
        parts.append("--save-masks")
    return " ".join(shlex.quote(p) for p in parts)


__all__ = ["MAX_SEED", "STORY_FILE", "Loading", "Settings", "UiError", "cli_command", "new_seed"]
