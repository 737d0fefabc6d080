"""Print the summary of stored benchmark results: ``python bench/report.py RESULTS.json [...]``.

A memory-mode table (``--phases table``) prints as the table (``memory_table.table_lines``); several table files
(calls A and B) print one table each.

Re-derives every figure of BENCHMARKS.md from the JSON that ``gpu_bench.py`` wrote (no GPU needed):
ratios to the same-run baseline (ours, its ``--ours-variants`` and the peer methods, each against the baseline
its record names), TFLOP/s against the measured matmul rate, GPU and host peaks, where an ours run's extra time
goes (``gpu_bench.segments``), and the SDPA first-call/plan measurements of the ``plans`` phase.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import baseline_of, segment_lines  # noqa: E402
from sdpa_check import plans_lines  # noqa: E402


def report(path: str) -> list[str]:
    payload = json.loads(Path(path).read_text())
    if any(r.get("entry") for r in payload["records"]):   # the memory-mode table (gpu_bench.py --phases table)
        from memory_table import table_lines

        env = payload["env"]
        return [f"== {path}: {env.get('gpu')} torch {env.get('torch')} diffusers {env.get('diffusers')} torchao "
                f"{env.get('torchao')} bitsandbytes {env.get('bitsandbytes')} {env.get('date_utc')} engine "
                f"{env.get('engine_commit')}", *table_lines(payload["records"])]
    env, rate = payload["env"], payload.get("matmul_tflops")
    lines = [f"== {path}: {env.get('gpu')} torch {env.get('torch')} diffusers {env.get('diffusers')} "
             f"{env.get('date_utc')} engine {env.get('engine_commit')} sdpa {env.get('sdpa_policy')}"]
    if rate:
        lines.append(f"bf16 matmul rate measured: {rate:.0f} TFLOP/s")
    records = payload["records"]
    for r in records:
        if r.get("phase") == "plans":
            if "skipped" in r:
                lines.append(f"{r['name']:<40} skipped ({r['skipped']})")
            else:
                lines.append(f"{r['name']:<40} first SDPA call on a new (Sq, Sk) shape vs repeats (policy "
                             f"{r.get('sdpa_policy')}):")
                lines += plans_lines(r)
            continue
        if r.get("phase") == "profile":
            kernels = ", ".join(f"{k['kernel'][:60]} x{k['calls']} ({k['gpu_ms']:.0f} ms)"
                                for k in r.get("attention_kernels", [])[:2])
            lines.append(f"{r['name']:<40} {r.get('steps')} steps profiled: wall {r.get('wall_ms', 0):.0f} ms, GPU busy "
                         f"{100 * r.get('gpu_busy_frac', 0):.0f}%, attention {kernels}")
            gpu_ranges = {x["range"]: x["gpu_ms"] for x in r.get("ranges", []) if x.get("on_device")}
            if gpu_ranges:
                lines.append("    GPU ms by component: " + ", ".join(f"{k} {v:.0f}" for k, v in gpu_ranges.items()))
            continue
        if "wall_s" not in r:
            lines.append(f"{r['name']:<40} {'skipped' if r.get('skipped') else 'ERROR ' + str(r.get('error'))[:100]}")
            continue
        line = f"{r['name']:<40} {r['wall_s']:7.2f} s"
        base = baseline_of(records, r)
        if base and "wall_s" in base:
            line += f"  x{r['wall_s'] / base['wall_s']:.3f}  host {r['rss_peak_gib'] - base['rss_peak_gib']:+.2f} GiB"
            if "gpu_peak_alloc_gib" in r and "gpu_peak_alloc_gib" in base:
                line += f"  GPU {100 * (r['gpu_peak_alloc_gib'] / base['gpu_peak_alloc_gib'] - 1):+.1f}%"
            if "baseline" in r:  # the records name their baseline since the peers phase exists
                line += f"  [vs {r['baseline']}{', reused' if r.get('baseline_reused') else ''}]"
        if "gpu_peak_alloc_gib" in r:
            line += f"  GPU peak {r['gpu_peak_alloc_gib']:.2f} alloc / {r['gpu_peak_reserved_gib']:.2f} reserved GiB"
        line += f"  RSS peak {r['rss_peak_gib']:.2f} GiB"
        if r.get("mode"):
            line += f"  {r['steps']} steps, {r['wall_s'] / r['steps']:.2f} s/step"
        if "tflops_wall" in r:
            line += f"  {r['tflops_wall']:.0f} TFLOP/s ({100 * r.get('frac_of_matmul_wall', 0):.0f}% of matmul)"
        if r.get("options") and r.get("variant"):
            line += f"  options {r['options']}"
        if r.get("kind") == "picture" and "inversion_calls" in r:   # the identity from a picture
            line += f"  inversion {r['inversion_calls']} forwards {r['inversion_s']:.2f} s"
            if "x_story" in r:
                line += f", x{r['x_story']:.3f} the story without a picture"
                if "gpu_peak_alloc_x_story" in r:
                    line += f" (GPU peak x{r['gpu_peak_alloc_x_story']:.3f})"
        lines.append(line)
    lines += comparison_table(records)
    for r in records:
        base = baseline_of(records, r)
        if r.get("kind") == "ours" and not r.get("mode") and "wall_s" in r and base and "wall_s" in base:
            lines += segment_lines(r, base)
    return lines


def comparison_table(records: list[dict]) -> list[str]:
    """Ours (share_bg on/off, variants) and the peer methods against plain FLUX, one block per baseline."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        base = baseline_of(records, r)
        if r.get("kind") in ("ours", "peer", "picture") and not r.get("mode") and r.get("phase") != "breakdown" \
                and "wall_s" in r and base and "wall_s" in base:
            groups.setdefault(next(i for i, x in enumerate(records) if x is base), []).append(r)
    lines = []
    for index, runs in groups.items():
        base = records[index]
        lines.append(f"against {base['name']} (record {index}, phase {base.get('phase')}, {base['wall_s']:.2f} s"
                     + (f", GPU peak {base['gpu_peak_alloc_gib']:.2f}/{base['gpu_peak_reserved_gib']:.2f} GiB"
                        if "gpu_peak_alloc_gib" in base else "") + f", RSS peak {base['rss_peak_gib']:.2f} GiB):")
        lines.append(f"    {'run':<36} {'wall':>8} {'x base':>7} {'GPU alloc':>10} {'GPU resv':>9} {'host':>7}")
        for r in runs:
            gpu = (f"{r['gpu_peak_alloc_gib'] / base['gpu_peak_alloc_gib']:>9.3f}x "
                   f"{r['gpu_peak_reserved_gib'] / base['gpu_peak_reserved_gib']:>8.3f}x"
                   if "gpu_peak_alloc_gib" in r and "gpu_peak_alloc_gib" in base else f"{'-':>10} {'-':>9}")
            lines.append(f"    {r['name'][:36]:<36} {r['wall_s']:7.2f}s {r['wall_s'] / base['wall_s']:6.3f}x {gpu} "
                         f"{r['rss_peak_gib'] - base['rss_peak_gib']:+6.2f}G")
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(report(arg)))
