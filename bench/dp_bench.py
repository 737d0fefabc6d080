"""Data-parallel throughput of ``characonsist generate``: full-size FLUX.1-dev architecture with random
bf16 weights (``random_flux.py``), identity + 4 frames x 8 stories at 1024x1024, run through the same code as
``characonsist generate`` on N GPUs (``app.parallel.generate``: process 0 holds the output folder and writes,
the others send their groups to it). Only the model's loading differs: each process builds the random pipeline
on its GPU (same seed, so the same weights) instead of reading weights from disk.

    python bench/dp_bench.py --out $OUT --tag one                                   # one process, one GPU
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no bench/dp_bench.py --out $OUT --tag two                   # two processes, two GPUs
    python bench/dp_compare.py speed $OUT/dp_one.json $OUT/dp_two.json               # ratio, memory, images
    CPU (tests the script): python bench/dp_bench.py --size tiny --stories 2 --frames 1 --steps 2 --height 64 ...

The model folder given to the request holds only config files and the T5 tokenizer (validation reads them);
the run's images (noise: the weights are random) go to ``--images`` (default ``/tmp/dp_<tag>``), the JSON
``dp_<tag>.json`` to ``--out``: seconds from every model built to the last group written (``run_seconds``), the
load time, groups per process, and each process's peak GPU memory (``max_memory_allocated`` / ``reserved``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:  # the installed package, or the one on PYTHONPATH
    import characonsist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

from random_flux import FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, TINY_TRANSFORMER, TINY_VAE, build_random_flux  # noqa: E402

GIB = 1024**3
BACKGROUNDS = ["a sunny park with green trees", "a quiet library with tall shelves", "a snowy mountain village",
               "a busy city street at night", "a sandy beach at sunset", "a cosy kitchen with a wooden table",
               "a misty forest path", "a bright classroom with a blackboard"]
CHARACTERS = ["a small red robot with a blue hat", "an old wizard with a long grey beard",
              "a young girl in a yellow raincoat", "a brown dog with a red collar", "a knight in silver armour",
              "a tall woman in a green dress", "a little boy with curly hair", "a white cat with black spots"]
IDENTITY_ACTION = "standing"
ACTIONS = ["waving", "running", "sitting on a bench", "jumping", "reading a book", "eating", "sleeping", "dancing"]


def story_text(stories: int, frames: int) -> str:
    """``stories`` groups of an identity and ``frames`` frames, one scene and one character each."""
    if stories > len(BACKGROUNDS) or frames > len(ACTIONS):
        raise ValueError(f"at most {len(BACKGROUNDS)} stories and {len(ACTIONS)} frames")
    groups = []
    for bg, character in zip(BACKGROUNDS[:stories], CHARACTERS[:stories], strict=True):
        groups.append("\n".join(f"{bg}#{character}#{a}" for a in [IDENTITY_ACTION, *ACTIONS[:frames]]))
    return "\n\n".join(groups) + "\n"


def write_model_folder(folder: Path, size: str) -> None:
    """Config files and the T5 tokenizer of the random model (what validation reads; no weights)."""
    from characonsist.testing import CORPUS
    from characonsist.tokenizers import make_t5_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for name, config in (("transformer", FLUX_DEV_TRANSFORMER if size == "full" else TINY_TRANSFORMER),
                         ("vae", FLUX_DEV_VAE if size == "full" else TINY_VAE)):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in config.items()}))
    # the same tokenizer build_random_flux makes
    make_t5_tokenizer(CORPUS * 20, vocab_size=160, model_max_length=512).save_pretrained(folder / "tokenizer_2")


def random_engine(size: str):
    """An ``engine_factory`` for ``app.parallel.generate``: the random pipeline built on this process's device."""
    from characonsist import CharaConsistPipeline
    from characonsist.app.loading import story_engine

    def factory(ref, settings, progress=False):
        device = torch.device(f"cuda:{settings.gpu_ids[0]}" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, settings.dtype)
        flux = build_random_flux(size, device, dtype=dtype, seed=0)
        flux.vae.enable_slicing()   # decode one image at a time: the transformer sets the GPU peak
        pipe = CharaConsistPipeline.from_pipe(flux, dtype=dtype)   # from_pipe would cast to float32 otherwise
        pipe.set_progress_bar_config(disable=not progress)
        return story_engine(pipe, settings)

    return factory


def main(argv: list[str] | None = None) -> int:
    from characonsist.app import StoryRequest, parallel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--stories", type=int, default=8)
    p.add_argument("--frames", type=int, default=4, help="frames per story (identity excluded)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=1024, help="and width")
    p.add_argument("--method", default="characonsist")
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT", "out/dp"), help="where the JSON goes")
    p.add_argument("--images", default=None, help="the run's output folder (default /tmp/dp_<tag>; replaced)")
    p.add_argument("--inputs", default=None, help="where the story and the model's configs are written (default "
                   "/tmp/dp_inputs_<size>; keep it the same across runs: the paths are in the images' records)")
    p.add_argument("--tag", default="run")
    args = p.parse_args(argv)

    procs = parallel.join()
    main_process = procs is None or procs.main
    out, images = Path(args.out), Path(args.images or f"/tmp/dp_{args.tag}")
    work = Path(args.inputs or f"/tmp/dp_inputs_{args.size}")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(images, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "story.txt").write_text(story_text(args.stories, args.frames))
        write_model_folder(work / "model", args.size)
    request = StoryRequest(stories=[str(work / "story.txt")], model=str(work / "model"), out=str(images),
                           method=args.method, height=args.height, width=args.height,
                           num_inference_steps=args.steps, max_sequence_length=args.max_sequence_length)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    factory = random_engine(args.size)
    t0 = time.perf_counter()
    summary = parallel.generate(request, procs, engine_factory=factory,
                                on_group=lambda job, rank, ok: print(
                                    f"{time.perf_counter() - t0:7.1f}s {job.folder}: {'written' if ok else job.error} "
                                    f"(process {rank})", flush=True))
    mine = {"rank": procs.rank if procs else 0, "load_seconds": summary.load_seconds,
            "run_seconds": summary.run_seconds, "host": platform.node()}
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{procs.local_rank if procs else 0}")
        mine.update(gpu=torch.cuda.get_device_name(device),
                    gpu_peak_alloc_gib=torch.cuda.max_memory_allocated(device) / GIB,
                    gpu_peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    per_process = procs.gather(mine) if procs else [mine]
    if not main_process:
        return 0
    groups = [j for j in summary.jobs if j.state == "done"]
    by_rank = {}
    for folder, rank in summary.written_by.items():
        by_rank.setdefault(rank, []).append(folder)
    for entry in per_process:
        entry["groups"] = sorted(by_rank.get(entry["rank"], []))
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tag": args.tag, "processes": summary.processes, "size": args.size, "method": args.method,
              "stories": args.stories, "frames": args.frames, "steps": args.steps, "height": args.height,
              "groups": len(groups), "failed": summary.failed, "images": sum(j.images for j in groups),
              "load_seconds": summary.load_seconds, "run_seconds": summary.run_seconds,
              "per_process": per_process, "out": str(images), "torch": torch.__version__,
              "engine_commit": os.environ.get("BENCH_ENGINE_COMMIT"), "argv": sys.argv}
    path = out / f"dp_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{summary.processes} process(es): {result['groups']} groups, {result['images']} images in "
          f"{summary.run_seconds:.1f} s ({result['images'] / max(summary.run_seconds, 1e-9):.3f} images/s), load "
          f"{summary.load_seconds:.1f} s; wrote {path}")
    return 1 if summary.failed or len(groups) != args.stories else 0


if __name__ == "__main__":
    sys.exit(main())
