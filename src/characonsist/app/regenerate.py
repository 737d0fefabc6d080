"""Regenerate one image of a finished group with a new seed, keeping every other image of the group as it is.

In the lockstep engine a group's identity and frames denoise together, so one image cannot be made alone: the
whole group runs again with the new seed. With CharaConsist and vanilla FLUX (and the peers, for an image that
no other one reads: not a ConsiStory anchor, StoryDiffusion identity image or StorySync reference) the other
images then come out **bit-identical** to the ones on disk: every image reads only the identity (and its scene's
first image), never a later frame. Where an image the others read is changed, they would change too; they are
kept as they were on disk instead and their note in the PNG record and the manifest says so (a fresh run of
the story would give different images for them).

Either way every other image's pixels stay byte-identical on disk; their PNG records take the group's new
settings hash, so the folder resumes like any other run of the story with the new seed.

    with StoryRun(validate_request(request_with_new_seed_and_overwrite)) as run:
        run.engine = ...                    # or run.load()
        regenerate(run, job, index, progress=..., cancel=...)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..output import read_png_record
from .jobs import Job, is_ours, run_job, write_job

KEPT_NOTE = ("kept as it was when image {index} was regenerated: with this method image {index} is read by the "
             "others, so a fresh run of this story gives a different image here")


def old_pixels(run, job: Job, index: int) -> dict[int, np.ndarray]:
    """The pixels of the group's images on disk (written by characonsist), except image ``index``."""
    kept = {}
    for i, record in enumerate(job.records):
        path = run.folder.path(record["path"])
        if i == index or not path.is_file() or path.is_symlink() or not is_ours(read_png_record(path)):
            continue
        with Image.open(path) as image:
            kept[i] = np.asarray(image.convert("RGB"))
    return kept


def regenerate(run, job: Job, index: int, progress=None, cancel=None) -> list[int]:
    """Run ``job``'s group again and write it with image ``index`` new and every other image's pixels as on disk
    before (read first). Returns the indices of images kept although the engine gave them differently."""
    if not 0 <= index < job.images:
        raise ValueError(f"group {job.folder} has images 0..{job.images - 1}, not {index}")
    kept = old_pixels(run, job, index)
    if run.engine is None:
        run.load()
    result = run_job(job, run.engine, progress=progress, cancel=cancel)
    images = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in result.images]
    notes = [list(n) for n in (result.notes or [[] for _ in images])]
    differing = []
    for i, old in kept.items():
        if not np.array_equal(images[i], old):
            differing.append(i)
            notes[i].append(KEPT_NOTE.format(index=index))
        images[i] = old
    result.images = [Image.fromarray(im) for im in images]
    result.notes = notes
    job.finished = [False] * job.images   # every record takes the new settings hash (pixels as above)
    write_job(job, result, run.folder, run.checked.request.save_masks)
    run.save_manifest()
    return differing
