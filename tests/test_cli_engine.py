"""``characonsist generate`` end to end on the real engine with a tiny random FLUX saved to disk (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from characonsist import cli

pipeline = pytest.importorskip("characonsist.pipeline")

STORY = "park#a cat#sitting\npark#a cat#running\npark#a cat#jumping\n\nbeach#a robot#standing\nbeach#a robot#waving\n"


def generate(tmp_path, model, *extra, out="out"):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    return cli.main(["generate", str(story), "--model", str(model), "--out", str(tmp_path / out), "--height", "64",
                     "--width", "64", "--max-sequence-length", "32", "--quiet", *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.slow
def test_vanilla_resume_regenerates_a_lost_frame_byte_identical(tmp_path, tiny_model, monkeypatch):
    assert generate(tmp_path, tiny_model, "--method", "vanilla", "--steps", "2") == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["method_options"] == {}
    assert manifest["groups"][1]["engine_settings"]["method"] == "vanilla"
    before = snapshot(out)
    assert len(before) == 2 + 5  # two storyboards, five images
    identity_mtime = (out / "group_000" / "identity.png").stat().st_mtime_ns
    (out / "group_000" / "frame_02.png").unlink()

    calls = []
    original = pipeline.CharaConsistPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["frames"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.CharaConsistPipeline, "__call__", counting)
    assert generate(tmp_path, tiny_model, "--method", "vanilla", "--steps", "2") == 0
    assert calls == [2]  # only the partial group ran again, and as a whole group
    assert snapshot(out) == before
    assert (out / "group_000" / "identity.png").stat().st_mtime_ns == identity_mtime


@pytest.mark.slow
def test_characonsist_masks_matches_and_interrupted_run(tmp_path, tiny_model, monkeypatch):
    original = pipeline.CharaConsistPipeline.__call__
    calls = []

    def interrupt_second(self, *args, **kwargs):
        calls.append(kwargs["identity"].prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.CharaConsistPipeline, "__call__", interrupt_second)
    # masks and matches at step 1 (official: 10) so that 3 steps suffice
    extra = ("--method", "characonsist", "--steps", "3", "--option", "mask_step=1", "--save-masks")
    assert generate(tmp_path, tiny_model, *extra) == cli.EXIT_INTERRUPTED
    out = tmp_path / "out"
    first = snapshot(out / "group_000")
    assert "storyboard.png" in first and not (out / "group_001").exists()
    monkeypatch.setattr(pipeline.CharaConsistPipeline, "__call__", original)
    assert generate(tmp_path, tiny_model, *extra) == 0
    assert snapshot(out / "group_000") == first

    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["done", "done"]
    group = manifest["groups"][0]
    assert group["engine_settings"]["method_options"]["use_token_merge"] is True
    assert group["engine_settings"]["method_options"]["mask_step"] == 1
    assert "group_000/masks/identity_mask.png" in group["masks"]
    for item in [group["identity"], *group["frames"]]:
        with Image.open(out / item["path"]) as image:
            assert image.size == (64, 64) and image.text["method"] == "characonsist"
            assert image.text["prompt"] == item["prompt"]
        assert isinstance(item["notes"], list)
    with Image.open(out / "group_000/masks/identity_mask.png") as sheet:
        assert sheet.size == (128, 64)
    assert (out / "group_000/masks/frame_01_match.png").exists()


@pytest.mark.slow
def test_demo_runs_the_packaged_story_on_the_toy_model(tmp_path, tiny_model, monkeypatch, capsys):
    import shutil

    from characonsist.toy import model as toy

    folder = tmp_path / "toy"
    shutil.copytree(tiny_model, folder)
    (folder / "characonsist_defaults.json").write_text(json.dumps(
        {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 3.5, "max_sequence_length": 64}))
    monkeypatch.setattr(toy, "TOY_MODEL_DIR", folder)  # stands in for the shipped weights
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["settings"]["model"] == "toy" and manifest["settings"]["save_masks"] is True
    assert manifest["settings"]["num_inference_steps"] == 2  # the toy model's defaults
    group = manifest["groups"][0]
    assert len(group["frames"]) == 4 and group["identity"]["prompt"].startswith("a sunny beach a robot")
    assert f"storyboard: {tmp_path / 'demo' / 'group_000' / 'storyboard.png'}" in printed
    assert "masks:" in printed and "images:" in printed


@pytest.mark.slow
def test_identity_picture_end_to_end(tmp_path, tiny_model, capsys):
    """A story file naming the identity's picture: the identity image is its reconstruction (PSNR in the record and
    the manifest), the frames are generated; a rerun finds the group done."""
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 100, 3)) * 255).astype(np.uint8)).save(tmp_path / "me.png")
    story = tmp_path / "story.txt"
    story.write_text("park#a cat#sitting | me.png\npark#a cat#running\n")
    args = ["generate", str(story), "--model", str(tiny_model), "--out", str(tmp_path / "out"), "--height", "64",
            "--width", "64", "--max-sequence-length", "32", "--steps", "3", "--inversion", "euler"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "story.txt:1: identity picture" in said and "group_000/identity: identity from the picture" in said
    assert "reconstruction PSNR" in said
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    group = manifest["groups"][0]
    picture = group["engine_settings"]["identity_picture"]
    assert picture["inversion"] == "euler" and picture["source_size"] == [80, 100] and picture["size"] == [64, 64]
    assert picture["fit"] == "100x80 downscaled to 80x64, centre-cropped to 64x64 (20% of it cut)"
    assert picture["psnr"] > 5 and "reconstruction PSNR" in group["identity"]["notes"][0]
    with Image.open(tmp_path / "out" / "group_000" / "identity.png") as image:
        assert image.size == (64, 64)
    assert cli.main([*args, "--quiet"]) == 0          # resumes: nothing to do
