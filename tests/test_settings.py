"""``StorySettings``: made once from a request, written to the manifest and read back; a run folder written by
version 0.1.0 (before the settings object, ``tests/data/run_0.1.0``: the toy model, 4 steps, ``--no-share-bg
--option mask_step=2 --seed 7 --save-masks``) resumes with nothing left to generate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from characonsist import cli
from characonsist.app import StoryRequest, StoryRun, StorySettings, validate_request
from characonsist.app.settings import method_config
from characonsist.inputs import InputError

FIXTURE = Path(__file__).parent / "data" / "run_0.1.0"


@pytest.fixture
def old_run(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    return folder


def old_request(folder: Path) -> StoryRequest:
    return StoryRequest(stories=[str(folder / "story.txt")], model="toy", out=str(folder), dtype="float32",
                        num_inference_steps=4, seed=7, save_masks=True,
                        method_options={"share_bg": False, "mask_step": "2"})   # text, as --option gives it


def test_a_run_folder_of_version_0_1_0_resumes_from_python(old_run):
    old = json.loads((old_run / "manifest.json").read_text())
    checked = validate_request(old_request(old_run))
    assert StorySettings.from_manifest(old["settings"]) == checked.settings   # read back: the same object
    with StoryRun(checked) as run:
        assert [j.state for j in run.jobs] == ["done"] and run.todo == []
    new = json.loads((old_run / "manifest.json").read_text())
    assert new["settings"] == old["settings"]
    assert [g["settings_hash"] for g in new["groups"]] == [g["settings_hash"] for g in old["groups"]]


def test_a_run_folder_of_version_0_1_0_resumes_from_the_command_line(old_run, fake, capsys):
    before = {p: p.read_bytes() for p in old_run.rglob("*.png")}
    status = cli.main(["generate", str(old_run / "story.txt"), "--model", "toy", "--out", str(old_run), "--dtype",
                       "float32", "--steps", "4", "--no-share-bg", "--option", "mask_step=2", "--seed", "7",
                       "--save-masks"])
    assert status == 0 and fake.calls == []          # nothing generated again
    assert "1 already done, 0 to generate" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in old_run.rglob("*.png")} == before


def test_a_changed_setting_is_a_conflict_naming_the_field(old_run):
    request = dataclasses.replace(old_request(old_run), method_options={"share_bg": False, "mask_step": "3"})
    with pytest.raises(InputError) as info:
        StoryRun(validate_request(request)).__enter__()
    assert "method_options" in str(info.value) and "'mask_step': 3" in str(info.value)
    assert "Rerun with overwrite=True" in str(info.value)        # a field, not a flag, from Python


def test_settings_are_frozen_and_the_method_config_is_checked_once(old_run):
    settings = validate_request(old_request(old_run)).settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 8
    assert settings.method_options == {"share_bg": False, "use_token_merge": True, "mask_step": 2}
    method = settings.method_instance()
    assert method.config is settings.method_config       # the pipeline gets the checked Config itself
    assert settings.pipeline_arguments()["method"].config is settings.method_config


def test_from_manifest_names_what_is_wrong():
    good = json.loads((FIXTURE / "manifest.json").read_text())["settings"]
    with pytest.raises(InputError, match="settings: missing num_inference_steps"):
        StorySettings.from_manifest({k: v for k, v in good.items() if k != "num_inference_steps"})
    with pytest.raises(InputError, match="mask_step"):
        StorySettings.from_manifest({**good, "method_options": {"mask_step": -1}})
    with pytest.raises(InputError, match="has no option"):
        method_config("characonsist", {"mask_stp": 2})


def test_the_output_folder_is_named_as_each_front_end_names_it(tmp_path):
    """A run folder that is a file: Python names the field ``out``, the command line its flag."""
    from characonsist.app.folder import FolderError

    target = tmp_path / "taken"
    target.write_text("someone's file")
    request = StoryRequest(stories=[str(Path(__file__).parent / "data" / "run_0.1.0" / "story.txt")], model="toy",
                           out=str(target))
    with pytest.raises(FolderError, match=f"^out {target} is a file"):
        validate_request(request)
    with pytest.raises(FolderError, match=f"^--out {target} is a file"):
        validate_request(request, names=cli.FLAGS)
