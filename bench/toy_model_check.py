"""Is the shipped toy model a real model of its world? Adherence, identity diversity and CPU time.

(a) adherence: vanilla samples of random captions, read back by the readout; the named fields (scene, kind,
    position, size) must match the caption (target: >= 90% of images with all of them right).
(b) diversity: for fixed prompts over many seeds, the share of the most common value of each identity
    attribute (colour, pattern, accessory, accessory colour); must be <= 0.5, else nothing needs keeping.
(c) CPU time of one 5-image story (identity + 4 frames) at the default steps: vanilla FLUX in one batch, and
    the CharaConsist engine when it is importable.

    python bench/toy_model_check.py --n 100 --seeds 32 --json out/toy_model_check.json

Measured on the shipped weights (4300 steps; 2 shared CPU cores, load average 4-10, 20 steps):
adherence 0.97 of 100 images with every named field right (scene 1.00, kind 0.97, position 1.00, size 1.00);
diversity: most common value's share 0.28-0.50 for 14 of the 16 (prompt, attribute) pairs, but pattern
'stripes' 0.66 (beach cat big centre) and accessory colour 'blue' 0.56 (night cat small right): FAILS the
<= 0.5 bar (a base_shift of 1.0 instead of 0.5 changed nothing); story of 5 images: 37 s vanilla, 41 s
CharaConsist (under load; about 5 s of transformer compute on an idle 2-core CPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import torch

from characonsist.story import StoryImage
from characonsist.toy import readout, world
from characonsist.toy.model import TOY_MODEL_DIR, load_toy_pipeline

NAMED = ("scene", "kind", "position", "size")
DIVERSITY_CAPTIONS = (
    "a sunny beach#a cat#big in the middle",
    "a green forest#a robot#small on the left",
    "a grey city#a bird#big on the right",
    "a starry night#a cat#small on the right",
)
STORY = ("a sunny beach#a cat#big in the middle", "a sunny beach#a cat#small on the left",
         "a green forest#a cat#big on the right", "a grey city#a cat#small in the middle",
         "a starry night#a cat#big on the left")


def generate(pipe, defaults: dict, captions: list[str], seeds: list[int], steps: int, batch: int) -> list[np.ndarray]:
    """Vanilla samples (uint8 HxWx3), one per (caption, seed), ``batch`` at a time."""
    out = []
    for i in range(0, len(captions), batch):
        prompts = [StoryImage.parse(c).prompt for c in captions[i:i + batch]]
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompt=prompts, generator=gens, num_inference_steps=steps, height=defaults["height"],
                   width=defaults["width"], guidance_scale=defaults["guidance_scale"],
                   max_sequence_length=defaults["max_sequence_length"], output_type="np").images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in res]
    return out


def adherence(pipe, defaults: dict, n: int, steps: int, batch: int, seed: int = 1234) -> dict:
    rng = np.random.default_rng(seed)
    truth = [(str(rng.choice(list(world.SCENES))), str(rng.choice(list(world.KINDS))),
              str(rng.choice(list(world.ACTIONS)))) for _ in range(n)]
    captions = [world.caption(*t) for t in truth]
    images = generate(pipe, defaults, captions, [seed + i for i in range(n)], steps, batch)
    reads = readout.read_batch(images)
    hits = {f: 0 for f in NAMED}
    all_ok = 0
    for (scene, kind, action), r in zip(truth, reads, strict=True):
        size, position = action.split("-")
        ok = {"scene": r["scene"] == scene, "kind": r["kind"] == kind, "position": r["position"] == position,
              "size": r["size"] == size}
        for f in NAMED:
            hits[f] += ok[f]
        all_ok += all(ok.values())
    return {"n": n, "all_named_correct": all_ok / n, **{f: hits[f] / n for f in NAMED}}


def diversity(pipe, defaults: dict, seeds: int, steps: int, batch: int) -> dict:
    out = {}
    for cap in DIVERSITY_CAPTIONS:
        images = generate(pipe, defaults, [cap] * seeds, list(range(seeds)), steps, batch)
        reads = readout.read_batch(images)
        row = {}
        for attr in world.ATTRIBUTES:
            value, count = collections.Counter(r[attr] for r in reads).most_common(1)[0]
            row[attr] = {"top": value, "share": count / seeds,
                         "distinct": len({r[attr] for r in reads})}
        scene, kind, action = world.parse_caption(cap)
        row["named_correct"] = float(np.mean([r["scene"] == scene and r["kind"] == kind and r["action"] == action
                                              for r in reads]))
        out[cap] = row
    out["max_share"] = max(v[a]["share"] for k, v in out.items() for a in world.ATTRIBUTES)
    return out


def cpu_time(pipe, defaults: dict, steps: int, repeats: int = 2) -> dict:
    res = {}
    prompts = [StoryImage.parse(c).prompt for c in STORY]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(pipe, defaults, list(STORY), [2025] * len(STORY), steps, len(STORY))
        times.append(time.perf_counter() - t)
    res["vanilla_story_s"] = min(times)
    res["prompts"] = prompts
    try:
        from characonsist import CharaConsistPipeline
    except ImportError as e:  # the engine is optional here
        res["characonsist_story_s"] = f"unavailable: {e}"
        return res
    cc = CharaConsistPipeline.from_pipe(pipe)
    cc.set_progress_bar_config(disable=True)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        cc(identity=STORY[0], frames=list(STORY[1:]), method="characonsist", height=defaults["height"],
           width=defaults["width"], num_inference_steps=steps, guidance_scale=defaults["guidance_scale"],
           max_sequence_length=defaults["max_sequence_length"], seed=2025)
        times.append(time.perf_counter() - t)
    res["characonsist_story_s"] = min(times)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(TOY_MODEL_DIR))
    ap.add_argument("--n", type=int, default=100, help="captions for adherence")
    ap.add_argument("--seeds", type=int, default=32, help="seeds per diversity prompt")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: adherence,diversity,time")
    ap.add_argument("--base-shift", type=float, default=None, help="override the scheduler's base_shift (mu)")
    ap.add_argument("--device", default="cpu", help="where to sample (the CPU time part always reports this)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe, defaults = load_toy_pipeline(device=args.device, path=args.model_dir)
    steps = args.steps or defaults["num_inference_steps"]
    if args.base_shift is not None:
        pipe.scheduler.register_to_config(base_shift=args.base_shift)
    skip = set(filter(None, args.skip.split(",")))
    result = {"model_dir": args.model_dir, "steps": steps, "device": args.device, "base_shift": pipe.scheduler.config.base_shift, "threads": torch.get_num_threads(), "defaults": defaults}
    t0 = time.perf_counter()
    if "adherence" not in skip:
        result["adherence"] = adherence(pipe, defaults, args.n, steps, args.batch)
        print("adherence", json.dumps(result["adherence"]), flush=True)
    if "diversity" not in skip:
        result["diversity"] = diversity(pipe, defaults, args.seeds, steps, args.batch)
        for cap in DIVERSITY_CAPTIONS:
            row = result["diversity"][cap]
            shares = ", ".join(f"{a} {row[a]['share']:.2f} ({row[a]['top']}, {row[a]['distinct']} values)"
                               for a in world.ATTRIBUTES)
            print(f"diversity {cap!r}: {shares}; named correct {row['named_correct']:.2f}", flush=True)
        print(f"diversity max share {result['diversity']['max_share']:.2f}", flush=True)
    if "time" not in skip:
        result["cpu_time"] = cpu_time(pipe, defaults, steps)
        print("cpu time", json.dumps({k: v for k, v in result["cpu_time"].items() if k != "prompts"}), flush=True)
    result["total_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
