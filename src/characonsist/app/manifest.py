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


def check_manifest_is_ours(out: OutputFolder) -> None:
    """Refuse to replace a ``manifest.json`` that characonsist did not write (FolderError)."""
    path = out.path(MANIFEST)
    if not (path.exists() or path.is_symlink()):
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise FolderError(f"{path} was not written by characonsist: move it away or choose another folder "
                          "(characonsist never replaces files it did not write)", path)


def manifest(stories: list[Story], run: dict, jobs: list[Job]) -> dict:
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
    return {"format": FORMAT, "stories": [s.path for s in stories], "settings": run, "versions": versions(),
            "groups": groups}


def write_manifest(out: OutputFolder, stories: list[Story], run: dict, jobs: list[Job]) -> bool:
    """Write (atomically) the manifest; False if the file already said exactly this."""
    return out.write_bytes(MANIFEST, json_bytes(manifest(stories, run, jobs)))
