"""``characonsist generate`` with weight formats, memory modes, LoRAs, attention backends and compilation: checked
before the model loads, recorded in the manifest, and (weights only) part of a group's settings; one run end to end
on the real engine with an int8 backbone and a LoRA (CPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from characonsist import cli
from characonsist.app import loading as app_loading
from characonsist.output import read_png_record

STORY = "park#a cat#sitting\npark#a cat#running\n"


def generate(tmp_path, model, *extra, out="out", quiet=True):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    return cli.main(["generate", str(story), "--model", str(model), "--out", str(tmp_path / out), "--height", "32",
                     "--width", "32", "--steps", "3", "--max-sequence-length", "32", *(["--quiet"] if quiet else []),
                     *extra])


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int3"], "unknown weight format --quantize 'int3'; valid: none, int8, fp8, nf4"),
    (["--quantize", "nf4"], "--quantize nf4 needs a CUDA GPU"),
    (["--memory", "group-offload"], "memory mode 'group-offload' needs a CUDA GPU"),
    (["--attention-backend", "warp"], "unknown attention backend 'warp'; valid: default, flash"),
    (["--lora", "missing.safetensors:0.5"], "--lora 'missing.safetensors': no such file or folder"),
    (["--lora", "x.safetensors:nan"], "the scale must be a finite number"),
])
def test_bad_memory_options_exit_2_before_loading(tmp_path, tiny_model, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(app_loading, "load_engine", lambda *a, **k: pytest.fail("the model must not load"))
    if extra[0] == "--lora" and "nan" in extra[1]:
        (tmp_path / "x.safetensors").write_bytes(b"")
        monkeypatch.chdir(tmp_path)
    assert generate(tmp_path, tiny_model, *extra) == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_memory_auto_says_what_it_chose(tmp_path, tiny_model, capsys, monkeypatch):
    loads = []

    def load_engine(ref, settings, progress=True):
        loads.append((settings.memory, settings.quantize))
        raise KeyboardInterrupt   # stop right after the choice: nothing generated

    monkeypatch.setattr(app_loading, "load_engine", load_engine)
    assert generate(tmp_path, tiny_model, "--memory", "auto", quiet=False) == cli.EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "memory: --quantize none --memory none: no CUDA GPU" in out
    assert loads == [("none", "none")]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None or importlib.util.find_spec("peft") is None,
                    reason="needs torchao and peft")
def test_int8_backbone_and_lora_end_to_end(tmp_path, tiny_model, capsys):
    from test_memory import _tiny_lora

    lora = _tiny_lora(tiny_model, tmp_path)
    assert generate(tmp_path, tiny_model, "--method", "vanilla", out="plain") == 0
    assert generate(tmp_path, tiny_model, "--quantize", "int8", "--lora", f"{lora}:0.5", "--attention-backend",
                    "_native_math", "--vae-tiling") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["quantize"] == "int8" and settings["memory"] == "none" and settings["vae_tiling"] is True
    assert settings["loras"] == [{"source": str(lora), "scale": 0.5}]
    assert settings["attention_backend"] == "_native_math" and settings["compile"] is False
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert plain["settings"]["quantize"] == "none"
    # the weights are in a group's settings only when set, so earlier runs keep their settings hashes
    assert "quantize" not in read_png_record(tmp_path / "plain" / "group_000" / "identity.png")["settings"]
    record = read_png_record(tmp_path / "out" / "group_000" / "identity.png")
    assert record["settings"]["quantize"] == "int8" and record["settings"]["loras"][0]["scale"] == 0.5
    # the weights are part of a group's settings: the same folder with other weights is a conflict
    capsys.readouterr()
    assert generate(tmp_path, tiny_model, "--quantize", "int8") == cli.EXIT_BAD_INPUT
    assert "were generated with other settings" in capsys.readouterr().err
    # memory modes, tiling, backends are not: the finished run is found done
    assert generate(tmp_path, tiny_model, "--quantize", "int8", "--lora", f"{lora}:0.5") == 0


def test_help_has_one_line_per_memory_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--quantize", "--memory", "--vae-tiling", "--attention-backend", "--compile", "--lora"):
        assert option in text
    assert "group-offload" in text and "auto" in text and "nf4" in text
