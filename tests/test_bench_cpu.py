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


@pytest.mark.slow
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


def test_parse_variants():
    gpu_bench = _load_bench()
    assert gpu_bench.parse_variants("cudnn:volatile_backend=default,nm:use_token_merge=False;merge_weight=0.5;x=none") \
        == [("cudnn", {"volatile_backend": "default"}), ("nm", {"use_token_merge": False, "merge_weight": 0.5, "x": None})]
    assert gpu_bench.parse_variants("") == []
    for bad in ("novalue", "a:b", "a:=1", ":b=1", "a:b=1,a:c=2"):
        with pytest.raises(ValueError):
            gpu_bench.parse_variants(bad)


@pytest.mark.slow
def test_bench_tiny_peers_variants_plans(tmp_path):
    """main then peers in one process: the peers reuse main's baseline; a variant passes its options; plans runs
    its toy path; a peers phase alone runs its own baseline; the report prints every ratio."""
    gpu_bench = _load_bench()
    threads = torch.get_num_threads()
    common = ["--tiny", "--steps", "4", "--warmup-steps", "1", "--first-warmup-steps", "0", "--no-vae-slicing"]
    try:
        bench = gpu_bench.main([*common, "--phases", "main:1,peers:1,plans", "--ours-variants",
                                "nomerge:use_token_merge=False", "--out", str(tmp_path), "--tag", "p"])
        if bench.ours is None:
            pytest.skip("engine not importable: only the baseline ran")
        gpu_bench.main([*common, "--phases", "peers:1", "--peer-methods", "storydiffusion", "--out", str(tmp_path),
                        "--tag", "alone"])
    finally:
        torch.set_num_threads(threads)
    records = json.loads((tmp_path / "bench_p.json").read_text())["records"]
    by_name = {r["name"]: r for r in records}
    errors = [(r["name"], r.get("error")) for r in records if "error" in r]
    assert not errors, errors
    base = by_name["baseline/2img"]
    assert [r["name"] for r in records].count("baseline/2img") == 1     # peers reused main's baseline
    expected = ["ours/1frames/share_bg=on", "ours/1frames/share_bg=off", "ours/1frames/nomerge",
                "peers/1frames/consistory", "peers/1frames/storysync", "peers/1frames/storydiffusion"]
    for name in expected:
        r = by_name[name]
        assert r["baseline"] == "baseline/2img" and records[r["baseline_record"]] is not None, name
        assert records[r["baseline_record"]]["name"] == "baseline/2img", name
        assert r["x_baseline"] == pytest.approx(r["wall_s"] / base["wall_s"]), name
        assert r["host_peak_delta_gib"] == pytest.approx(r["rss_peak_gib"] - base["rss_peak_gib"]), name
        assert r["nonfinite_outputs"] == 0 and r["nonfinite_images"] == 0, name
    assert by_name["ours/1frames/nomerge"]["options"] == {"share_bg": True, "use_token_merge": False}
    assert by_name["ours/1frames/nomerge"]["settings"]["method_options"]["use_token_merge"] is False
    assert all(by_name[n]["baseline_reused"] for n in expected[3:])
    assert {by_name[n]["method"] for n in expected[3:]} == {"consistory", "storysync", "storydiffusion"}
    plans = by_name["plans/sdpa"]
    assert plans["plan_cost"]["backends"]["default"]["shapes"][0]["first_ms"] > 0
    assert len({(s["sq"], s["sk"]) for b in plans["plan_cost"]["backends"].values() for s in b["shapes"]}) \
        == sum(len(b["shapes"]) for b in plans["plan_cost"]["backends"].values())    # every shape new
    assert plans["mask"]["runs"]["default/bool"]["max_abs_diff"] < 1e-4
    assert "error" in plans["mask"]["runs"]["cudnn/bool"]                          # no cuDNN on a CPU

    alone = json.loads((tmp_path / "bench_alone.json").read_text())["records"]
    peer = next(r for r in alone if r["name"] == "peers/1frames/storydiffusion")
    assert peer["baseline_reused"] is False and peer["baseline_phase"] == "peers" and "x_baseline" in peer

    from report import report

    text = "\n".join(report(str(tmp_path / "bench_p.json")))
    for name in expected:
        assert f"    {name}" in text, name
    assert "against baseline/2img" in text and "sdpa flash" in text


def test_report_of_stored_h100_results():
    results = BENCH.parent / "results" / "h100-2026-11-22"
    _load_bench()  # puts bench/ on sys.path
    from report import report

    lines = report(str(results / "bench_final.json"))
    text = "\n".join(lines)
    assert "x1.519" in text and "x1.339" in text      # the figures BENCHMARKS.md quotes
    assert "pre-run" in text and "415 TFLOP/s" in text
    assert any("sequential-offload" in x for x in report(str(results / "bench_modes.json")))


@pytest.mark.slow
def test_bench_tiny_picture_phase(tmp_path):
    """The picture phase: the story without a picture, then one run per inversion with the identity from a
    picture of another size; the inversion's forwards are the batch-1 calls (none for renoise, N for Euler)."""
    gpu_bench = _load_bench()
    threads = torch.get_num_threads()
    try:
        bench = gpu_bench.main(["--tiny", "--steps", "4", "--warmup-steps", "0", "--first-warmup-steps", "0",
                                "--phases", "picture:1", "--picture-inversions", "renoise,euler",
                                "--picture-size", "48x80", "--out", str(tmp_path), "--tag", "pic"])
    finally:
        torch.set_num_threads(threads)
    if bench.ours is None:
        pytest.skip("engine not importable")
    records = {r["name"]: r for r in json.loads((tmp_path / "bench_pic.json").read_text())["records"]}
    assert not [(n, r["error"]) for n, r in records.items() if "error" in r]
    story = records["ours/1frames/share_bg=on"]
    for inversion, calls in (("renoise", 0), ("euler", 4)):
        r = records[f"picture/1frames/{inversion}"]
        assert r["inversion_calls"] == calls and r["picture_size"] == [48, 80]
        assert r["transformer_calls"] == story["transformer_calls"] + calls
        assert r["x_story"] == pytest.approx(r["wall_s"] / story["wall_s"]) and r["baseline"] == "baseline/2img"
        assert r["settings"]["identity_picture"]["fit"] == "80x48 upscaled to 107x64, centre-cropped to 64x64 " \
                                                           "(40% of it cut)"
        assert r["nonfinite_outputs"] == 0 and r["nonfinite_images"] == 0
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--tiny", "--picture-size", "big"])
    from report import report

    text = "\n".join(report(str(tmp_path / "bench_pic.json")))
    assert "inversion 4 forwards" in text and "the story without a picture" in text


@pytest.mark.slow
@pytest.mark.parametrize("with_wheels", [False, True])
def test_gpu_scripts_take_the_installed_packages_without_carried_wheels(tmp_path, with_wheels):
    """bench/gpu_env.sh: without .whl/ the installed packages and the checkout's src/ are used (a user's own GPU
    machine); with .whl/ holding wheels, they are installed to /tmp/site first (the lent machine). A wheel that does
    not install stops the script with a message."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu_env.sh").write_bytes((root / "bench" / "gpu_env.sh").read_bytes())
    if with_wheels:
        (tmp_path / ".whl").mkdir()
        (tmp_path / ".whl" / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-c", "source bench/gpu_env.sh && echo PYTHONPATH=$PYTHONPATH"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    if with_wheels:
        assert result.returncode == 1 and "installing the wheels of .whl/ failed" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"PYTHONPATH={tmp_path}/src" in result.stdout
