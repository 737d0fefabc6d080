"""``memory.MEASURED`` and ``--memory auto`` against the GPU measurements themselves (BENCHMARKS.md, "Memory modes
measured"): the JSON that ``bench/gpu_bench.py`` wrote on the H100, not the estimates."""

import json
from pathlib import Path

import pytest

from characonsist import memory

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "h100-2026-12-06"


def _records(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["records"]


def measured_table() -> dict[tuple[str, str], dict]:
    """(format, mode) -> GPU peaks (the larger of plain and ours), host peak (loading included), ours' wall time,
    from the table runs; bf16 on one GPU from the headline run (weights made on the GPU, so no loading peak)."""
    table: dict[tuple[str, str], dict] = {}
    for record in _records("bench_A.json") + _records("bench_B.json"):
        if "quantize" not in record or "skipped" in record:
            continue
        row = table.setdefault((record["quantize"], record["memory"]), {"alloc": 0.0, "reserved": 0.0, "host": 0.0})
        if record["name"].endswith("/load"):
            row["host"] = max(row["host"], record["load_rss_peak_gib"])
            continue
        row["alloc"] = max(row["alloc"], record["gpu_peak_alloc_gib"])
        row["reserved"] = max(row["reserved"], record["gpu_peak_reserved_gib"])
        row["host"] = max(row["host"], record["vmhwm_gib"])
        if record["kind"] == "ours":
            row["ours_s"] = record["wall_s"]
            row["x_plain"] = record["x_baseline"]
    head = {r["name"]: r for r in _records("bench_head.json")}
    bf16 = head["ours/4frames/share_bg=on"]
    table[("none", "none")] = {"alloc": bf16["gpu_peak_alloc_gib"], "reserved": bf16["gpu_peak_reserved_gib"],
                               "host": bf16["vmhwm_gib"], "ours_s": bf16["wall_s"], "x_plain": bf16["x_baseline"]}
    return table


def test_the_measured_constants_are_the_json():
    table = measured_table()
    assert len(table) >= 5
    bf16_s = table[("none", "none")]["ours_s"]
    for key, row in table.items():
        m = memory.MEASURED[key]
        assert m.gpu_gib == pytest.approx(row["alloc"], abs=0.01), key
        assert m.reserved_gib == pytest.approx(row["reserved"], abs=0.01), key
        assert m.speed == pytest.approx(row["ours_s"] / bf16_s, abs=0.002), key
        if key != ("none", "none"):      # bf16's host figure is the first session's (2.43 >= 2.33 GiB)
            assert m.host_gib == pytest.approx(row["host"], abs=0.01), key
        assert m.host_gib >= row["host"] - 0.01
        needs = memory.estimate_needs(key[1], key[0])
        assert needs.measured and needs.gpu_gib == pytest.approx(row["alloc"], abs=0.01)


# Cards people have: (free GiB once the desktop and CUDA context are up, host GiB available, weight formats it runs).
CARDS = {
    "24 GB (RTX 3090/4090), 32 GB host": (23.0, 29.0, ["none", "int8", "fp8", "nf4", "int8-bnb", "fp8-storage"]),
    "24 GB (RTX 3090/4090), 64 GB host": (23.0, 60.0, ["none", "int8", "fp8", "nf4", "int8-bnb", "fp8-storage"]),
    "16 GB (RTX 4060 Ti / 4080), 32 GB host": (15.0, 29.0, ["none", "int8", "fp8", "nf4", "int8-bnb", "fp8-storage"]),
    "16 GB, 64 GB host": (15.0, 60.0, ["none", "int8", "nf4", "int8-bnb", "fp8-storage"]),
    "80 GB (H100)": (78.0, 120.0, ["none", "int8", "fp8", "nf4", "int8-bnb", "fp8-storage"]),
}


@pytest.mark.parametrize("card", list(CARDS))
def test_auto_picks_a_mode_the_table_shows_fits(card):
    gpu, host, formats = CARDS[card]
    plan = memory.choose_plan(gpu, host, formats)
    row = measured_table().get((plan.quantize, plan.memory))
    assert row is not None, f"{card}: auto chose {plan.quantize}/{plan.memory}, which was never measured"
    assert row["reserved"] + memory.GPU_CONTEXT_GIB <= gpu, (card, plan.describe())
    assert row["host"] <= host, (card, plan.describe())
    assert "measured" in plan.reason


def test_the_issue_targets_are_what_auto_gives_small_cards():
    """A 24 GB card gets a plan of at most 20 GiB reserved, a 16 GB card one of at most 12 GiB, each measured at
    most 1.3x plain FLUX in the same mode."""
    table = measured_table()
    for (gpu, host, formats), limit in ((CARDS["24 GB (RTX 3090/4090), 32 GB host"], 20.0),
                                        (CARDS["16 GB (RTX 4060 Ti / 4080), 32 GB host"], 12.0)):
        plan = memory.choose_plan(gpu, host, formats)
        row = table[(plan.quantize, plan.memory)]
        assert row["reserved"] <= limit and row["x_plain"] <= 1.3, plan.describe()


def test_the_out_of_memory_advice_offers_only_modes_that_need_less():
    """The modes are listed from the most to the least GPU memory (group offload's figure is the measured one), so
    the advice after an out-of-memory error, which offers the modes after the failed one, never offers more."""
    from characonsist.app.memory_plan import MEMORY_MODES

    needs = [need for _, need in MEMORY_MODES.values()]
    assert needs == sorted(needs, reverse=True)
    assert MEMORY_MODES["group-offload"][1] == round(memory.MEASURED[("none", "group-offload")].reserved_gib
                                                     + memory.GPU_CONTEXT_GIB)
