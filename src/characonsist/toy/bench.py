"""``characonsist bench toy``: consistency methods on toy-world stories, scored by the readout.

The command line of the toy bench: its options, their checks, the device and threads, the split of the stories
over several processes (``app.parallel``) and the report (tables on the terminal, ``--json`` written atomically).
The bench itself is the library's: :mod:`characonsist.toy.runner` runs the methods, :mod:`characonsist.toy.scoring`
defines and computes the metrics (docs/TOY_WORLD.md), :mod:`characonsist.toy.bench_two` the two-character stories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..app import parallel
from ..app.folder import write_file
from ..inputs import MAX_STEPS, int_problem
from ..seeds import DEFAULT_SEED
from .bench_two import format_two_tables, merge_two_results, run_two_bench
from .pictures import PICTURE_KINDS, format_picture_table
from .runner import (
    ALL_METHODS,
    ORACLE,
    SEEDING_CHOICES,
    expand_methods,
    load_pipeline,
    parse_method,
    readout_on,
    run_bench,
)
from .scoring import format_tables, merge_results
from .suite import heldout_suite, load_stories, load_two_stories, make_suite, reduced_suite, two_character_suite

# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``characonsist bench toy``."""
    parser.add_argument("--methods", default="vanilla,characonsist",
                        help="comma-separated: registry names, ablations (characonsist-no-tracking, "
                             "characonsist-no-merge, characonsist-no-mask), name+option=value (values as --option "
                             "reads them; +seeding=shared|per_image: that method's noise convention), 'oracle' "
                             "(the renderer's truth: the readout's ceiling), or 'all' (" + ",".join(ALL_METHODS) + ") "
                             "(default: %(default)s)")
    parser.add_argument("--stories", default=None,
                        help="story file in the toy vocabulary (docs/TOY_WORLD.md) instead of the fixed suite")
    parser.add_argument("--reduced", action="store_true",
                        help="the CPU subset of the suite (one story per mode and kind: 9 stories)")
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out suite: 60 other stories and noises, nothing tuned on them")
    parser.add_argument("--two-characters", action="store_true",
                        help="stories with two characters of different kinds in every image (128x256, at the model's "
                             "height and twice its width): the two-character suite (36 stories) or --stories with "
                             "two-character lines; scored per character, with the leak between them "
                             "(docs/TOY_WORLD.md)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N stories")
    parser.add_argument("--json", default=None, help="write every metric and per-story readout here (a file there that "
                        "the bench did not write is refused unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="with --json: replace the file even if it is not a bench report")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="save each story as a strip DIR/<method>/<story>.png (identity first)")
    parser.add_argument("--model", default="toy",
                        help="'toy' (shipped toy model), 'tiny' (random tiny FLUX, plumbing only) or a diffusers folder "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the model and the readout run there (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS when set, else every core this process "
                             "may use)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's weights and compute type (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed; story i uses seed + i (default: %(default)s)")
    parser.add_argument("--seeding", default="official", choices=SEEDING_CHOICES,
                        help="how a story's seed reaches its images: each method's official convention (CharaConsist, "
                             "vanilla: the same noise for every image; the peers: one noise per image), or one "
                             "convention for every method (default: %(default)s)")
    parser.add_argument("--identity-picture", default=None, choices=PICTURE_KINDS,
                        help="the identity is a picture of a known character (render: as trained; offgrid: another "
                             "size and position; degraded: the readout's degradations); the frames are scored against "
                             "its true attributes (docs/TOY_WORLD.md)")
    parser.add_argument("--inversion", default=None, metavar="MODE[:KEY=VALUE...]",
                        help="how the identity follows its picture (characonsist.inversion: renoise, euler, fireflow, "
                             "rf; e.g. euler:follow=start); a method spec's own +inversion=... wins (default: the "
                             "library's)")
    parser.add_argument("--quiet", action="store_true", help="no per-story progress lines")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="split the stories over N GPUs of this host, one process each, results merged into one "
                             "JSON (starts `accelerate launch --multi_gpu --num_processes N -m characonsist bench toy "
                             "...`; needs --device cuda)")


def is_report(path: str | Path) -> bool:
    """Whether ``path`` holds a report this bench wrote (a JSON object with its ``settings`` and ``methods``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("methods"), dict) and \
        isinstance(data.get("settings"), dict) and "suite" in data["settings"]


def argument_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the options before any story is read or the model loads (one line each)."""
    problems = []
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit {args.limit}: give the number of stories to run, at least 1 (leave it out for all)")
    if args.steps is not None:
        problem = int_problem("--steps", args.steps, 1, MAX_STEPS)
        if problem:
            problems.append(problem)
    if args.json:
        path = Path(args.json)
        if path.is_symlink() or path.is_dir() or (path.exists() and not path.is_file()):
            problems.append(f"--json {args.json}: not a plain file; give a file path")
        elif path.exists() and not getattr(args, "force", False) and not is_report(path):
            problems.append(f"--json {args.json}: the file exists and is not a report of this bench; choose another "
                            "path, or add --force to replace it")
    return problems


def write_report(path: str | Path, result: dict) -> None:
    """The report as JSON, written atomically (a temporary beside it, renamed over it)."""
    write_file(path, json.dumps(_plain(result), indent=1).encode())


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a positive number (the usual way to cap a job's threads), else None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run the bench, or None when it can (checked before anything loads)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device!r}: {e}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available to this PyTorch ({torch.__version__})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return f"--device {device}: MPS is not available"
    elif dev.type != "cpu":
        return f"--device {device}: use cpu, cuda, cuda:N or mps"
    return None


def device_name(device: str) -> str:
    """A human name of ``device`` for the JSON (the GPU's model, or the CPU and its thread count)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{torch.get_num_threads()} torch threads on {cpu_cores()} cores"
    return str(dev)


def _plain(x):
    """JSON-safe copy: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if x != x else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def run(args: argparse.Namespace) -> int:
    """``characonsist bench toy``: print the tables, optionally write JSON; 0 on success."""
    t_start = time.perf_counter()
    methods = expand_methods(args.methods)
    if not methods:
        print("bench toy: --methods is empty", file=sys.stderr)
        return 2
    problem = check_device(args.device)
    if problem:
        print(f"bench toy: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"bench toy: --threads {args.threads}: needs at least 1", file=sys.stderr)
        return 2
    problems = argument_problems(args)
    if problems:
        for problem in problems:
            print(f"bench toy: {problem}", file=sys.stderr)
        return 2
    procs = parallel.join()   # several processes (accelerate launch / torchrun): each runs a share of the stories
    if procs is not None:
        dev = torch.device(args.device)
        if dev.type == "cuda" and dev.index is not None:
            print(f"bench toy: --device {args.device} with {procs.size} processes: give --device cuda (each process "
                  "takes its own GPU)", file=sys.stderr)
            return 2
        if dev.type == "cuda":
            args.run_device = procs.device()    # this process's GPU; the JSON keeps --device as given
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or omp_threads() or max(cpu_cores() // (procs.size if procs else 1), 1))
    try:
        return _run(args, methods, t_start, procs)
    finally:
        torch.set_num_threads(threads)     # a caller in the same process (tests) keeps its own setting


def _device(args: argparse.Namespace) -> str:
    """Where this process runs: ``--device``, or its own GPU when it is one of several processes."""
    return getattr(args, "run_device", None) or args.device


def _two_suite(args: argparse.Namespace) -> tuple[list, str]:
    """The stories of ``--two-characters``: its suite, or ``--stories`` with two-character lines."""
    for flag, value in (("--reduced", args.reduced), ("--heldout", args.heldout),
                        ("--identity-picture", getattr(args, "identity_picture", None)),
                        ("--inversion", getattr(args, "inversion", None))):
        if value:
            raise ValueError(f"{flag} is not available with --two-characters (one suite; --limit N runs its first N "
                             "stories)")
    if args.stories:
        return load_two_stories(args.stories), str(args.stories)
    return two_character_suite(), "two-characters"


def _two_size_problem(model: str, defaults: dict, pipe) -> str | None:
    """Why ``model`` cannot draw the two-character stories (its height x twice its width, one character per
    square half), or None."""
    h, w = defaults["height"], defaults["width"]
    if h != w:
        return (f"--two-characters: model {model!r} has a default size of {h}x{w} (height x width); two-character "
                "images are two square halves side by side, so the model's own size must be square")
    if pipe is not None and hasattr(pipe, "input_limits"):
        limits = pipe.input_limits()
        if limits.max_side is not None and 2 * w > limits.max_side:
            return (f"--two-characters: model {model!r} takes at most {limits.max_side} px per side (twice its native "
                    f"{limits.native}), but the two-character images are {h}x{2 * w}")
    return None


def _run(args: argparse.Namespace, methods: list[str], t_start: float, procs=None) -> int:
    try:
        for m in methods:
            parse_method(m)
        if getattr(args, "two_characters", False):
            stories, suite = _two_suite(args)
        elif args.stories:
            stories = load_stories(args.stories)
            suite = str(args.stories)
        else:
            if args.reduced and args.heldout:
                raise ValueError("--reduced and --heldout name two suites; pick one")
            stories = reduced_suite() if args.reduced else heldout_suite() if args.heldout else make_suite()
            suite = "reduced" if args.reduced else "heldout" if args.heldout else "full"
    except ValueError as e:  # StoryError is a ValueError
        print(f"bench toy: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        stories = stories[:args.limit]
    n_stories = len(stories)
    if procs is not None:
        stories = procs.share(stories)    # contiguous slices, merged back in order by process 0
    pipe = None
    defaults = {"height": 128, "width": 128, "num_inference_steps": 20, "max_sequence_length": 32}
    if any(parse_method(m)[0] != ORACLE for m in methods):
        pipe, defaults = load_pipeline(args.model, _device(args), args.dtype)
    two = getattr(args, "two_characters", False)
    if two:
        problem = _two_size_problem(args.model, defaults, pipe)
        if problem:
            print(f"bench toy: {problem}", file=sys.stderr)
            return 2
    gen = {k: defaults[k] for k in ("height", "width", "num_inference_steps", "max_sequence_length")}
    if args.steps is not None:
        gen["num_inference_steps"] = args.steps
    if "guidance_scale" in defaults:
        gen["guidance_scale"] = defaults["guidance_scale"]
    tag = "" if procs is None else f"(process {procs.rank}) "
    log = None if args.quiet else (lambda msg: print(tag + msg, file=sys.stderr, flush=True))
    if procs is not None:
        procs.barrier()      # every process has its model: the run's time starts together
    load_seconds = time.perf_counter() - t_start
    t0 = time.perf_counter()
    try:
        if two:
            gen.pop("width")
            result = run_two_bench(pipe, stories, methods, seed=args.seed, log=log, image_dir=args.images,
                                   readout_net=readout_on(_device(args)), seeding=args.seeding, **gen)
        else:
            keep = None
            if args.json and procs is None:      # each finished method is on disk before the next one starts

                def keep(partial: dict) -> None:
                    if not Path(args.json).exists() or is_report(args.json):
                        partial["settings"].update(suite=suite, model=args.model, device=args.device,
                                                   partial=f"{len(partial['methods'])} of {len(methods)} methods")
                        write_report(args.json, partial)

            result = run_bench(pipe, stories, methods, seed=args.seed, log=log, image_dir=args.images,
                               readout_net=readout_on(_device(args)), seeding=args.seeding,
                               identity_picture=getattr(args, "identity_picture", None),
                               inversion=getattr(args, "inversion", None), on_method=keep, **gen)
            result["settings"].pop("partial", None)
    except ValueError as e:
        result = {"error": str(e)}
    if procs is not None:
        parts = procs.gather(result)
        if not procs.main:
            return 0      # process 0 prints and writes the merged result
        errors = sorted({p["error"] for p in parts if "error" in p})
        if errors:
            result = {"error": "\n".join(errors)}
        elif two:
            result = merge_two_results(parts)
        else:
            result = merge_results(parts)
    if "error" in result:
        print(f"bench toy: {result['error']}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t_start
    result["settings"].update(suite=suite, model=args.model, device=args.device, device_name=device_name(_device(args)),
                              dtype=args.dtype, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                              processes=procs.size if procs else 1,
                              load_seconds=load_seconds, run_seconds=time.perf_counter() - t0, total_seconds=total)
    model = f"model {args.model}, {gen['num_inference_steps']} steps" if pipe is not None else "no model"
    where = f"{args.device} ({result['settings']['device_name']})" if procs is None else \
        f"{procs.size} processes on {'cpu' if args.device == 'cpu' else 'cuda'} ({result['settings']['device_name']}, each)"
    print(f"toy bench: {n_stories} stories ({suite}), {model}, {where}")
    if two:
        print(format_two_tables(result))
    else:
        print(format_tables(result))
    if result["settings"].get("identity_picture"):
        print()
        print(format_picture_table(result))
    print("seeding: " + ", ".join(f"{n} {m.get('seeding') or '-'}" for n, m in result["methods"].items()))
    per = ", ".join(f"{n} {m['metrics']['wall_seconds']:.0f}s" for n, m in result["methods"].items())
    print(f"total {total:.0f}s wall: loading {load_seconds:.0f}s, {per}")
    if args.json:
        if Path(args.json).exists() and not getattr(args, "force", False) and not is_report(args.json):
            print(f"bench toy: --json {args.json}: the file appeared while the bench ran and is not a report of this "
                  "bench; not replaced (the tables above are the results)", file=sys.stderr)
            return 2
        write_report(args.json, result)
        print(f"wrote {args.json}")
    failed = sum(m["metrics"]["failed"] for m in result["methods"].values())
    if failed:
        print(f"bench toy: {failed} story runs failed (see the log above / the JSON)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m characonsist.toy.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
