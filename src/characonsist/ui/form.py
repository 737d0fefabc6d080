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

from ..app import StoryRequest, StorySettings, memory_plan
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

    def check(self, names: dict | None = None) -> Loading:
        """The options with their names resolved (``0``-``3`` -> the mode's name), checked before the UI starts:
        InputError for an unknown one, ``auto`` (the UI's stories have no fixed size to plan for), or a mode that
        needs a CUDA GPU where none is visible."""
        mode, gpus = memory_plan.check_memory(self.memory, self.gpu_ids, names)
        quantize = memory_plan.check_quantize(self.quantize, names)
        models.resolve_dtype(self.dtype, names)
        if "auto" in (mode, quantize):
            raise InputError("ui: --memory/--quantize auto plans for one story's size; the UI loads one model for "
                             "stories of any size: give the mode and format (`characonsist generate ... --memory auto` "
                             "prints what it picks for a story)")
        memory_plan.check_memory_device(mode, names)
        return Loading(mode, quantize, bool(self.vae_tiling), ",".join(map(str, gpus)), self.dtype)

    def flags(self, flags: dict[str, str] | None) -> list[str]:
        """The ``characonsist generate`` flags that load the model the same way (those not at their default), named
        by ``flags`` (the command line's table, which ``characonsist ui`` hands over; None: the field names)."""
        default, parts = Loading(), []
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), (flags or {}).get(f.name, f.name)
            if value != getattr(default, f.name):
                parts += [flag] if value is True else [flag, str(value)]
        return parts


# How the page labels the fields it sets, for the application layer's messages (the command line uses its flags).
LABELS = {"method": "Method", "num_inference_steps": "Steps", "guidance_scale": "Guidance", "seed": "Seed",
          "width": "Width", "height": "Height", "inversion": "Picture inversion", "method_options": "More options",
          "out": "the story's folder"}


@dataclass
class Settings:
    """A run's settings as the editor holds them (None = the model's default; option values may stay text): the
    ``StoryRequest`` fields the form sets, under the same names (the UI's JSON, ``StorySettings``, the manifest)."""

    method: str = "characonsist"
    method_options: dict = field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
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
        if values.get("method_options") is None:
            values["method_options"] = {}
        if not isinstance(values.get("method_options", {}), dict):
            raise UiError("settings.method_options: expected a mapping of option names to values")
        return cls(**values)

    @classmethod
    def of(cls, settings: StorySettings) -> Settings:
        """The editor's settings of a run (``StorySettings.from_manifest``): the same fields, by name."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def cli_command(request: StoryRequest, flags: dict[str, str] | None) -> str | None:
    """The ``characonsist generate`` command of a story's request (fields at their defaults left out), written with
    the command line's table of flags (``characonsist ui`` hands it over; None: no command is shown)."""
    if not flags:
        return None
    default = StoryRequest(stories=[], model="", out="")
    parts = ["characonsist", "generate", *map(str, request.stories)]
    options = dict(request.method_options or {})
    for name in flags:    # in the table's order
        value = getattr(request, name, None)
        if value is None or (name not in ("model", "out", "method") and value == getattr(default, name)):
            continue
        if name == "loras":
            parts += [p for lora in value for p in (flags[name], str(lora))]
        elif isinstance(value, bool):
            parts += [flags[name]] if value else []
        else:
            parts += [flags[name], str(value)]
        if name == "method":   # the method's options after it: a flag of their own, else --option KEY=VALUE
            for key, text in options.items():
                if key in flags:
                    on = text in (True, "true", "True", "1")
                    parts.append(flags[key] if on else flags[key].replace("--", "--no-", 1))
                else:
                    parts += ["--option", f"{key}={str(text).lower() if isinstance(text, bool) else text}"]
    return " ".join(shlex.quote(p) for p in parts)


__all__ = ["LABELS", "MAX_SEED", "STORY_FILE", "Loading", "Settings", "UiError", "cli_command", "new_seed"]
