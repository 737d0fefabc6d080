"""The interface between the engine and a consistency method, and plain FLUX as the ``vanilla`` method.

A method sees the chunk through ``Run`` and every attention layer through ``AttnCall``; it returns the
attention output of the layer, (B, S, H*D). Between steps it may update its own state (masks, matches).
Options are a dataclass ``Config``; unknown option names raise with the list of valid ones.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, fields

import torch

from ..engine import AttnCall, Phase, Run
from ..inputs import InputError, excerpt, is_int, is_number
from ..seeds import SEEDINGS, mix_seed, story_seeds  # noqa: F401  (the seed rule, re-exported for the methods)
from ..story import StoryImage

BLOCKS = ("single", "double", "all")
VOLATILE_BACKENDS = ("flash", "default")


@dataclass
class VanillaConfig:
    """Plain FLUX: no options."""


def option_types(config_class) -> dict[str, tuple[type, bool]]:
    """Field name -> (bool | int | float | str, whether None is allowed), from the Config's annotations."""
    hints = typing.get_type_hints(config_class)
    out = {}
    for f in fields(config_class):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        kinds = [a for a in args if a is not type(None)]
        out[f.name] = (kinds[0] if len(kinds) == 1 else object, type(None) in args)
    return out


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def check_config(config, ranges: dict[str, tuple] | None = None, choices: dict[str, tuple] | None = None,
                 order: list[tuple[str, str]] | None = None, problems: list[str] | None = None,
                 steps: dict[str, bool] | None = None) -> None:
    """Check a method Config in its ``__post_init__``: every option's type (from its annotation), finite numbers,
    ``ranges`` ({name: (low, high)}, inclusive, None = open), ``choices`` ({name: valid values}), ``order``
    ((a, b): a <= b, e.g. a step range's start and end) and ``steps`` ({name: at}: a step option written for
    ``config.schedule_steps`` steps lies inside that schedule: ``< schedule_steps`` for a step something happens
    *at* (``at=True``), ``<= schedule_steps`` for a range's start or end). Raises one InputError listing every
    problem.

    Integers are accepted where a float is expected (and stored as float); numpy scalars become Python ones."""
    problems = list(problems or [])
    ranges, choices = ranges or {}, choices or {}
    for name, (kind, optional) in option_types(type(config)).items():
        value = getattr(config, name)
        if value is None:
            if not optional:
                problems.append(f"option {name}=None: must be {_TYPE_WORDS.get(kind, kind.__name__)}")
            continue
        ok = {bool: lambda v: isinstance(v, bool), int: is_int, float: is_number,
              str: lambda v: isinstance(v, str)}.get(kind, lambda v: True)(value)
        if not ok:
            problems.append(f"option {name}={excerpt(value)}: must be {_TYPE_WORDS.get(kind, kind.__name__)}"
                            + (" or None" if optional else ""))
            continue
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                problems.append(f"option {name}={value}: must be a finite number")
                continue
        elif kind is int:
            value = int(value)
        setattr(config, name, value)
        if name in ranges:
            low, high = ranges[name]
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = (f"in [{_num(low)}, {_num(high)}]" if low is not None and high is not None
                          else f">= {_num(low)}" if low is not None else f"<= {_num(high)}")
                problems.append(f"option {name}={value}: must be {bounds}")
        if name in choices and value not in choices[name]:
            problems.append(f"option {name}={excerpt(value)}: valid: {', '.join(map(repr, choices[name]))}")
    schedule = getattr(config, "schedule_steps", None)
    for name, at in (steps or {}).items():
        value = getattr(config, name)
        if is_int(schedule) and is_int(value) and (value >= schedule if at else value > schedule):
            bound = f"< {schedule}" if at else f"<= {schedule}"
            problems.append(f"option {name}={value}: the step options are written for schedule_steps={schedule} "
                            f"steps (and rescaled to the run's), so it must be {bound}; or set schedule_steps")
    for a, b in order or []:
        va, vb = getattr(config, a), getattr(config, b)
        if is_number(va) and is_number(vb) and va > vb:
            problems.append(f"options {a}={va} and {b}={vb}: {a} must not be after {b}")
    if problems:
        raise InputError(problems)


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_option(config_class, name: str, text: str):
    """An option value given as text (``--option KEY=VALUE``, a web form) in the option's type; text that does
    not convert is returned as is, so that the Config's own check reports it (one message for every front end)."""
    kind, optional = option_types(config_class).get(name, (str, False))
    word = text.strip().lower()
    if optional and word in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "on": True,
                    "false": False, "0": False, "no": False, "off": False}[word]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except (KeyError, ValueError):
        return text
    return text


def uses_block(blocks: str, kind: str) -> bool:
    """Whether a layer of ``kind`` ("single"/"double") is in the ``blocks`` selection."""
    if blocks not in BLOCKS:
        raise InputError(f"blocks={excerpt(blocks)}; valid: {', '.join(map(repr, BLOCKS))}")
    return blocks == "all" or blocks == kind


def use_volatile_backend(run: Run, backend: str) -> None:
    """Hand a method's ``volatile_backend`` option (checked by its Config) to the engine (``AttnCall.attend``)."""
    if backend not in VOLATILE_BACKENDS:
        raise InputError(f"volatile_backend={excerpt(backend)}; valid: {', '.join(map(repr, VOLATILE_BACKENDS))}")
    run.volatile_backend = backend


def rescale_step(value: int, num_steps: int, schedule_steps: int | None) -> int:
    """A step option written for ``schedule_steps`` steps, at the same fraction of a ``num_steps`` run:
    ``round(value * num_steps / schedule_steps)`` (CharaConsist's ``step_schedule`` rule; None: as given)."""
    if not schedule_steps or num_steps == schedule_steps:
        return int(value)
    return int(round(value * num_steps / schedule_steps))


class Method:
    """Base class: plain attention everywhere, one final pass."""

    name = "vanilla"
    Config = VanillaConfig
    seeding = "shared"   # the official noise convention of a story generated from one seed (``story_seeds``)

    def __init__(self, **options):
        valid = [f.name for f in fields(self.Config)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise InputError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; valid options: "
                             f"{', '.join(valid) or 'none'}")
        try:
            self.config = self.Config(**options)
        except InputError as e:
            raise InputError([f"method {self.name!r}: {p}" for p in e.problems]) from None

    @classmethod
    def from_config(cls, config) -> Method:
        """A method of an already checked ``Config`` (e.g. ``app.settings.StorySettings.method_config``): the
        options are not read or checked again."""
        if not isinstance(config, cls.Config):
            raise TypeError(f"method {cls.name!r} takes a {cls.Config.__name__}, not {type(config).__name__}")
        method = cls.__new__(cls)
        method.config = config
        return method

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
