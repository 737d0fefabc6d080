"""The memory-mode table of the GPU benchmark (``gpu_bench.py --phases table``, ``bench/memory_table.py``) at toy
widths on the CPU: a saved random checkpoint loaded in each entry's weight format by its own process, plain
FluxPipeline and ours in the same process, compile on both sides; the budget guard; $OUT keeps two files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_table_tiny_end_to_end(tmp_path):
    gpu_bench = _load("gpu_bench")
    threads = torch.get_num_threads()
    try:
        records = gpu_bench.main(["--tiny", "--phases", "table", "--table-modes",
                                  "int8/none+compile@2,none/model-offload", "--compile-backend", "eager",
                                  "--steps", "3", "--first-warmup-steps", "0", "--table-gpus", "0,1",
                                  "--out", str(tmp_path), "--tag", "t"])
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_t.json", "log_t.txt", "tiny-checkpoint"]
    saved = json.loads((tmp_path / "bench_t.json").read_text())
    assert saved["records"] == json.loads(json.dumps(records, default=str))
    by = {r["name"]: r for r in records}
    errors = [(r["name"], r["error"]) for r in records if "error" in r]
    assert not errors, errors
    weights = by["int8/none+compile@2/load"]["pipeline"]["weights"]
    assert weights["transformer"] == weights["text_encoder_2"] == "torchao" and weights["vae"] == "float32"
    assert by["none/model-offload/load"]["skipped"] == "model-offload needs CUDA"
    for entry, frames in (("int8/none+compile@2", 2),):
        base, ours = by[f"{entry}/baseline"], by[f"{entry}/ours"]
        assert base["n_images"] == ours["n_images"] == frames + 1
        for r in (base, ours):
            assert r["wall_s"] > 0 and r["nonfinite_outputs"] == 0 and r["nonfinite_images"] == 0
        assert ours["transformer_calls"] > base["transformer_calls"]     # the layout pre-run
        assert ours["x_baseline"] == pytest.approx(ours["wall_s"] / base["wall_s"])
        assert ours["baseline"] == f"{entry}/baseline"
    eager = by["int8/none+compile@2/baseline-eager"]
    assert by["int8/none+compile@2/ours"]["x_baseline_eager"] == pytest.approx(
        by["int8/none+compile@2/ours"]["wall_s"] / eager["wall_s"])
    assert "x bf16" in _load("report").report(str(tmp_path / "bench_t.json"))[1]
    lines = _load("memory_table").table_lines(records)
    assert any(line.startswith("int8/none+compile@2 ") for line in lines)
    assert any("needs CUDA" in line for line in lines)


def test_budget_guard_skips_and_records_killed_children(tmp_path, monkeypatch):
    table = _load("memory_table")
    gpu_bench = _load("gpu_bench")
    args = gpu_bench.parse_args(["--tiny", "--phases", "table", "--budget-s", "50", "--out", str(tmp_path)])
    full = gpu_bench.parse_args(["--phases", "table"])
    entries = [table.parse_entry(e, 4) for e in full.table_modes]
    assert sum(table.estimate_s(e, False) for e in entries) > 600   # the whole table needs more than one call
    calls, now = [], [0.0]

    def child(args, what, gpu, timeout, tag, work, log):
        calls.append(what)
        now[0] += 0.0 if what == "checkpoint" else 20.0     # each entry takes 20 s of a fake clock
        if what == "checkpoint":
            return [{"name": "checkpoint"}], None
        if what == "int8/none":
            return [{"name": "int8/none/load", "entry": what, "load_s": 1.0, "load_rss_peak_gib": 0.5,
                     "pipeline": {}}], "killed after 80 s"
        return [{"name": f"{what}/load", "entry": what, "load_s": 1.0, "load_rss_peak_gib": 0.5, "pipeline": {}}], None

    monkeypatch.setattr(table, "_child", child)
    monkeypatch.setattr(table, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(table, "estimate_s", lambda entry, tiny, correction=1.0: 20.0 * correction)
    records = table.run_table(args, ["none/none", "int8/none", "fp8-storage/none"], log=lambda m: None)
    assert calls == ["checkpoint", "none/none", "int8/none"]     # 20 s each: the third would end past 50 s
    by = {r["name"]: r for r in records}
    assert by["int8/none/process"]["error"] == "killed after 80 s"
    assert "estimate 20 s > 10 s left" in by["fp8-storage/none"]["skipped"]
    with pytest.raises(ValueError, match="QUANTIZE/MEMORY"):
        table.parse_entry("int8-model-offload", 4)
    assert table.parse_entry("nf4/model-offload+compile@8", 4) == {
        "name": "nf4/model-offload+compile@8", "quantize": "nf4", "memory": "model-offload", "compile": True,
        "frames": 8}
