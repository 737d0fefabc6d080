"""The application layer from Python, without argparse (what a web UI or a worker does): validate a request,
plan against the disk, run jobs with a progress callback and a cancel flag, resume. Real engine, tiny model."""

from __future__ import annotations

import json
import threading

import pytest

from characonsist.app import Cancelled, StoryRequest, StoryRun, validate_request
from characonsist.inputs import InputError
from characonsist.storyfile import parse_text

STORY = "park#a cat#sitting\npark#a cat#running\n\nbeach#a robot#standing\nbeach#a robot#waving\n"


def request(tiny_model, out, **kw):
    return StoryRequest(stories=[parse_text(STORY, "<form>")], model=str(tiny_model), out=str(out), height=64,
                        width=64, num_inference_steps=3, max_sequence_length=32,
                        method_options={"mask_step": "1"}, **kw)   # option values may stay text, as a form sends them


@pytest.mark.slow
def test_progress_cancel_and_resume_from_python(tiny_model, tmp_path):
    out = tmp_path / "out"
    checked = validate_request(request(tiny_model, out))
    assert checked.settings.method_options["mask_step"] == 1 and checked.settings.method_config.mask_step == 1
    seen, cancel = [], threading.Event()

    def progress(job, phase, done, total):
        seen.append((job.folder, phase, done, total))
        if job.folder == "group_001" and phase == "main" and done == 2:
            cancel.set()        # e.g. a UI's stop button, from another thread

    with StoryRun(checked) as run:
        assert [j.folder for j in run.todo] == ["group_000", "group_001"]
        assert run.run(run.todo[0], progress=progress, cancel=cancel) is True
        with pytest.raises(Cancelled):
            run.run(run.jobs[1], progress=progress, cancel=cancel)
    # mask_step 1 of 3 steps: a one-step pre-run, then the whole main run (a one-step pre-run is not taken over)
    assert seen[:4] == [("group_000", "prerun", 1, 1), ("group_000", "main", 1, 3), ("group_000", "main", 2, 3),
                        ("group_000", "main", 3, 3)]
    assert seen[-1] == ("group_001", "main", 2, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["done", "todo"]
    assert not (out / "group_001").exists()

    with StoryRun(validate_request(request(tiny_model, out))) as run:   # resume: only the cancelled group
        assert [j.folder for j in run.todo] == ["group_001"]
        assert run.run(run.todo[0]) is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["done", "done"]


def test_validation_lists_every_problem_at_once(tiny_model, tmp_path):
    bad = request(tiny_model, tmp_path / "out", seed=-1)
    bad.num_inference_steps, bad.guidance_scale = 0, float("nan")
    with pytest.raises(InputError) as info:
        validate_request(bad)
    assert info.value.problems == ["num_inference_steps=0 must be between 1 and 1000", "guidance_scale=nan must be a finite number",
                                   "seed=-1 is out of range (0 to 2**63-1)"]
    assert not (tmp_path / "out").exists()


def test_cli_jobs_spread_the_seed_by_the_methods_convention(tmp_path):
    from characonsist.app.folder import OutputFolder
    from characonsist.app.jobs import plan_jobs
    from characonsist.app.settings import StorySettings, method_config
    from characonsist.methods.base import story_seeds
    from characonsist.storyfile import load_story

    story = tmp_path / "s.txt"
    story.write_text("a park#a robot#standing\na park#a robot#waving\na beach#a robot#running\n")
    for method, seeding in (("characonsist", "shared"), ("consistory", "per_image")):
        config, recorded = method_config(method, {})
        settings = StorySettings(model="m", dtype="float32", method=method, method_config=config, height=128,
                                 width=128, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32,
                                 seed=2025, recorded_options=recorded)
        with OutputFolder(tmp_path / method) as out:
            (job,) = plan_jobs([load_story(story)], settings, out)
        assert [r["seed"] for r in job.records] == story_seeds(2025, 3, seeding)
