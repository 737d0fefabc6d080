"""The toy benchmark's stories: a fixed seeded suite, or any story file written in the toy vocabulary.

A story is one identity image and its frames, all of the same character kind. Three modes, a third each:

- ``fixed``: every frame keeps the identity's scene; the actions vary.
- ``changing``: every frame is in another scene than the identity; consecutive frames differ.
- ``mixed``: some frames keep the identity's scene, others switch, and a switched scene comes back.

Two-character stories (:func:`two_character_suite`, :func:`load_two_stories`) have the same modes; every image
shows the same two characters of different kinds side by side (``world.two_caption``, 128x256).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..story import StoryImage
from ..storyfile import StoryError, load_story
from . import world

MODES = ("fixed", "changing", "mixed")
SUITE_SEED = 2025


@dataclass(frozen=True)
class ToyStory:
    """An identity and its frames; ``truth`` gives (scene, kind, action) of each image, identity first."""

    name: str
    mode: str
    identity: StoryImage
    frames: tuple[StoryImage, ...]
    seed: int = 0       # offset added to the run's base seed

    @property
    def images(self) -> list[StoryImage]:
        return [self.identity, *self.frames]

    @property
    def truth(self) -> list[tuple[str, str, str]]:
        return [world.parse_caption(im.spec()) for im in self.images]


def _image(scene: str, kind: str, action: str) -> StoryImage:
    return StoryImage.parse(world.caption(scene, kind, action))


def _frame_scenes(mode: str, home: str, rng: np.random.Generator, n: int) -> list[str]:
    others = [s for s in world.SCENES if s != home]
    if mode == "fixed":
        return [home] * n
    if mode == "changing":                      # never home, no scene twice in a row
        out: list[str] = []
        while len(out) < n:
            choices = [s for s in others if not out or s != out[-1]]
            out.append(str(rng.choice(choices)))
        return out
    while True:                                 # mixed: home and away frames, an away scene repeated
        away = [str(s) for s in rng.choice(others, size=2, replace=False)]
        pool = [home, home, away[0], away[0]] if rng.random() < 0.5 else [home, away[0], away[0], away[1]]
        pool = (pool * n)[:n] if n != 4 else pool
        out = [str(s) for s in rng.permutation(pool)]
        if home in out and any(s != home for s in out):
            return out


def make_suite(n_per_mode: int = 20, frames: int = 4, seed: int = SUITE_SEED) -> list[ToyStory]:
    """The fixed suite: ``n_per_mode`` stories per mode (60 by default), interleaved fixed, changing, mixed.

    Kinds cycle through :data:`world.KINDS` in each mode; identity scenes and actions are drawn from ``seed``; frame actions
    are distinct within a story (drawn without replacement from the 6 actions).
    """
    rng = np.random.default_rng(seed)
    kinds = list(world.KINDS)
    stories = []
    for i in range(n_per_mode):
        for m, mode in enumerate(MODES):
            k = len(stories)
            kind = kinds[(i + m) % len(kinds)]          # every mode sees every kind
            home = str(rng.choice(list(world.SCENES)))
            actions = [str(a) for a in rng.choice(list(world.ACTIONS), size=frames + 1, replace=frames + 1 > 6)]
            scenes = _frame_scenes(mode, home, rng, frames)
            stories.append(ToyStory(
                name=f"{mode}-{i:02d}", mode=mode, identity=_image(home, kind, actions[0]),
                frames=tuple(_image(s, kind, a) for s, a in zip(scenes, actions[1:], strict=True)), seed=k))
    return stories


HELDOUT_SEED = 4242
HELDOUT_OFFSET = 1000


def heldout_suite(n_per_mode: int = 20) -> list[ToyStory]:
    """A second suite of the same form that no setting was tuned on: other stories (drawn from ``HELDOUT_SEED``)
    and other noise (seed offsets from ``HELDOUT_OFFSET``), named ``heldout-<mode>-NN``."""

    return [replace(s, name=f"heldout-{s.name}", seed=HELDOUT_OFFSET + s.seed)
            for s in make_suite(n_per_mode, seed=HELDOUT_SEED)]


REDUCED_PER_MODE = 3


def reduced_suite(n_per_mode: int = REDUCED_PER_MODE) -> list[ToyStory]:
    """The CPU subset: the first ``n_per_mode`` stories of each mode of :func:`make_suite` (9 by default).

    Three per mode is one story per mode and kind (kinds cycle within a mode), and the stories keep their names
    and seed offsets from the full suite, so their results are the full run's for the same stories. It is sized
    to run ``vanilla,characonsist`` on the toy model in under 5 minutes on a 2-core CPU (docs/TOY_WORLD.md).
    """
    return make_suite()[:n_per_mode * len(MODES)]


def story_mode(truth: list[tuple[str, str, str]]) -> str:
    """``fixed`` if every frame keeps the identity's scene, ``changing`` if none does, else ``mixed``."""
    home = truth[0][0]
    keep = [t[0] == home for t in truth[1:]]
    return "fixed" if all(keep) else "changing" if not any(keep) else "mixed"


def _read_groups(path: str | Path, parse, other, hint: str, check_kinds, make) -> list:
    """The groups of a story file, each image read by ``parse`` (a caption's truth); an image that only ``other``
    reads gets ``hint``; ``check_kinds(truth, where)`` lists a group's kind problems; ``make(group, index,
    truth)`` builds a story. All problems are raised at once (``StoryError``) with their places."""

    story = load_story(path)
    problems: list[str] = []
    out = []
    for gi, group in enumerate(story.groups):
        truth = []
        for img, where in zip(group.images, group.where, strict=True):
            try:
                truth.append(parse(img.spec()))
            except ValueError as e:
                try:
                    other(img.spec())
                    problems.append(f"{where}: {e} ({hint})")
                except ValueError:
                    problems.append(f"{where}: {e}")
        if len(truth) != len(group.images):
            continue
        if len(truth) < 2:
            problems.append(f"{group.where[0]}: a toy story needs an identity and at least one frame")
        problems += check_kinds(truth, group.where)
        out.append(make(group, gi, truth))
    if problems:
        raise StoryError(problems)
    return out


def load_stories(path: str | Path) -> list[ToyStory]:
    """Stories from a story file (official text format, or the structured YAML/TOML of ``storyfile``).

    Every image must be in the toy vocabulary (:mod:`characonsist.toy.world`) and the frames' kind must be
    the identity's; all problems are reported at once with their places.
    """
    def kinds(truth, where):
        if any(t[1] != truth[0][1] for t in truth):
            return [f"{where[0]}: every image of a story must show the identity's kind ({world.KINDS[truth[0][1]]!r})"]
        return []

    return _read_groups(path, world.parse_caption, world.parse_two_caption,
                        "a two-character image: `characonsist bench toy --two-characters` runs such stories", kinds,
                        lambda group, gi, truth: ToyStory(name=group.name or f"story-{gi:02d}", mode=story_mode(truth),
                                                          identity=group.identity, frames=tuple(group.frames), seed=gi))


def write_stories(stories: list[ToyStory], path: str | Path) -> None:
    """Write stories in the official text format (one ``bg#fg#act`` per line, a blank line between stories)."""
    Path(path).write_text("\n\n".join("\n".join(im.spec() for im in s.images) for s in stories) + "\n")


# ---------------------------------------------------------------- two characters in one image

TWO_SEED = 2626
TWO_OFFSET = 2000
TWO_PER_MODE = 12
# ordered pairs of two different kinds: the first is named first and drawn in the left half
KIND_PAIRS: tuple[tuple[str, str], ...] = tuple((a, b) for a in world.KINDS for b in world.KINDS if a != b)


@dataclass(frozen=True)
class ToyTwoStory(ToyStory):
    """An identity image and its frames, each showing the same two characters of different kinds
    (``world.two_caption``); ``truth`` gives (scene, (kind, kind), (action, action)) of each image, identity first."""

    @property
    def truth(self) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
        return [world.parse_two_caption(im.spec()) for im in self.images]

    @property
    def kinds(self) -> tuple[str, str]:
        """The two characters' kinds, in the identity's order (first = named first, drawn on the left)."""
        return self.truth[0][1]


def _two_image(scene: str, kinds: tuple[str, str], actions: tuple[str, str]) -> StoryImage:
    return StoryImage.parse(world.two_caption(scene, kinds, actions))


def two_character_suite(n_per_mode: int = TWO_PER_MODE, frames: int = 4, seed: int = TWO_SEED
                        ) -> list[ToyTwoStory]:
    """The two-character suite: ``n_per_mode`` stories per mode (36 by default), interleaved fixed, changing, mixed,
    named ``two-<mode>-NN``.

    Each story shows one pair of kinds in every image, in one order (:data:`KIND_PAIRS` cycle within a mode, so
    every mode sees every ordered pair twice by default); scenes follow the mode as in :func:`make_suite`; each
    character gets its own actions, distinct within the story (drawn without replacement from the 6). The unnamed
    attributes are the model's to choose (the oracle draws each character's independently). Stories and their
    seed offsets (from ``TWO_OFFSET``) are drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    stories = []
    for i in range(n_per_mode):
        for m, mode in enumerate(MODES):
            k = len(stories)
            kinds = KIND_PAIRS[(i + m) % len(KIND_PAIRS)]
            home = str(rng.choice(list(world.SCENES)))
            acts = [[str(a) for a in rng.choice(list(world.ACTIONS), size=frames + 1, replace=frames + 1 > 6)]
                    for _ in kinds]
            scenes = _frame_scenes(mode, home, rng, frames)
            images = [_two_image(sc, kinds, (a, b)) for sc, a, b in zip([home, *scenes], *acts, strict=True)]
            stories.append(ToyTwoStory(name=f"two-{mode}-{i:02d}", mode=mode, identity=images[0],
                                       frames=tuple(images[1:]), seed=TWO_OFFSET + k))
    return stories


def load_two_stories(path: str | Path) -> list[ToyTwoStory]:
    """Two-character stories from a story file (as :func:`load_stories`): every image a two-character caption
    (``world.parse_two_caption``) and every frame the identity's two kinds (in either order); all problems at once."""
    def kinds(truth, where):
        return [f"{w}: every image of a story must show the identity's two kinds "
                f"({' and '.join(world.KINDS[k] for k in truth[0][1])})"
                for t, w in zip(truth[1:], where[1:], strict=True) if sorted(t[1]) != sorted(truth[0][1])]

    return _read_groups(path, world.parse_two_caption, world.parse_caption,
                        "one character: every image of a --two-characters story shows two, e.g. "
                        "'beach#cat and robot#small-left and big-right'", kinds,
                        lambda group, gi, truth: ToyTwoStory(name=group.name or f"story-{gi:02d}",
                                                             mode=story_mode(truth), identity=group.identity,
                                                             frames=tuple(group.frames), seed=gi))
