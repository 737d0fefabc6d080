"""Story images: the official ``background#character#action`` prompt convention.

CharaConsist's prompts are written as three fields. The background field gives the mask's background text
span; character and action together give the foreground span (official code: the action words count as
foreground). The prompt the model sees is the three fields joined by single spaces (the official code
concatenates the raw strings; joining with a space keeps ``park#a cat#sits`` readable and changes nothing
for fields that already end in a space or comma).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import asdict, dataclass

from .inputs import InputError, excerpt, is_int, seed_problem, size_problem, text_problem


@dataclass(frozen=True)
class StoryImage:
    """One image of a story group: the identity (first) or a frame.

    ``seed``, ``height`` and ``width`` override the call's defaults for this image only.
    """

    background: str
    character: str
    action: str = ""
    seed: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        problems = []
        for name in ("background", "character", "action"):
            problems.append(text_problem(f"StoryImage: {name}", getattr(self, name)))
        problems = [p for p in problems if p]
        if not problems and not self.character.strip():
            problems.append(f"StoryImage: the character field is empty in {excerpt(self.spec())}; every image "
                            "needs one.")
        if self.seed is not None:
            problems.append(seed_problem("StoryImage: seed", self.seed))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                problems.append(size_problem(f"StoryImage: {name}", value))
        problems = [p for p in problems if p]
        if problems:
            raise InputError(problems)
        for name in ("seed", "height", "width"):   # numpy integers -> int (JSON, torch seeds)
            value = getattr(self, name)
            if is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))

    @classmethod
    def parse(cls, line: str, **overrides) -> StoryImage:
        """Parse ``background#character#action`` (exactly two ``#``)."""
        parts = line.split("#")
        if len(parts) != 3:
            raise InputError(f"prompt {excerpt(line)} has {len(parts) - 1} '#' but needs exactly two: "
                             "background#character#action")
        return cls(*(p.strip() for p in parts), **overrides)

    @classmethod
    def coerce(cls, value: str | StoryImage) -> StoryImage:
        """A StoryImage as is, or one parsed from a ``background#character#action`` string."""
        if isinstance(value, StoryImage):
            return value
        if not isinstance(value, str):
            raise InputError(f"expected a 'background#character#action' string or a StoryImage, got "
                             f"{type(value).__name__} {excerpt(value)}")
        return cls.parse(value)

    @property
    def prompt(self) -> str:
        """The text the model sees: the three fields joined by single spaces."""
        return " ".join(p.strip() for p in (self.background, self.character, self.action) if p.strip())

    @property
    def foreground(self) -> str:
        return " ".join(p.strip() for p in (self.character, self.action) if p.strip())

    def spec(self) -> str:
        return f"{self.background}#{self.character}#{self.action}"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def coerce_images(identity, frames) -> list[StoryImage]:
    """``[identity, *frames]`` as StoryImages; every problem at once, each with its place."""
    problems, images = [], []
    if isinstance(frames, (str, bytes)) or isinstance(frames, StoryImage):
        raise InputError(f"frames must be a list of images ('background#character#action' strings or StoryImage), "
                         f"got one {type(frames).__name__} {excerpt(frames)}; for a single frame pass [frame]")
    if frames is None:
        frames = []
    if isinstance(frames, (Mapping, Set)):   # iterating them gives keys / an arbitrary order, never the frames meant
        raise InputError(f"frames must be a list of images ('background#character#action' strings or StoryImage), "
                         f"got a {type(frames).__name__} {excerpt(frames)}")
    if not isinstance(frames, Iterable):
        raise InputError(f"frames must be a list of images, got {type(frames).__name__} {excerpt(frames)}")
    for place, value in [("identity", identity), *((f"frames[{i}]", f) for i, f in enumerate(frames))]:
        try:
            images.append(StoryImage.coerce(value))
        except (TypeError, ValueError) as e:
            problems.append(f"{place}: {e}")
    if problems:
        raise InputError(problems)
    return images
