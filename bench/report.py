"""Print the summary of stored benchmark results: ``python bench/report.py RESULTS.json [...]``.

Re-derives every figure of BENCHMARKS.md from the JSON that ``gpu_bench.py`` wrote (no GPU needed):
ratios to the same-run baseline, TFLOP/s against the measured matmul rate, GPU and host peaks, and where an
ours run's extra time goes (``gpu_bench.segments``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import segment_lines  # noqa: E402


def report(path: str) -> list[str]:
    payload = json.loads(Path(path).read_text())
    env, rate = payload["env"], payload.get("matmul_tflops")
    lines = [f"== {path}: {env.get('gpu')} torch {env.get('torch')} diffusers {env.get('diffusers')} "
             f"{env.get('date_utc')} engine {env.get('engine_commit')} sdpa {env.get('sdpa_policy')}"]
    if rate:
        lines.append(f"bf16 matmul rate measured: {rate:.0f} TFLOP/s")
    records = payload["records"]
    bases = {r["frames"]: r for r in records if r.get("kind") == "baseline" and "wall_s" in r}
    for r in records:
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
        base = bases.get(r.get("frames")) if r.get("kind") == "ours" and not r.get("mode") else None
        if base:
            line += (f"  x{r['wall_s'] / base['wall_s']:.3f}  host {r['rss_peak_gib'] - base['rss_peak_gib']:+.2f} GiB"
                     f"  GPU {100 * (r['gpu_peak_alloc_gib'] / base['gpu_peak_alloc_gib'] - 1):+.1f}%")
        if "gpu_peak_alloc_gib" in r:
            line += f"  GPU peak {r['gpu_peak_alloc_gib']:.2f} alloc / {r['gpu_peak_reserved_gib']:.2f} reserved GiB"
        line += f"  RSS peak {r['rss_peak_gib']:.2f} GiB"
        if r.get("mode"):
            line += f"  {r['steps']} steps, {r['wall_s'] / r['steps']:.2f} s/step"
        if "tflops_wall" in r:
            line += f"  {r['tflops_wall']:.0f} TFLOP/s ({100 * r.get('frac_of_matmul_wall', 0):.0f}% of matmul)"
        lines.append(line)
    for r in records:
        base = bases.get(r.get("frames"))
        if r.get("kind") == "ours" and not r.get("mode") and "wall_s" in r and base:
            lines += segment_lines(r, base)
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(report(arg)))
