"""Story images: the official ``background#character#action`` prompt convention.

CharaConsist's prompts are written as three fields. The background field gives the mask's background text
span; character and action together give the foreground span (official code: the action words count as
foreground). The prompt the model sees is the three fields joined by single spaces (the official code
concatenates the raw strings; joining with a space keeps ``park#a cat#sits`` readable and changes nothing
for fields that already end in a space or comma).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
        if not self.character.strip():
            raise ValueError(f"StoryImage: the character field is empty in {self.spec()!r}; every image needs one.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 16):
                raise ValueError(f"StoryImage: {name}={value} is not a positive multiple of 16 in {self.spec()!r}.")

    @classmethod
    def parse(cls, line: str, **overrides) -> StoryImage:
        """Parse ``background#character#action`` (exactly two ``#``)."""
        parts = line.split("#")
        if len(parts) != 3:
            raise ValueError(
                f"prompt {line!r} has {len(parts) - 1} '#' but needs exactly two: background#character#action")
        return cls(*(p.strip() for p in parts), **overrides)

    @classmethod
    def coerce(cls, value: str | StoryImage) -> StoryImage:
        return value if isinstance(value, StoryImage) else cls.parse(value)

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
