"""Reading a run folder for evaluation: ``manifest.json``, the images it lists, and the method's own masks.

A run folder is what ``characonsist generate`` writes (the UI writes the same form): ``manifest.json`` with
one entry per group (``identity`` and ``frames``, each with ``path``, ``prompt``, ``background``,
``character``, ``action``, ``caption``, ``finished``), the PNGs, and with ``--save-masks`` a
``masks/<stem>_mask.png`` per image: the image with the mask overlaid on the left, the mask itself (white =
foreground, upscaled from the token grid) on the right. Only the right half is read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "characonsist-manifest/"


class RunError(ValueError):
    """A run folder that cannot be evaluated; the message says which file and what to do."""


@dataclass
class EvalImage:
    """One image of a group as the manifest lists it (``file`` is absolute)."""

    path: str
    file: Path
    role: str                 # identity | frame
    prompt: str
    background: str
    character: str
    action: str
    caption: str | None = None

    def load(self):

        with Image.open(self.file) as image:
            return image.convert("RGB")


@dataclass
class EvalGroup:
    name: str
    images: list[EvalImage]
    notes: list[str] = field(default_factory=list)
    all_paths: list[str] = field(default_factory=list)   # every image's path in manifest order, finished or not


@dataclass
class Run:
    folder: Path
    method: str
    model: str
    settings: dict
    groups: list[EvalGroup]
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.method} ({self.folder.name})"


def read_run(folder: str | Path) -> Run:
    """The groups of a run folder with every finished image; unfinished ones are left out with a note."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RunError(f"{folder}: no such folder (expected a run folder written by `characonsist generate`)")
    if not path.is_file():
        raise RunError(f"{path}: not found; `characonsist eval` reads a run folder written by `characonsist generate` "
                       "(or the UI), which holds manifest.json")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(MANIFEST_FORMAT):
        raise RunError(f"{path}: not a characonsist manifest (its 'format' should start with {MANIFEST_FORMAT!r})")
    settings = manifest.get("settings") or {}
    groups, notes = [], []
    for g, entry in enumerate(manifest.get("groups") or []):
        where = f"{path}: groups[{g}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("identity"), dict):
            raise RunError(f"{where}: a group needs an 'identity' entry")
        name = str(entry.get("name") or f"group_{g:03d}")
        images, group_notes, all_paths = [], [], []
        for k, item in enumerate([entry["identity"], *(entry.get("frames") or [])]):
            place = f"{where}." + ("identity" if k == 0 else f"frames[{k - 1}]")
            missing = [key for key in ("path", "prompt") if not item.get(key)]
            if missing:
                raise RunError(f"{place}: missing {', '.join(missing)}")
            file = folder / item["path"]
            all_paths.append(str(item["path"]))
            if not item.get("finished", True) or not file.is_file():
                group_notes.append(f"{item['path']}: not finished or missing; left out")
                continue
            images.append(EvalImage(item["path"], file, "identity" if k == 0 else "frame", item["prompt"],
                                    item.get("background") or "", item.get("character") or "", item.get("action") or "",
                                    item.get("caption")))
        if not images or images[0].role != "identity":
            notes.append(f"{name}: the identity image is not finished; group left out")
            continue
        if len(images) < 2:
            group_notes.append("only the identity image is finished: no pairs to compare")
        groups.append(EvalGroup(name, images, group_notes, all_paths))
    if not groups:
        raise RunError(f"{path}: no group with a finished identity image; nothing to evaluate")
    return Run(folder, str(settings.get("method") or "unknown"), str(settings.get("model") or "unknown"), settings,
               groups, notes)


def method_mask(run: Run, image: EvalImage, size: tuple[int, int]) -> np.ndarray | None:
    """The method's own foreground mask of ``image`` (bool, ``size`` = (width, height)), from the right half of
    ``masks/<stem>_mask.png``; None when there is none or it is not of that layout."""

    stem = Path(image.path)
    file = run.folder / stem.parent / "masks" / f"{stem.stem}_mask.png"
    if not file.is_file():
        return None
    try:
        with Image.open(file) as sheet:
            sheet = sheet.convert("L")
    except OSError:
        return None
    width, height = size
    if sheet.size != (2 * width, height):
        return None
    return np.asarray(sheet)[:, width:] > 127
