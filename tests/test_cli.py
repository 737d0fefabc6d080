"""``characonsist generate``: input checks before the model, outputs, manifest, resume, interruption, OOM.

The engine is replaced by a fake (``characonsist.app.model.load_engine`` monkeypatched) so that these tests
exercise the CLI and the application layer alone and count exactly what gets generated; ``test_cli_engine.py``
runs the real engine end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from characonsist import cli
from characonsist.app.memory_plan import oom_advice
from characonsist.output import read_png_record
from conftest import FakeEngine  # the fake engine and its fixture `fake` are shared (conftest.py)

STORY = "park#a cat#sits\npark#a cat#runs\npark#a cat#jumps\n\nbeach#a dog#swims\nbeach#a dog#digs\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def run(tmp_path, model_dir, *extra, story=None, out="out"):
    story = story or write(tmp_path, "story.txt", STORY)
    args = ["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / out), "--height", "32",
            "--width", "48", "--steps", "3", "--quiet", *extra]
    return cli.main(args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--method", "--share-bg", "--token-merge", "--save-masks", "--height", "--width", "--steps",
                   "--guidance", "--seed", "--memory", "--gpu-ids", "--batch-size", "--quiet", "--overwrite",
                   "--max-sequence-length"):
        assert option in text


def test_outputs_manifest_and_png_metadata(tmp_path, model_dir, fake):
    assert run(tmp_path, model_dir, "--save-masks", "--seed", "5") == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["name"] for g in manifest["groups"]] == ["group_000", "group_001"]
    g0 = manifest["groups"][0]
    assert g0["status"] == "done" and g0["identity"]["path"] == "group_000/identity.png"
    assert [f["path"] for f in g0["frames"]] == ["group_000/frame_01.png", "group_000/frame_02.png"]
    assert g0["frames"][1]["prompt"] == "park a cat jumps" and g0["frames"][1]["seed"] == 5
    assert (g0["identity"]["height"], g0["identity"]["width"]) == (32, 48)
    settings = manifest["settings"]
    assert settings["num_inference_steps"] == 3 and settings["method"] == "characonsist" and settings["seed"] == 5
    assert settings["method_options"] == {"share_bg": True, "use_token_merge": True}
    assert manifest["versions"]["characonsist"] and manifest["versions"]["diffusers"]
    assert g0["engine_settings"] == {"method": "characonsist", "fake": True}
    for item in [g0["identity"], *g0["frames"]]:
        with Image.open(out / item["path"]) as image:
            assert image.size == (48, 32)
            assert image.text["prompt"] == item["prompt"] and image.text["seed"] == "5"
            assert image.text["method"] == "characonsist"
            assert json.loads(image.text["settings"])["num_inference_steps"] == 3
    # masks: overlay | mask, and identity | frame match sheets; storyboard per group
    assert sorted(Path(p).name for p in g0["masks"]) == [
        "frame_01_mask.png", "frame_01_match.png", "frame_02_mask.png", "frame_02_match.png", "identity_mask.png"]
    with Image.open(out / "group_000/masks/identity_mask.png") as sheet:
        assert sheet.size == (96, 32)
    with Image.open(out / g0["storyboard"]) as board:
        assert board.width > 3 * 200
    assert fake.loads == [(str(model_dir), "none", [0])]


def test_rerun_skips_everything_without_loading_the_model(tmp_path, model_dir, fake):
    assert run(tmp_path, model_dir) == 0
    before = snapshot(tmp_path / "out")
    assert run(tmp_path, model_dir) == 0
    assert fake.calls == ["group_000", "group_001"] and len(fake.loads) == 1
    assert snapshot(tmp_path / "out") == before


def test_partial_group_regenerated_finished_files_untouched(tmp_path, model_dir, fake):
    assert run(tmp_path, model_dir, "--save-masks") == 0
    out = tmp_path / "out"
    before = snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    lost = out / "group_000" / "frame_02.png"
    lost.unlink()
    assert run(tmp_path, model_dir, "--save-masks") == 0
    assert fake.calls == ["group_000", "group_001", "group_000"]
    assert snapshot(out) == before  # the lost frame came back identical
    assert [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t] == [lost]  # nothing else was rewritten


def test_overwrite_replaces_a_shorter_group(tmp_path, model_dir, fake, capsys):
    assert run(tmp_path, model_dir) == 0
    shorter = write(tmp_path, "story.txt", STORY.replace("park#a cat#jumps\n", ""))
    assert run(tmp_path, model_dir, story=shorter) == cli.EXIT_BAD_INPUT
    assert "group_000: the group's images or their number changed" in capsys.readouterr().err
    assert run(tmp_path, model_dir, "--overwrite", story=shorter) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "group_000").glob("*.png")) == [
        "frame_01.png", "identity.png", "storyboard.png"]
    assert fake.calls == ["group_000", "group_001", "group_000"]


def test_interrupted_run_keeps_finished_groups_and_resumes(tmp_path, model_dir, fake, capsys):
    fake.fail_on = {"group_001": KeyboardInterrupt()}
    assert run(tmp_path, model_dir) == cli.EXIT_INTERRUPTED
    assert "run the same command again" in capsys.readouterr().err
    out = tmp_path / "out"
    assert (out / "group_000" / "storyboard.png").exists() and not (out / "group_001").exists()
    assert not list(out.rglob(".*.tmp-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["done", "todo"]
    first = snapshot(out / "group_000")
    fake.fail_on = {}
    assert run(tmp_path, model_dir) == 0
    assert fake.calls == ["group_000", "group_001", "group_001"]
    assert snapshot(out / "group_000") == first


def test_sigterm_is_an_interrupt(tmp_path, model_dir, fake):
    import os
    import signal

    original = FakeEngine.__call__

    def terminate_on_second(self, job, progress_callback=None):
        if job.folder == "group_001":
            os.kill(os.getpid(), signal.SIGTERM)  # what a batch scheduler sends
        return original(self, job)

    fake.__class__ = type("TermEngine", (FakeEngine,), {"__call__": terminate_on_second})
    assert run(tmp_path, model_dir) == cli.EXIT_INTERRUPTED
    assert (tmp_path / "out" / "group_000" / "storyboard.png").exists()
    assert signal.getsignal(signal.SIGTERM) is not cli._raise_interrupt  # handler restored


def test_lost_storyboard_is_rebuilt_without_the_model(tmp_path, model_dir, fake):
    assert run(tmp_path, model_dir) == 0
    board = tmp_path / "out" / "group_001" / "storyboard.png"
    data = board.read_bytes()
    board.unlink()
    assert run(tmp_path, model_dir) == 0
    assert board.read_bytes() == data and len(fake.loads) == 1


def test_files_it_did_not_write_survive_even_with_temporary_like_names(tmp_path, model_dir, fake):
    """The reported data loss: a user's file matching a temporary-like pattern under --out was deleted."""
    planted = {tmp_path / "out" / "home/projects/thesis/.draft.tex.tmp-autosave": b"my thesis",
               tmp_path / "out" / "group_000" / ".identity.png.tmp-999": b"not ours",
               tmp_path / "out" / "notes.txt": b"keep"}
    for path, data in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert run(tmp_path, model_dir) == 0
    assert run(tmp_path, model_dir, "--steps", "4", "--overwrite") == 0
    for path, data in planted.items():
        assert path.read_bytes() == data


def test_changed_settings_reported_then_overwritten(tmp_path, model_dir, fake, capsys):
    assert run(tmp_path, model_dir) == 0
    capsys.readouterr()
    assert run(tmp_path, model_dir, "--steps", "4") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "2 group(s)" in err and "num_inference_steps 3 -> 4" in err and "--overwrite" in err
    assert len(fake.loads) == 1
    assert run(tmp_path, model_dir, "--steps", "4", "--overwrite") == 0
    record = read_png_record(tmp_path / "out" / "group_000" / "frame_01.png")
    assert record["settings"]["num_inference_steps"] == 4


def test_changed_prompt_only_affects_its_group(tmp_path, model_dir, fake, capsys):
    assert run(tmp_path, model_dir) == 0
    changed = write(tmp_path, "story.txt", STORY.replace("digs", "barks"))
    assert run(tmp_path, model_dir, story=changed) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "1 group(s)" in err and "group_001" in err and "'digs' -> 'barks'" in err


def test_failed_group_does_not_stop_the_run(tmp_path, model_dir, fake, capsys):
    fake.fail_on = {"group_000": ValueError("boom")}
    assert run(tmp_path, model_dir) == cli.EXIT_FAILED
    assert "group group_000 failed: ValueError: boom" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["failed", "done"]
    assert manifest["groups"][0]["error"] == "ValueError: boom"


def test_out_of_memory_names_the_modes_that_fit(tmp_path, model_dir, fake, capsys):
    import torch

    fake.fail_on = {"group_000": torch.OutOfMemoryError("CUDA out of memory")}
    assert run(tmp_path, model_dir) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "out of memory" in err and "--memory model-offload" in err and "--memory sequential-offload" in err
    assert "--memory balanced" not in err  # needs two GPUs
    assert "--memory balanced" in oom_advice("model-offload", [0, 1], cli.FLAGS)
    assert "model-offload" not in oom_advice("model-offload", [0]).split("fit:")[1]


def test_method_options_are_settings(tmp_path, model_dir, fake):
    assert run(tmp_path, model_dir, "--no-share-bg", "--option", "mask_step=3", "--option", "point_tracking=off") == 0
    settings = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert settings["method_options"] == {"share_bg": False, "use_token_merge": True, "mask_step": 3,
                                          "point_tracking": False}


def test_defaults_follow_the_model(tmp_path, model_dir, fake):
    """FLUX.1-dev's defaults; FLUX.1-schnell's for a transformer without guidance; the folder's own file wins."""
    story = write(tmp_path, "story.txt", "park#a cat#sits\npark#a cat#runs\n")
    base = ["generate", str(story), "--model", str(model_dir), "--height", "32", "--width", "32", "--quiet"]

    def settings(out):
        assert cli.main([*base, "--out", str(tmp_path / out)]) == 0
        found = json.loads((tmp_path / out / "manifest.json").read_text())["settings"]
        return found["num_inference_steps"], found["guidance_scale"], found["max_sequence_length"]

    assert settings("dev") == (50, 3.5, 512)
    (model_dir / "transformer").mkdir()
    (model_dir / "transformer" / "config.json").write_text('{"guidance_embeds": false}')
    assert settings("schnell") == (4, 0.0, 256)
    (model_dir / "characonsist_defaults.json").write_text('{"num_inference_steps": 7}')
    assert settings("own") == (7, 0.0, 256)


def test_structured_story_per_frame_seed_size_caption(tmp_path, model_dir, fake):
    story = write(tmp_path, "story.yaml", """
scenes:
  - name: park
    background: a park
    character: a cat
    frames:
      - {action: sits, caption: The start}
      - {action: runs, seed: 9, height: 64, width: 32}
""")
    assert run(tmp_path, model_dir, story=story) == 0
    group = json.loads((tmp_path / "out" / "manifest.json").read_text())["groups"][0]
    assert group["name"] == "000_park" and group["identity"]["caption"] == "The start"
    frame = group["frames"][0]
    assert (frame["seed"], frame["height"], frame["width"]) == (9, 64, 32)
    assert group["identity"]["seed"] == 2025
    with Image.open(tmp_path / "out" / frame["path"]) as image:
        assert image.size == (32, 64)


def test_two_story_files_get_their_own_folders(tmp_path, model_dir, fake):
    a = write(tmp_path, "a.txt", "park#a cat#sits\npark#a cat#runs\n")
    b = write(tmp_path, "b.txt", "beach#a dog#swims\nbeach#a dog#digs\n")
    assert cli.main(["generate", str(a), str(b), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                     "--height", "32", "--width", "32", "--quiet"]) == 0
    assert (tmp_path / "out" / "a" / "group_000" / "identity.png").exists()
    assert (tmp_path / "out" / "b" / "group_000" / "identity.png").exists()


def test_progress_and_messages_unless_quiet(tmp_path, model_dir, fake, capsys):
    story = write(tmp_path, "story.txt", STORY)
    assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "o1"),
                     "--height", "32", "--width", "32", "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "2 to generate" in captured.out and "images" in captured.err
    assert run(tmp_path, model_dir, out="o2") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "o3"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""           # -q is --quiet, as in most command-line tools


# ------------------------------------------------------------------ bad input: exit 2, the model never loads

ONE = "park#a cat#sits\npark#a cat#runs\n"


@pytest.mark.parametrize("story, extra, message", [
    ("park#a cat\n", [], "story.txt:1: 'park#a cat' has 1 '#'"),
    ("park#a cat#sits\n\n#a dog#swims\n", [], "story.txt:3: the background field is empty"),
    (ONE, ["--height", "40"], "--height 40 is not a positive multiple of 16"),
    (ONE, ["--method", "magic"], "unknown method 'magic'; valid: characonsist, "),
    (ONE, ["--memory", "cloud"], "unknown memory mode 'cloud'; valid: none, model-offload"),
    (ONE, ["--memory", "model-offload"], "needs a CUDA GPU"),
    (ONE, ["--gpu-ids", "a,b"], "--gpu-ids"),
    (ONE, ["--batch-size", "1"], "--batch-size 1 must be >= 2 (a batch holds the identity and at least one frame)"),
    (ONE, ["--method", "vanilla", "--share-bg"], "method 'vanilla' has no option(s) 'share_bg'; its options: none"),
    (ONE, ["--option", "colour=red"], "method 'characonsist' has no option(s) 'colour'; its options: share_bg"),
    (ONE, ["--option", "mask_step=ten"], "option mask_step='ten': must be an integer"),
    # explicit values are checked, never replaced by the defaults
    (ONE, ["--steps", "0"], "--steps 0 must be between 1 and 1000"),
    (ONE, ["--height", "0"], "--height 0 is not a positive multiple of 16"),
    (ONE, ["--width", "0"], "--width 0 is not a positive multiple of 16"),
    (ONE, ["--max-sequence-length", "0"], "--max-sequence-length 0 must be between 1 and 512"),
    (ONE, ["--guidance", "nan"], "--guidance nan must be a finite number"),
    (ONE, ["--guidance", "inf"], "--guidance inf must be a finite number"),
    (ONE, ["--height", "100000"], "--height 100000 is larger than this model takes: at most 2048"),
    (ONE, ["--seed", "-1"], "--seed -1 is out of range"),
    # every option value: type, range, finite, step order, vocabulary, before the model loads
    (ONE, ["--option", "sim_threshold=nan"], "option sim_threshold=nan: must be a finite number"),
    (ONE, ["--option", "share_start=30", "--option", "share_end=2"], "share_start must not be after share_end"),
    (ONE, ["--option", "mask_step=-5"], "option mask_step=-5: must be >= 0"),
    (ONE, ["--option", "volatile_backend=bogus"], "option volatile_backend='bogus': valid: 'flash', 'default'"),
    (ONE, ["--option", "point_tracking=maybe"], "option point_tracking='maybe': must be true or false"),
    (ONE, ["--option", "merge_weight=2"], "option merge_weight=2.0: must be in [0, 1]"),
    (ONE, ["--option", "mask_step"], "--option 'mask_step': expected KEY=VALUE"),
    (ONE, ["--method", "storysync", "--option", "share_blocks=middle"], "option share_blocks='middle': valid: "),
    (ONE, ["--method", "consistory", "--option", "dropout=1.5"], "option dropout=1.5: must be in [0, 1]"),
    (ONE, ["--method", "storydiffusion", "--option", "share_end=abc"], "option share_end='abc': must be an integer"),
    (ONE, ["--steps", "10000000"], "--steps 10000000 must be between 1 and 1000"),
    (ONE, ["--option", "sim_threshold=2"], "option sim_threshold=2.0: must be in [-1, 1]"),
    (ONE, ["--option", "mask_step=60"], "option mask_step=60: the step options are written for schedule_steps=50"),
    # a group that is only an identity line
    ("park#a cat#sits\n\npark#a dog#runs\npark#a dog#sits\n", [], "story.txt:1: this group has an identity image "
     "and no frames"),
    # a huge line is not echoed whole
    ("x" * 200_000 + "\n", [], "(200000 characters)"),
])
def test_bad_input_fails_before_the_model(tmp_path, model_dir, fake, capsys, story, extra, message):
    (model_dir / "vae").mkdir()
    (model_dir / "vae" / "config.json").write_text('{"sample_size": 1024, "block_out_channels": [1, 2, 3, 4]}')
    path = write(tmp_path, "story.txt", story)
    assert run(tmp_path, model_dir, *extra, story=path) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and len(err) < 2000
    assert fake.loads == [] and not (tmp_path / "out").exists()


def test_empty_group_in_yaml(tmp_path, model_dir, fake, capsys):
    path = write(tmp_path, "story.yaml", "scenes:\n  - {name: nothing}\n")
    assert run(tmp_path, model_dir, story=path) == cli.EXIT_BAD_INPUT
    assert "scenes[0]: empty group" in capsys.readouterr().err


def test_a_yaml_scene_of_one_image_is_told_in_yaml_terms(tmp_path, model_dir, fake, capsys):
    path = write(tmp_path, "story.yaml", "scenes:\n  - frames: [{background: park, character: a cat, action: sits}]\n")
    assert run(tmp_path, model_dir, story=path) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "story.yaml: scenes[0].frames[0]: this scene has one image, which is its identity" in err
    assert "blank line" not in err and fake.loads == []


@pytest.mark.parametrize("name, text, message", [
    ("story.yaml", "scenes:\n  - name: x\n    frames: [a, b\n  - c: [\n",
     "story.yaml: not valid YAML: line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence "
     "begun at line 3)"),
    ("story.yaml", "scenes:\n\t- x\n", "story.yaml: not valid YAML: line 2, column 1: found character '\\t'"),
    ("story.toml", "[[scenes]\n", "story.toml: not valid TOML: Expected ']]' at the end of an array declaration"),
])
def test_syntax_errors_are_one_line_with_file_and_line(tmp_path, model_dir, fake, capsys, name, text, message):
    assert run(tmp_path, model_dir, story=write(tmp_path, name, text)) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and fake.loads == []


def test_scene_names_become_distinct_folders_inside_out(tmp_path, model_dir, fake):
    scene = "    character: a cat\n    frames: [{background: park, action: sits}, {background: park, action: runs}]\n"
    names = ["n" * 300, "../../evil", "same", "same", '"a/b"', "Été au lac"]   # a NUL is refused: test_hostile_inputs
    text = "scenes:\n" + "".join(f"  - name: {n}\n{scene}" for n in names)
    assert run(tmp_path, model_dir, story=write(tmp_path, "story.yaml", text)) == 0
    out = tmp_path / "out"
    groups = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert groups == ["000_" + "n" * 40, "001_evil", "002_same", "003_same", "004_a-b", "005_ete-au-lac"]
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "evil").exists()


def test_missing_model_folder(tmp_path, fake, capsys):
    assert run(tmp_path, tmp_path / "no" / "such" / "model") == cli.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(tmp_path, empty) == cli.EXIT_BAD_INPUT
    assert "no model_index.json" in capsys.readouterr().err


def test_gated_hub_model_says_what_to_do(tmp_path, fake, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo, filename, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # the real constructor wants an HTTP response
        Exception.__init__(error, "401 Client Error: access to this model is restricted")
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    assert run(tmp_path, "black-forest-labs/FLUX.1-dev") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "gated" in err and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in err and "HF_TOKEN" in err
    assert fake.loads == []


def test_an_unreachable_hub_is_one_line_without_the_hubs_own_warning(tmp_path, fake, capsys, monkeypatch):
    import logging

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = []

    def offline(repo, filename, **kwargs):   # what huggingface_hub does without a network: warn, then raise
        hub_log = logging.getLogger("huggingface_hub.file_download")
        seen.append(hub_log.isEnabledFor(logging.WARNING))
        hub_log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD %s", repo)
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert run(tmp_path, "owner/repo") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert seen == [False] and "thrown while requesting" not in err
    assert "cannot reach the Hugging Face hub and owner/repo is not in the local cache" in err and fake.loads == []
    assert logging.getLogger("huggingface_hub").isEnabledFor(logging.WARNING)   # put back afterwards


def test_prompt_too_long_for_the_text_encoder(tmp_path, tiny_model, fake, capsys):
    long = "park#a cat with a red hat and a blue scarf and a green coat#sits in the garden\n"
    path = write(tmp_path, "story.txt", "park#a cat#sits\n" + long)
    assert run(tmp_path, tiny_model, "--max-sequence-length", "12", story=path) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "story.txt:2: prompt is" in err and "T5 tokens" in err and "at most 12" in err
    assert "story.txt:1" not in err and fake.loads == []


def test_bench_toy_delegates_to_the_toy_benchmark(monkeypatch, capsys):
    import sys
    import types

    import characonsist.toy

    seen = {}
    bench = types.ModuleType("characonsist.toy.bench")
    bench.add_arguments = lambda parser: parser.add_argument("--frames", type=int, default=3)
    bench.run = lambda args: seen.setdefault("frames", args.frames) and 0
    monkeypatch.setitem(sys.modules, "characonsist.toy.bench", bench)
    monkeypatch.setattr(characonsist.toy, "bench", bench, raising=False)
    assert cli.main(["bench", "toy", "--frames", "7"]) == 0
    assert seen == {"frames": 7}
    for argv, code in ((["bench"], 2), (["bench", "--help"], 0), (["bench", "toy", "--help"], 0)):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == code
    assert "--frames" in capsys.readouterr().out   # the toy bench's own help


def test_method_options_given_as_text_are_read_in_their_types():
    from characonsist.methods.base import parse_option
    from characonsist.methods.characonsist import CharaConsistConfig
    from characonsist.methods.consistory import ConsiStoryConfig

    assert parse_option(ConsiStoryConfig, "feature_step", "3") == 3
    assert parse_option(ConsiStoryConfig, "inject_threshold", "0.25") == 0.25
    assert parse_option(ConsiStoryConfig, "share_end", "none") is None
    assert parse_option(ConsiStoryConfig, "blocks", "single") == "single"
    assert parse_option(CharaConsistConfig, "mask_step", "7") == 7
    assert parse_option(CharaConsistConfig, "point_tracking", "off") is False
    assert parse_option(CharaConsistConfig, "schedule_steps", "none") is None
    assert parse_option(CharaConsistConfig, "mask_step", "ten") == "ten"   # left for the Config to report


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_target_only_a_real_write_can_refuse_is_refused_before_work(tmp_path, capsys):
    """Root passes every permission check, yet nothing can be created in /proc: found before the bench runs."""
    assert cli.main(["bench", "toy", "--json", "/proc/characonsist.json", "--limit", "1"]) == 2
    assert "/proc" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_only_the_known_torchao_notices_are_dropped(caplog):
    import logging

    import characonsist  # noqa: F401  (installs the filters)

    for name, text in (("torch.utils._pytree", "%s is an Enum subclass and is now natively supported by torch.compile"),
                       ("diffusers.quantizers.torchao.torchao_quantizer",
                        "Unable to import `torchao` Tensor objects. This may affect loading checkpoints"),
                       ("torchao", "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: no CUDA %s")):
        log = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            log.warning(text, "X")
            log.warning("another warning stays")
        messages = [r.getMessage() for r in caplog.records if r.name == name]
        assert messages == ["another warning stays"], messages
        caplog.clear()


def test_identity_pictures_are_checked_and_fitted_before_the_model(tmp_path, model_dir, fake, capsys):
    Image.new("RGB", (96, 40), (200, 10, 10)).save(tmp_path / "me.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    story = write(tmp_path, "story.txt", "park#a cat#sits | broken.png\npark#a cat#runs\n\n"
                                         "beach#a dog#swims | gone.png\nbeach#a dog#digs\n")
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"story.txt:1: picture: {tmp_path / 'broken.png'}: not an image PIL can read" in err
    assert f"story.txt:4: picture: {tmp_path / 'gone.png'}: image file not found" in err
    assert fake.loads == [] and not (tmp_path / "out").exists()
    assert run(tmp_path, model_dir, "--inversion", "sideways") == cli.EXIT_BAD_INPUT
    assert "inversion: option mode='sideways': valid: 'renoise'" in capsys.readouterr().err

    story = write(tmp_path, "story.txt", "park#a cat#sits | me.png\npark#a cat#runs\n")
    args = ["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "48", "--steps", "3", "--inversion", "euler"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert f"story.txt:1: identity picture {tmp_path / 'me.png'}: 96x40 downscaled to 77x32, centre-cropped to " \
           "48x32" in said
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    picture = manifest["groups"][0]["identity"]["picture"]
    assert picture["path"] == str(tmp_path / "me.png") and picture["inversion"] == "euler"
    assert len(picture["sha256"]) == 64 and manifest["settings"]["inversion"] == "euler"
    # another picture in the same file is another group: reported, regenerated with --overwrite
    Image.new("RGB", (96, 40), (10, 10, 200)).save(tmp_path / "me.png")
    assert cli.main([*args, "--quiet"]) == cli.EXIT_BAD_INPUT
    assert "identity picture" in capsys.readouterr().err
    assert cli.main([*args, "--quiet", "--overwrite"]) == 0 and len(fake.calls) == 2



def test_a_groups_notes_are_printed_with_their_image(tmp_path, model_dir, fake, capsys):
    fake.notes = {1: ["main step 4: no match above sim_threshold=0.5, no foreground sharing"],
                  2: [f"note {k}" for k in range(4)]}
    story = write(tmp_path, "story.txt", "park#a cat#sits\npark#a cat#runs\nbeach#a cat#swims\n")
    args = ["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--height", "32",
            "--width", "48", "--steps", "3"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "group_000/frame_01: main step 4: no match above sim_threshold=0.5, no foreground sharing" in said
    assert "group_000/frame_02: note 0" in said and "group_000/frame_02: note 1" in said
    assert "note 2" not in said and "group_000: 2 more note(s) in manifest.json" in said
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["groups"][0]["frames"][1]["notes"] == [f"note {k}" for k in range(4)]


def test_what_comes_out_lists_every_file_a_run_leaves(tmp_path, model_dir, fake):
    """examples/README.md's "What comes out" names every kind of file in a finished run's folder."""
    import re

    text = (Path(__file__).parents[1] / "examples" / "README.md").read_text()
    block = text.split("## What comes out", 1)[1].split("```")[1]
    listed = [re.escape(line.split()[0]).replace("<group>", "[^/]+").replace(r"\*", "[^/]*").replace(
        r"frame_01\.png", r"frame_\d+\.png") for line in block.splitlines() if line.startswith("DIR/")]
    assert run(tmp_path, model_dir, "--save-masks") == 0
    out = tmp_path / "out"
    files = [f"DIR/{p.relative_to(out)}" for p in sorted(out.rglob("*")) if p.is_file()]
    assert "DIR/.characonsist.lock" in files
    assert [f for f in files if not any(re.fullmatch(pattern, f) for pattern in listed)] == []
