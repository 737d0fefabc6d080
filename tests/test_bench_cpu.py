"""The GPU benchmark script end to end on the CPU at toy widths (``--tiny``): every phase, no errors, finite."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_formula_full_size():
    gpu_bench = _load_bench()
    from random_flux import FLUX_DEV_TRANSFORMER, transformer_flops_per_image_step

    flops = transformer_flops_per_image_step(FLUX_DEV_TRANSFORMER, 4096, 512)
    # 57 blocks x (12 D^2 L + 2 L^2 D) MACs, D = 3072, L = 4608, plus the embedders: about 74.4 TFLOP
    assert 74.0e12 < flops < 74.8e12
    assert gpu_bench.story(4)[0].count("#") == 2


def test_bench_tiny_all_phases(tmp_path):
    threads = torch.get_num_threads()
    try:
        bench = _load_bench().main(["--tiny", "--phases", "main:1,profile:1,breakdown:1,modes:1", "--steps", "6",
                                    "--warmup-steps", "1", "--first-warmup-steps", "0", "--profile-steps", "6",
                                    "--mode-steps", "2", "--modes", "plain-flux:one-gpu,ours:one-gpu,ours:model",
                                    "--check-attention", "--sdpa", "flash",
                                    "--out", str(tmp_path), "--tag", "t"])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "bench_t.json").read_text())
    assert payload["env"]["sdpa_policy"] == ["FLASH_ATTENTION", "MATH"]
    records = payload["records"]
    timed = [r for r in records if r.get("phase") != "profile"]
    errors = [(r["name"], r.get("error")) for r in records if "error" in r]
    assert not errors, errors
    names = {r["name"] for r in timed}
    assert {"baseline/2img", "modes/one-gpu/plain-flux"} <= names
    for r in timed:
        assert r["wall_s"] > 0 and r["transformer_calls"] > 0, r["name"]
        assert r["nonfinite_outputs"] == 0 and r["nonfinite_images"] == 0, r["name"]
    if bench.ours is None:
        pytest.skip("engine not importable: only the baseline ran")
    assert "ours/1frames/share_bg=on" in names
    ours = next(r for r in timed if r["name"] == "ours/1frames/share_bg=on")
    assert ours["transformer_calls"] > 6     # the layout pre-run's forwards, then the 6 steps
    assert any(r["name"] == "breakdown/1frames/vanilla-engine" for r in timed)
    profiled = next(r for r in records if r["name"] == "profile/ours")
    assert any(r["range"].startswith("cc::") for r in profiled["ranges"])


def test_report_of_stored_h100_results():
    results = BENCH.parent / "results" / "h100-2026-11-22"
    _load_bench()  # puts bench/ on sys.path
    from report import report

    lines = report(str(results / "bench_final.json"))
    text = "\n".join(lines)
    assert "x1.519" in text and "x1.339" in text      # the figures BENCHMARKS.md quotes
    assert "pre-run" in text and "415 TFLOP/s" in text
    assert any("sequential-offload" in x for x in report(str(results / "bench_modes.json")))
