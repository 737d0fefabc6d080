"""Another backbone against its stock pipeline, in one process: time ratio, GPU peak, host peak.

Random weights at the full architecture (``random_flux.build_random_chroma`` / ``build_random_klein``; on a CPU
``--tiny``), identity + N
frames at the backbone's defaults unless given: first the stock pipeline generating the N + 1 prompts as one batch
(one generator per image), then ``CharaConsistPipeline.from_pipe(stock)`` with the method. Prints one JSON line and
writes it to ``--out``. Random weights give real timings and memory, never images worth looking at.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# backbone: (builder in random_flux, its keyword arguments). klein: FLUX.2 [klein] 4B (step-distilled, 4 steps, no
# guidance); klein-base: klein base 4B (50 steps, CFG 4.0); klein-9b: the distilled 9B.
BUILDERS = {"chroma": ("build_random_chroma", {}),
            "klein": ("build_random_klein", {"variant": "4b", "distilled": True}),
            "klein-base": ("build_random_klein", {"variant": "4b", "distilled": False}),
            "klein-9b": ("build_random_klein", {"variant": "9b", "distilled": True})}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="chroma", choices=sorted(BUILDERS))
    p.add_argument("--tiny", action="store_true", help="toy widths on the CPU (tests the whole script)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--method", default="characonsist")
    p.add_argument("--steps", type=int, default=None, help="default: the backbone's (Chroma 35, klein 4, klein-base 50; tiny 4)")
    p.add_argument("--size", type=int, default=None, help="default 1024 (tiny: 32)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    import torch

    import random_flux
    from characonsist import CharaConsistPipeline

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    builder, options = BUILDERS[args.backbone]
    stock = getattr(random_flux, builder)("tiny" if args.tiny else "full", device, dtype, **options)
    stock.set_progress_bar_config(disable=True)
    story = CharaConsistPipeline.from_pipe(stock)
    story.set_progress_bar_config(disable=True)
    defaults = story.story_defaults()
    size = args.size or (32 if args.tiny else 1024)
    steps = args.steps or (4 if args.tiny else defaults["num_inference_steps"])
    length = args.max_sequence_length or (64 if args.tiny else 512)
    kw = dict(height=size, width=size, num_inference_steps=steps, max_sequence_length=length, output_type="np")
    identity = "in a quiet park#a young woman with red hair#sitting on a bench"
    frames = [f"in a quiet park#a young woman with red hair#{a}" for a in
              ("walking", "reading a book", "waving", "running", "dancing", "eating", "sleeping", "jumping")][:args.frames]

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        return time.perf_counter() - start, peak

    prompts = [identity.replace("#", " "), *(f.replace("#", " ") for f in frames)]
    gens = lambda: [torch.Generator("cpu").manual_seed(2025) for _ in prompts]   # noqa: E731
    t_stock, gpu_stock = timed(lambda: stock(prompt=prompts, generator=gens(), guidance_scale=defaults["guidance_scale"],
                                             **kw))
    t_ours, gpu_ours = timed(lambda: story(identity, frames, method=args.method, seed=2025, **kw))
    result = {"backbone": args.backbone, "tiny": args.tiny, "method": args.method, "frames": args.frames,
              "steps": steps, "size": size, "stock_s": round(t_stock, 3), "ours_s": round(t_ours, 3),
              "ratio": round(t_ours / t_stock, 3), "gpu_peak_gib_stock": gpu_stock, "gpu_peak_gib_ours": gpu_ours,
              "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"backbone_{args.backbone}{'_tiny' if args.tiny else ''}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
