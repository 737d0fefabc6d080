"""Compare runs of ``characonsist bench toy --identity-picture ...``: the picture table of every method
spec in the given JSON files, then each spec against a reference spec on the stories both ran, paired story by
story (the same pictures and noise), with 95% bootstrap intervals over stories.

    python bench/toy_picture_compare.py bench/results/toy-picture-2026-12-01/choose_*.json \\
        --reference characonsist+inversion=renoise

Figures: ``all 4`` = % of frames whose four unnamed attributes all equal the picture's true ones; ``attr`` = the mean
of the four attributes' agreement; ``PSNR`` = the output identity against the picture; ``recon`` = % of output
identities read back as the truth (all four).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

ATTRIBUTES = ("color", "pattern", "accessory", "accessory_color")


def load(paths: list[str]) -> dict[str, dict]:
    """spec -> {"metrics": ..., "stories": {story name: record}} over every file (a later file's spec wins)."""
    runs = {}
    for path in paths:
        data = json.loads(open(path).read())
        for spec, entry in data["methods"].items():
            stories = {s["name"]: s for s in entry["stories"] if "truth_hits" in s}
            if stories:
                runs[spec] = {"metrics": entry["metrics"], "stories": stories, "file": path}
    return runs


def table(runs: dict[str, dict]) -> list[str]:
    lines = [f"{'spec':<44} {'n':>3} {'all 4':>6} " + " ".join(f"{a[:10]:>10}" for a in ATTRIBUTES)
             + f" {'attr':>5} {'adhere':>6} {'bg-pix':>6} {'PSNR':>6} {'recon':>6} {'s/story':>7}"]
    for spec, run in runs.items():
        m, p = run["metrics"], run["metrics"]["picture"]
        attrs = [p["truth_attribute_agreement"][a] for a in ATTRIBUTES]
        bg = m.get("background_consistency")
        lines.append(f"{spec:<44} {p['stories']:>3} {100 * p['truth_consistency']:6.1f} "
                     + " ".join(f"{100 * a:10.1f}" for a in attrs)
                     + f" {100 * np.mean(attrs):5.1f} {100 * p['frame_adherence']:6.1f} "
                     f"{'-' if bg is None or bg != bg else f'{100 * bg:.1f}':>6} "
                     f"{p['reconstruction_psnr'] or float('nan'):6.2f} {100 * p['reconstruction_truth']:6.1f} "
                     f"{m['seconds_per_story']:7.1f}")
    return lines


def paired(runs: dict[str, dict], reference: str, samples: int = 2000, seed: int = 0) -> list[str]:
    """Each spec minus ``reference`` on their common stories: all-4 and mean-attribute agreement, points, with a
    95% bootstrap interval over stories."""
    rng = np.random.default_rng(seed)
    ref = runs[reference]["stories"]
    lines = []
    for spec, run in runs.items():
        if spec == reference:
            continue
        common = sorted(set(ref) & set(run["stories"]))
        if not common:
            continue

        def per_story(s):
            return [s["truth_hits"], sum(s["truth_attribute_hits"].values()) / 4, s["frames"]]

        a = np.array([per_story(ref[k]) for k in common], float)
        b = np.array([per_story(run["stories"][k]) for k in common], float)
        diff, frames = b[:, :2] - a[:, :2], a[:, 2]
        idx = rng.integers(0, len(common), (samples, len(common)))
        boots = 100 * diff[idx].sum(1) / frames[idx].sum(1)[:, None]
        lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        est = 100 * diff.sum(0) / frames.sum()
        lines.append(f"{spec} - {reference} ({len(common)} stories): all 4 {est[0]:+.1f} [{lo[0]:+.1f}, {hi[0]:+.1f}], "
                     f"mean attribute {est[1]:+.1f} [{lo[1]:+.1f}, {hi[1]:+.1f}] points")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="--json files of `characonsist bench toy --identity-picture ...`")
    parser.add_argument("--reference", default=None, help="spec the others are compared with (default: the first)")
    args = parser.parse_args(argv)
    runs = load(args.json)
    if not runs:
        print("no picture runs in these files")
        return 1
    print("\n".join(table(runs)))
    reference = args.reference or next(iter(runs))
    if reference not in runs:
        print(f"--reference {reference!r} is not among {', '.join(runs)}")
        return 2
    print()
    print("\n".join(paired(runs, reference)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
