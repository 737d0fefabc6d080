"""Compare a data-parallel run with a one-process run.

    python bench/dp_compare.py toy ONE.json MANY.json [--images ONE_DIR MANY_DIR]
        `characonsist bench toy` results: identical apart from timings (and the process count), strips byte for byte
    python bench/dp_compare.py folders ONE_DIR MANY_DIR
        two `characonsist generate` output folders: every file byte for byte (manifest.json included)
    python bench/dp_compare.py speed ONE.json MANY.json
        two `bench/dp_bench.py` results: throughput ratio, peak GPU memory per process, images equal or not

Prints what differs; exits 1 when the compared contents differ (speed: never, it only reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# what may differ between a one-process and a many-process toy bench: timings, and how many processes ran
TIMING_KEYS = {"seconds", "wall_seconds", "seconds_per_story", "load_seconds", "run_seconds", "total_seconds",
               "processes"}


def strip_timings(value):
    """``value`` (a bench JSON) without :data:`TIMING_KEYS`, anywhere."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def differences(a, b, where: str = "") -> list[str]:
    """Paths where two JSON values differ (at most a few per branch)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} != {b!r}"]


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), the folder's lock and journal left out."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".characonsist")}


def compare_folders(one: Path, many: Path) -> list[str]:
    a, b = files(one), files(many)
    out = [f"{name}: only in {one if name in a else many}" for name in sorted(set(a) ^ set(b))]
    out += [f"{name}: bytes differ" for name in sorted(set(a) & set(b)) if a[name] != b[name]]
    return out


def compare_toy(one: Path, many: Path, images: list[Path] | None) -> list[str]:
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    out = differences(strip_timings(a), strip_timings(b))
    if images:
        out += compare_folders(*images)
        print(f"images: {len(files(images[0]))} files in {images[0]}, {len(files(images[1]))} in {images[1]}")
    sa, sb = a["settings"], b["settings"]
    print(f"one: {sa.get('processes', 1)} process(es), run {sa['run_seconds']:.1f} s; many: "
          f"{sb.get('processes', 1)} process(es), run {sb['run_seconds']:.1f} s; "
          f"throughput ratio {sa['run_seconds'] / sb['run_seconds']:.3f}x (run time, loading excluded)")
    return out


def compare_speed(one: Path, many: Path) -> list[str]:
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    for tag, r in (("one", a), ("many", b)):
        peaks = ", ".join(f"process {p['rank']} {p.get('gpu_peak_alloc_gib', float('nan')):.2f} / "
                          f"{p.get('gpu_peak_reserved_gib', float('nan')):.2f} GiB" for p in r["per_process"])
        print(f"{tag}: {r['processes']} process(es), {r['groups']} groups, {r['images']} images, "
              f"run {r['run_seconds']:.1f} s ({r['images'] / r['run_seconds']:.3f} images/s), load "
              f"{r['load_seconds']:.1f} s; peak alloc / reserved: {peaks}")
    print(f"throughput ratio {a['run_seconds'] / b['run_seconds']:.3f}x ({b['processes']} against "
          f"{a['processes']} process(es); run time from every model loaded to the last group written)")
    if a.get("out") and b.get("out") and Path(a["out"]).is_dir() and Path(b["out"]).is_dir():
        diff = compare_folders(Path(a["out"]), Path(b["out"]))
        print("images: byte-identical" if not diff else f"images: {len(diff)} file(s) differ (e.g. {diff[0]})")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["toy", "folders", "speed"])
    parser.add_argument("one", type=Path, help="the one-process result (JSON or folder)")
    parser.add_argument("many", type=Path, help="the many-process result")
    parser.add_argument("--images", nargs=2, type=Path, metavar=("ONE_DIR", "MANY_DIR"),
                        help="toy: the two runs' --images folders")
    args = parser.parse_args(argv)
    if args.kind == "toy":
        out = compare_toy(args.one, args.many, args.images)
    elif args.kind == "folders":
        out = compare_folders(args.one, args.many)
        print(f"{len(files(args.one))} files in {args.one}, {len(files(args.many))} in {args.many}")
    else:
        out = compare_speed(args.one, args.many)
    for line in out[:20]:
        print("DIFFERS", line)
    if args.kind != "speed":
        print("identical" + (" apart from timings" if args.kind == "toy" else "") if not out
              else f"{len(out)} difference(s)")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
