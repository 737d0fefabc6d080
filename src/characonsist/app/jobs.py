"""Story jobs: one group (an identity and its frames) each. Plan them against what is on disk (resume), run one
with progress and cancellation, write its images, masks and storyboard.

A file the tool did not write (no characonsist record in it) is never overwritten or deleted, not even with
``overwrite``: the job stops with the file's name instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from ..inputs import InputError
from ..output import (
    json_safe,
    mask_visual,
    match_visual,
    png_bytes,
    png_text,
    read_png_record,
    settings_hash,
    storyboard,
)
from ..picture import SOURCE_KEY, bytes_digest, file_digest, load_picture_bytes
from ..seeds import story_seeds
from ..storyfile import Group, Story
from .folder import FolderError, OutputFolder
from .settings import StorySettings


@dataclass
class GroupResult:
    """What generating one group gives back (identity first everywhere)."""

    images: list
    masks: list | None = None
    matches: list | None = None
    notes: list[list[str]] | None = None
    settings: dict | None = None


class Cancelled(Exception):
    """A job was cancelled through its ``cancel`` flag; finished images are kept."""


@dataclass
class Job:
    """One group to produce: where its files go, what each image is, and what is already on disk."""

    group: Group
    folder: str                      # relative to the output folder
    records: list[dict]              # per image, identity first: what goes in the PNG and the manifest
    hash: str
    state: str = "todo"              # todo | partial | done | conflict | failed
    finished: list[bool] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)   # files in the way that characonsist did not write
    error: str | None = None
    masks: list[str] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    engine_settings: dict | None = None

    @property
    def images(self) -> int:
        return len(self.records)


def image_paths(folder: str, n_frames: int) -> list[str]:
    digits = max(2, len(str(n_frames)))
    return [f"{folder}/identity.png"] + [f"{folder}/frame_{i:0{digits}d}.png" for i in range(1, n_frames + 1)]


def plan_jobs(stories: list[Story], settings: StorySettings, out: OutputFolder) -> list[Job]:
    """Every group with its settings hash (``StorySettings.resume_key`` and the images) and its state on disk
    (finished images are recognised by hash). Images without a seed of their own get the run's seed spread by the
    method's official convention (``Method.seeding``: CharaConsist every image the same, the peers one per image),
    as the API does."""
    from ..methods import method_class

    seeding = method_class(settings.method).seeding
    key = settings.resume_key()
    jobs = []
    for story in stories:
        prefix = f"{Path(story.path).stem}/" if len(stories) > 1 else ""
        for group in story.groups:
            folder = prefix + group.name
            out.path(folder)   # refuses a folder outside the output folder
            images = []
            seeds = story_seeds(settings.seed, len(group.images), seeding,   # the method's official convention
                                [image.seed for image in group.images])
            for image, seed in zip(group.images, seeds, strict=True):
                images.append({"background": image.background, "character": image.character, "action": image.action,
                               "seed": seed,
                               "height": image.height or settings.height, "width": image.width or settings.width})
            hashed = images
            if group.picture is not None:   # a changed picture (its bytes) or inversion makes another group
                images[0]["picture"] = {"path": group.picture, "sha256": _digest(group.picture),
                                        "inversion": settings.inversion}
                # where the picture was read is recorded, not hashed: the same story file read from another folder
                # (a relative path, a web UI's story) or the same bytes elsewhere resume the same group
                hashed = [{**images[0], "picture": {k: v for k, v in images[0]["picture"].items() if k != "path"}},
                          *images[1:]]
            group_hash = settings_hash({**key, "images": hashed})
            paths = image_paths(folder, len(group.frames))
            records = []
            for i, (image, spec, path) in enumerate(zip(group.images, images, paths, strict=True)):
                records.append({"group": folder, "role": "identity" if i == 0 else "frame", "index": i, "path": path,
                                "prompt": image.prompt, **spec, "caption": group.captions[i], "method": settings.method,
                                "settings": key, "settings_hash": group_hash, "version": __version__})
            job = Job(group, folder, records, group_hash)
            _inspect(job, out, settings.save_masks)
            jobs.append(job)
    return jobs


def _digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:   # checked before planning; a picture gone since is reported when the group runs
        return None


def is_ours(record: dict | None) -> bool:
    """Whether a PNG's record says characonsist wrote it."""
    return isinstance(record, dict) and "settings_hash" in record


def _inspect(job: Job, out: OutputFolder, save_masks: bool) -> None:
    job.finished, conflict, kept = [], False, []
    rel = Path(job.folder)
    for folder in [*(p.as_posix() for p in reversed(rel.parents) if p.parts), job.folder, f"{job.folder}/masks"]:
        path = out.path(folder)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            job.foreign.append(folder)    # a file (or link) where this group's folder goes
            job.state = "conflict"
            return
    for record in job.records:
        path = out.path(record["path"])
        exists = path.exists() or path.is_symlink()
        old = read_png_record(path) if exists else None
        if exists and not is_ours(old):
            job.foreign.append(record["path"])
        job.finished.append(old is not None and old.get("settings_hash") == job.hash)
        kept.append(old if job.finished[-1] else None)
        if exists and not job.finished[-1]:
            conflict = True
            for change in _describe_change(old, record):
                if change not in job.changes:
                    job.changes.append(change)
    if save_masks:
        for record in job.records:
            stem = Path(record["path"]).stem
            for path in (f"{job.folder}/masks/{stem}_mask.png", f"{job.folder}/masks/{stem}_match.png"):
                full = out.path(path)
                if (full.exists() or full.is_symlink()) and not is_ours(read_png_record(full)):
                    job.foreign.append(path)
    board_path = out.path(f"{job.folder}/storyboard.png")
    board = read_png_record(board_path)
    if (board_path.exists() or board_path.is_symlink()) and not is_ours(board):
        job.foreign.append(f"{job.folder}/storyboard.png")
    board_ok = board is not None and board.get("settings_hash") == job.hash
    if job.foreign:
        job.state = "conflict"
        job.changes = job.changes or [f"{p} is in the way" for p in job.foreign]
    elif conflict:
        job.state = "conflict"
        job.changes = job.changes or ["the group's images or their number changed"]
    elif all(job.finished) and board_ok and (board.get("masks_saved") or not save_masks):
        job.state = "done"
        job.masks = board.get("masks", [])
    elif any(job.finished) or board_ok:
        job.state = "partial"
    if all(job.finished):  # what the manifest says about images made by an earlier run
        job.notes = [old.get("notes", []) for old in kept]
        job.engine_settings = kept[0].get("engine_settings")


def _describe_change(old: dict | None, new: dict) -> list[str]:
    """What differs between an image on disk and the one this run would make (settings first)."""
    name = Path(new["path"]).stem
    if not is_ours(old):
        return [f"{new['path']} exists but was not written by characonsist"]
    old_settings = old.get("settings", {})
    changed = [f"{key} {old_settings.get(key)!r} -> {value!r}" for key, value in new["settings"].items()
               if old_settings.get(key) != value]
    changed += [f"{name} {key} {old.get(key)!r} -> {new.get(key)!r}"
                for key in ("background", "character", "action", "seed", "height", "width", "picture")
                if old.get(key) != new.get(key)]
    return changed


def prepare_overwrite(job: Job, out: OutputFolder) -> None:
    """Start a conflicting group from scratch: delete its old images and masks **that characonsist wrote** and
    that this run will not write again (a shorter group leaves no stray frames). Files it did not write stay."""
    if job.foreign:
        raise FolderError(f"{job.foreign[0]} in {out.root} was not written by characonsist and is in the way of "
                          f"group {job.folder}: move it away (characonsist never replaces files it did not write)",
                          out.root / job.foreign[0])
    job.finished = [False] * len(job.records)
    job.state = "todo"
    expected = {r["path"] for r in job.records}
    base = out.path(job.folder)
    for old in [*base.glob("frame_*.png"), *(base / "masks").glob("*.png")]:
        rel = old.relative_to(out.root).as_posix()
        record = read_png_record(old) if not old.is_symlink() else None
        if rel not in expected and is_ours(record) and record.get("group", job.folder) == job.folder:
            out.remove(rel)


def picture_of(job: Job):
    """The identity's picture of ``job`` as the planned bytes decoded (an RGB PIL image), or None without one.
    ``job.group.picture`` is its file, or the file's bytes already read (``with_picture_bytes``); bytes that no
    longer match the sha256 planned (and recorded) are refused, so a group is never made from another picture than
    the one its manifest names."""
    source = job.group.picture
    if source is None:
        return None
    planned = (job.records[0].get("picture") or {})
    name = planned.get("path") or (source if isinstance(source, str) else "the picture")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise InputError(f"identity picture {name}: cannot read it ({e.strerror or e})") from None
    if planned.get("sha256") and bytes_digest(data) != planned["sha256"]:
        raise InputError(f"identity picture {name}: the file changed since the run was planned; run the command "
                         "again (the group is planned with the new picture)")
    image = load_picture_bytes(data, name, place="identity picture")[0]
    image.info[SOURCE_KEY] = str(name)       # the notes and records name the file, not "Image (w, h)"
    return image


def with_picture_bytes(job: Job) -> Job:
    """A copy of ``job`` that carries its picture's bytes instead of its path (for a worker on another machine,
    e.g. a Ray actor, that cannot read the path); the job itself is not changed."""
    if not isinstance(job.group.picture, str):
        return job
    try:
        data = Path(job.group.picture).read_bytes()
    except OSError:
        return job            # the worker reports it (picture_of) as this group's failure
    return dataclasses.replace(job, group=dataclasses.replace(job.group, picture=data))


def run_job(job: Job, generate, progress=None, cancel=None) -> GroupResult:
    """Generate one job's group. ``progress(job, phase, done, total)`` after every denoising step; ``cancel``
    (e.g. a ``threading.Event``, or any object with ``is_set()``) stops the job at the next step (Cancelled)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(job.folder)

    def on_step(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(job, phase, done, total)
        if cancel is not None and cancel.is_set():
            raise Cancelled(job.folder)

    return generate(job, progress_callback=on_step)


def write_job(job: Job, result: GroupResult, out: OutputFolder, save_masks: bool) -> None:
    """Save the group's unfinished images (finished ones are never rewritten), masks, and storyboard."""
    images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in result.images]
    if len(images) != len(job.records):
        raise RuntimeError(f"the engine returned {len(images)} images for a group of {len(job.records)}")
    job.notes = [list(n) for n in (result.notes or [[] for _ in images])]
    # as the PNG records keep it (sorted keys), so that a rerun's manifest is byte-identical
    job.engine_settings = json.loads(json.dumps(json_safe(result.settings), sort_keys=True))
    for i, (image, record) in enumerate(zip(images, job.records, strict=True)):
        if job.finished[i]:  # made by an earlier run: never rewritten
            continue
        record = {**record, "notes": job.notes[i], "engine_settings": result.settings}
        out.write_bytes(record["path"], png_bytes(image, png_text(record)))
        job.finished[i] = True
    job.masks = []
    if save_masks and result.masks is not None:
        for i, (image, record) in enumerate(zip(images, job.records, strict=True)):
            stem = Path(record["path"]).stem
            if result.masks[i] is not None:
                path = f"{job.folder}/masks/{stem}_mask.png"
                _write_own(out, path, mask_visual(image, result.masks[i]), {"settings_hash": job.hash})
                job.masks.append(path)
            match = result.matches[i - 1] if i and result.matches else None
            if match is not None:
                path = f"{job.folder}/masks/{stem}_match.png"
                sim = getattr(match, "sim", None)
                grids = [None if m is None else tuple(np.shape(m)) for m in (result.masks[0], result.masks[i])]
                visual = match_visual(images[0], image, _numpy(match.frame_idx), _numpy(match.id_idx),
                                      None if sim is None else _numpy(sim), id_grid=grids[0], frame_grid=grids[1])
                _write_own(out, path, visual, {"settings_hash": job.hash})
                job.masks.append(path)
    write_storyboard(job, out, save_masks, images)
    job.state = "done"


def _write_own(out: OutputFolder, path: str, image, record: dict) -> None:
    """Write a PNG unless a file characonsist did not write is at its place."""
    full = out.path(path)
    if (full.exists() or full.is_symlink()) and not is_ours(read_png_record(full)):
        raise FolderError(f"{full} was not written by characonsist: move it away (characonsist never replaces "
                          "files it did not write) and rerun", full)
    out.write_bytes(path, png_bytes(image, png_text(record)))


def _numpy(tensor):
    return tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else tensor


def write_storyboard(job: Job, out: OutputFolder, save_masks: bool, images: list | None = None) -> None:
    """The group's sheet: identity and frames in a grid with captions (read from disk when not given)."""
    if images is None:
        images = []
        for record in job.records:
            with Image.open(out.path(record["path"])) as image:
                images.append(image.convert("RGB"))
    captions = []
    for r in job.records:
        label = "identity" if r["role"] == "identity" else f"frame {r['index']}"
        captions.append(f"{label}: {r['caption'] or r['prompt']}")
    sheet = storyboard(images, captions, title=job.folder)
    _write_own(out, f"{job.folder}/storyboard.png", sheet,
               {"settings_hash": job.hash, "masks_saved": save_masks, "masks": job.masks})
