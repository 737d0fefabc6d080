"""``manifest.json``: every group of a run, its images, prompts, seeds, sizes and status, the run's settings and
the library versions (strict JSON: a non-finite number is written as null, never as a bare NaN)."""

from __future__ import annotations

import json
import platform

from .. import __version__
from ..output import json_bytes
from ..storyfile import Story
from .folder import FolderError, OutputFolder
from .jobs import Job
from .settings import StorySettings

MANIFEST = "manifest.json"
FORMAT = "characonsist-manifest/1"


def versions() -> dict:
    found = {"characonsist": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = None
    return found


def check_manifest_is_ours(out: OutputFolder) -> dict | None:
    """Refuse to replace a ``manifest.json`` that characonsist did not write (FolderError); its data, or None."""
    path = out.path(MANIFEST)
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise FolderError(f"{path} was not written by characonsist: move it away or choose another folder "
                          "(characonsist never replaces files it did not write)", path)
    return data


def earlier_groups(out: OutputFolder, old: dict | None, jobs: list[Job]) -> list[dict]:
    """The groups an earlier run's manifest lists (``groups`` and its own ``earlier``) that this run does not have
    and whose folders are still in ``out``: another story run into the same folder keeps them in the manifest
    (under ``earlier``, with the story files they came from) rather than dropping them silently."""
    if not isinstance(old, dict):
        return []
    names, kept = {job.folder for job in jobs}, []
    stories = old.get("stories") if isinstance(old.get("stories"), list) else []
    for key in ("groups", "earlier"):
        for group in old.get(key) if isinstance(old.get(key), list) else []:
            name = group.get("name") if isinstance(group, dict) else None
            if not isinstance(name, str) or name in names:
                continue
            try:
                if not out.path(name).is_dir():
                    continue
            except FolderError:
                continue
            names.add(name)
            kept.append({"stories": stories, **group})   # the story files it came from
    return kept


def manifest(stories: list[Story], settings: StorySettings, jobs: list[Job], earlier: list[dict] | None = None) -> dict:
    groups = []
    for job in jobs:
        entry = {"name": job.folder, "status": job.state, "settings_hash": job.hash,
                 "storyboard": f"{job.folder}/storyboard.png" if job.state == "done" else None,
                 "masks": job.masks, "engine_settings": job.engine_settings}
        images = []
        for i, r in enumerate(job.records):
            item = {k: r[k] for k in ("path", "prompt", "background", "character", "action", "seed", "height",
                                      "width", "caption")}
            if "picture" in r:
                item["picture"] = r["picture"]
            item["finished"] = bool(job.finished[i]) if job.finished else False
            if job.notes:
                item["notes"] = job.notes[i]
            images.append(item)
        entry["identity"], entry["frames"] = images[0], images[1:]
        if job.error:
            entry["error"] = job.error
        if job.changes and job.state == "conflict":
            entry["changes"] = job.changes
        groups.append(entry)
    data = {"format": FORMAT, "stories": [s.path for s in stories], "settings": settings.manifest(), "versions": versions(),
            "groups": groups}
    if earlier:
        data["earlier"] = earlier
    return data


def write_manifest(out: OutputFolder, stories: list[Story], settings: StorySettings, jobs: list[Job],
                   earlier: list[dict] | None = None) -> bool:
    """Write (atomically) the manifest; False if the file already said exactly this."""
    return out.write_bytes(MANIFEST, json_bytes(manifest(stories, settings, jobs, earlier)))
