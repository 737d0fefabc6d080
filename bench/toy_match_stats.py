"""Why CharaConsist shares little on the toy model: the point-matching similarities, frame by frame.

CharaConsist keeps a (frame token, identity token) pair when both are foreground and the cosine similarity of
their attention outputs, averaged over the single blocks at the mask step, exceeds ``sim_threshold`` (official
0.5; ``characonsist.match.match_points``). This script runs CharaConsist on toy stories and records, for every
frame at the main run's mask step, the best similarity of each of its foreground tokens (over the identity's
foreground tokens), and how many pairs would be kept at several thresholds. Frames in the identity's scene and
frames in another scene are reported apart.

The similarities are read by wrapping ``match_points`` as the method calls it (a diagnostic: the method's
results only keep the pairs it kept).

    python bench/toy_match_stats.py --reduced --json out/toy_match_stats.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from characonsist import CharaConsistPipeline
from characonsist.methods import characonsist as cc_method
from characonsist.toy.model import load_toy_pipeline
from characonsist.toy.suite import make_suite, reduced_suite

THRESHOLDS = (0.5, 0.4, 0.3)


def collect(pipe, defaults: dict, stories, seed: int = 2025) -> list[dict]:
    rows: list[dict] = []
    calls: list[tuple] = []
    original = cc_method.match_points

    def spy(sim, frame_fg, id_fg, threshold):
        calls.append((sim.detach().float().cpu(), frame_fg.cpu(), id_fg.cpu()))
        return original(sim, frame_fg, id_fg, threshold)

    cc_method.match_points = spy
    try:
        for i, story in enumerate(stories):
            calls.clear()
            pipe(identity=story.identity, frames=list(story.frames), method="characonsist", seed=seed + i,
                 output_type="np", **defaults)
            main = calls[-len(story.frames):]          # the main run's mask step (after the pre-run's)
            for frame, (sim, frame_fg, id_fg) in zip(story.frames, main, strict=True):
                fg_rows = frame_fg.nonzero(as_tuple=True)[0]
                best = (sim[fg_rows][:, id_fg].max(dim=1).values if len(fg_rows) and bool(id_fg.any())
                        else torch.zeros(0))
                rows.append({
                    "story": story.name, "same_scene": frame.background == story.identity.background,
                    "fg_tokens": int(len(fg_rows)), "id_fg_tokens": int(id_fg.sum()),
                    "best_sim_median": float(best.median()) if len(best) else None,
                    "best_sim_max": float(best.max()) if len(best) else None,
                    "kept": {str(t): int((best > t).sum()) for t in THRESHOLDS},
                })
    finally:
        cc_method.match_points = original
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = [f"{'frames':<22}{'n':>4}{'median best sim':>17}{'max best sim':>14}" +
             "".join(f"{'kept >' + str(t):>11}{'none':>6}" for t in THRESHOLDS)]
    for label, sel in (("same scene", True), ("other scene", False)):
        part = [r for r in rows if r["same_scene"] == sel and r["best_sim_median"] is not None]
        if not part:
            continue
        med = np.median([r["best_sim_median"] for r in part])
        mx = np.median([r["best_sim_max"] for r in part])
        cols = "".join(f"{np.median([r['kept'][str(t)] for r in part]):>11.0f}"
                       f"{sum(r['kept'][str(t)] == 0 for r in part) / len(part) * 100:>5.0f}%" for t in THRESHOLDS)
        lines.append(f"{label:<22}{len(part):>4}{med:>17.2f}{mx:>14.2f}{cols}")
    lines.append("(medians over frames; kept = pairs above the threshold, median per frame; none = frames with none)")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="the 9-story CPU subset (default: the 60-story suite)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flux, defaults = load_toy_pipeline(device=args.device)
    pipe = CharaConsistPipeline.from_pipe(flux)
    pipe.set_progress_bar_config(disable=True)
    stories = reduced_suite() if args.reduced else make_suite()
    rows = collect(pipe, defaults, stories[: args.limit] if args.limit else stories)
    text = summary(rows)
    print("\n".join(text))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": text}, f, indent=1)


if __name__ == "__main__":
    main()
