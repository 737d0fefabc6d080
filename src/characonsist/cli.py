"""``characonsist``: generate consistent-character storyboards from story files (and run the demo / benchmarks).

``characonsist generate STORY --model MODEL --out DIR`` is the official ``inference.py`` made safe to leave
running overnight: every input is checked before the model loads, every image is written atomically with its
settings, and a rerun resumes where the last one stopped (a group is the unit: its identity and frames are
generated together). See ``characonsist generate --help``.

This module only parses arguments and prints; the work is the application layer's (``characonsist.app``), which
every front end shares.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from contextlib import nullcontext
from importlib.resources import files
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .app import StoryRequest, StoryRun, memory_plan, parallel, ray_runner, validate_request
from .app.folder import FolderError, check_writable_target, describe_os_error
from .app.layouts import LAYOUTS, check_layout_targets, write_layouts
from .app.parallel import ParallelError
from .evaluate.cli import main as evaluate
from .inputs import InputError, excerpt
from .output import read_json
from .seeds import DEFAULT_SEED
from .ui import missing_extra, serve
from .ui.form import Loading

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


# ---------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="characonsist", description="The same character across many images, without training: story files in, "
        "storyboards out (CharaConsist and its peers on FLUX.1; a small toy model ships for CPUs). Start with "
        "`characonsist demo`.")
    parser.add_argument("--version", action="version", version=f"characonsist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate every group of story files into a storyboard folder",
                         description="Generate every group of the story files; rerun the same command to resume.")
    add_generate_arguments(gen)

    demo = sub.add_parser("demo", help="run the built-in example story on the toy model (CPU, seconds)")
    demo.add_argument("--out", default="characonsist-demo", help="output folder (default: %(default)s)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")

    bench = sub.add_parser("bench", help="benchmarks: `characonsist bench toy --help`",
                           description="Benchmarks. `characonsist bench toy --help` lists the toy bench's options.")
    bench.add_argument("suite", choices=["toy"],
                       help="toy: the toy-world consistency benchmark (`characonsist bench toy --help`)")

    sub.add_parser("eval", help="the papers' metrics on run folders: `characonsist eval --help`", add_help=False)

    ui = sub.add_parser("ui", help="a local web app for making a story (pip install 'characonsist[ui]')",
                        description="Start the story editor on this machine and print its address.")
    ui.add_argument("--model", default="toy", help="hub id, local diffusers folder, or `toy` (default: %(default)s)")
    ui.add_argument("--out", default="characonsist-ui", metavar="DIR",
                    help="the UI's folder: one run folder per story (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)")
    ui.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0 = any free port)")
    ui.add_argument("--allow-host", action="append", metavar="NAME",
                    help="also answer requests addressed to this host name (repeatable; the UI answers only its "
                         "address and this machine's names for it, so other web pages cannot reach it)")
    add_loading_arguments(ui, auto=False)   # one model for every story: a small GPU's mode and format
    return parser


def add_loading_arguments(p: argparse.ArgumentParser, auto: bool = True) -> None:
    """How the model is loaded (memory mode, weight format, VAE tiling, GPUs, dtype): ``generate`` and ``ui``."""
    p.add_argument("--memory", default="none", metavar="MODE",
                   help="memory mode: none | model-offload | group-offload | sequential-offload | balanced"
                   + (" | auto (the fastest that fits this machine; or official init_mode 0-3)" if auto
                      else " (or official init_mode 0-3)"))
    p.add_argument("--quantize", default="none", metavar="FORMAT",
                   help="weights of the transformer and T5: none | int8 | fp8 (torchao) | nf4 | int8-bnb "
                   "(bitsandbytes) | fp8-storage (layerwise casting)"
                   + (" | auto (with --memory: the fastest that fits)" if auto else ""))
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less GPU memory; tiny seams)")
    p.add_argument("--gpu-ids", default="0", help="GPU ids, comma-separated; only `balanced` uses more than the first")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("story", nargs="+", metavar="STORY_FILE",
                   help="story file(s): official text (bg#character#action lines, blank line between groups) or .yaml/.toml")
    p.add_argument("--model", required=True, help="hub id, local diffusers folder, or `toy` (the small model shipped with the package)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (manifest.json, one folder per group)")
    p.add_argument("--method", default="characonsist", help="consistency method (default: %(default)s; `vanilla` = plain FLUX)")
    p.add_argument("--share-bg", action=argparse.BooleanOptionalAction,
                   help="share the identity's background with frames of the same scene (official --share_bg; default on)")
    p.add_argument("--token-merge", action=argparse.BooleanOptionalAction,
                   help="adaptive token merge (official --use_interpolate; default on)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other method option, e.g. mask_step=10 or point_tracking=false (repeatable; for ablations)")
    p.add_argument("--save-masks", action="store_true", help="also save mask and point-match visualisations per image")
    p.add_argument("--layout", action="append", choices=LAYOUTS, metavar="LAYOUT",
                   help=f"also write pages of every finished image to DIR/layouts as PNG and PDF: {', '.join(LAYOUTS)} "
                        "(repeatable)")
    p.add_argument("--inversion", metavar="MODE[:KEY=VALUE...]",
                   help="how an identity picture (a story's `| picture.png` / `image:`) is followed: euler (default), "
                        "renoise, fireflow or rf, e.g. euler:follow=start (docs/API.md)")
    p.add_argument("--height", type=int, help="image height, multiple of 16 (default: the model's, 1024 for FLUX)")
    p.add_argument("--width", type=int, help="image width, multiple of 16 (default: the model's, 1024 for FLUX)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 50 for FLUX.1-dev)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's, 3.5 for FLUX.1-dev)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of every image without its own (official: %(default)s)")
    p.add_argument("--max-sequence-length", type=int, help="T5 prompt length limit in tokens (default: the model's, 512)")
    add_loading_arguments(p)
    p.add_argument("--attention-backend", metavar="NAME",
                   help="diffusers attention backend, e.g. flash, _native_cudnn, sage (default: PyTorch's SDPA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (regional; "
                   "the first group pays the compilation)")
    p.add_argument("--lora", action="append", metavar="SOURCE[:SCALE]",
                   help="a LoRA (file, folder or hub id) at a scale, default 1 (repeatable)")
    p.add_argument("--batch-size", type=int, help="most images in one forward pass, identity included (default: whole group)")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="spread the groups over N GPUs of this host, one process and one model each (starts `accelerate "
                        "launch --multi_gpu --num_processes N -m characonsist generate ...`; pick GPUs with "
                        "CUDA_VISIBLE_DEVICES)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster: one actor per GPU holding the model, the groups as tasks, this process "
                        "writing the folder (ADDRESS as ray.init takes it, e.g. auto or ray://head:10001; none: "
                        "RAY_ADDRESS or a new local Ray); needs `pip install 'characonsist[ray]'`")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --ray: N actors (default: one per GPU of the cluster; a cluster without GPUs needs N, "
                        "each actor then takes one CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace groups that were generated with other settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages (errors still go to stderr)")


# The command line's name of every StoryRequest / StorySettings field it sets, and of the method options that have
# a flag of their own (the official switches; any other option is --option KEY=VALUE): the one table. It names the
# fields in the application layer's messages too, and the web UI writes its commands with it (``ui.serve``).
# ``--lora`` is repeated, one LoRA each.
FLAGS = {"model": "--model", "out": "--out", "method": "--method", "memory": "--memory", "quantize": "--quantize",
         "gpu_ids": "--gpu-ids", "dtype": "--dtype", "vae_tiling": "--vae-tiling", "height": "--height",
         "width": "--width", "num_inference_steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed",
         "max_sequence_length": "--max-sequence-length", "batch_size": "--batch-size", "inversion": "--inversion",
         "attention_backend": "--attention-backend", "compile": "--compile", "loras": "--lora",
         "save_masks": "--save-masks", "overwrite": "--overwrite",
         "share_bg": "--share-bg", "use_token_merge": "--token-merge",
         "layout": "--layout", "ray": "--ray", "workers": "--workers"}
COMMAND_LINE_ONLY = ("layout", "ray", "workers")   # named in messages, not fields of a StoryRequest
OPTION_FLAGS = ("share_bg", "use_token_merge")   # the method options among FLAGS


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def request_from_args(args):
    """The application layer's StoryRequest for ``generate``'s arguments, through ``FLAGS`` (method options stay
    text: the method's Config reads them in their types)."""

    options: dict = {}
    for key in OPTION_FLAGS:
        if getattr(args, _dest(FLAGS[key])) is not None:
            options[key] = bool(getattr(args, _dest(FLAGS[key])))
    for item in args.option or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {excerpt(item)}: expected KEY=VALUE, e.g. mask_step=10")
        options[key.strip()] = text
    values = {field: getattr(args, _dest(flag)) for field, flag in FLAGS.items()
              if field not in OPTION_FLAGS and field not in COMMAND_LINE_ONLY}
    values["loras"] = list(values["loras"] or [])
    return StoryRequest(stories=list(args.story), method_options=options, **values)


# ---------------------------------------------------------------------------------------------- commands

def cmd_generate(args) -> int:

    if args.workers is not None and args.ray is None:
        raise InputError("--workers N is the number of Ray actors: give it with --ray (on this host: --gpus N)")
    if args.ray is not None:
        if args.ray and Path(args.ray).exists():
            raise InputError(f"--ray {args.ray}: that is a file here, not a Ray address; put --ray after the story "
                             "files (or give it an address: --ray auto)")
        if args.gpus is not None:
            raise InputError("--gpus N starts N processes on this host; with --ray give the number of actors "
                             "with --workers N")
        return cmd_generate_ray(args)
    procs = parallel.join()
    if procs is not None:
        if args.gpus is not None:
            raise InputError("--gpus N starts the processes itself: leave it out under accelerate launch / torchrun")
        return cmd_generate_parallel(args, procs)     # the process ends in parallel.exit_process (__main__)
    say = (lambda *a: None) if args.quiet else _say
    checked = validate_request(request_from_args(args), names=FLAGS)
    out = checked.folder.root
    if checked.plan is not None:
        say(f"memory: {checked.plan.describe()}")
    for note in checked.notes:
        say(note)
    with StoryRun(checked) as run:
        todo = run.todo
        say(f"{len(run.jobs)} group(s), {len(run.jobs) - len(todo)} already done, {len(todo)} to generate -> {out}")
        _say_earlier(run, say)
        if args.layout:   # the pages' files are known now: a file in their way stops the run before the model loads

            check_layout_targets(run.folder, run.jobs, args.layout, names=FLAGS)
        if not todo:
            _write_layouts(run, args, say)
            return 0
        if args.quiet:
            _silence_libraries()
        try:
            run.load(progress=not args.quiet)
        except (InputError, FolderError, KeyboardInterrupt):
            raise
        except Exception as error:
            if memory_plan.is_oom(error):
                advice = memory_plan.oom_advice(checked.settings.memory, checked.settings.gpu_ids, FLAGS)
                _say(f"loading the model failed: {advice}", err=True)
                return EXIT_FAILED
            raise
        with _progress(args.quiet, sum(j.images for j in todo), "images") as image_bar:
            for job in todo:
                image_bar.set_postfix_str(job.folder)
                if run.run(job):
                    _say_notes(job, say)      # an identity picture's reconstruction PSNR is its first note
                else:
                    _say(f"group {job.folder} failed: {job.error}", err=True)
                image_bar.update(job.images)
        _write_layouts(run, args, say)
    say(f"done: {len(run.jobs) - run.failed}/{len(run.jobs)} group(s) in {out}; manifest: {out / 'manifest.json'}")
    return EXIT_FAILED if run.failed else 0


def _say_earlier(run, say) -> None:
    """Groups of an earlier run in this folder that this story does not have: kept in manifest.json, said once."""
    if run.earlier:
        names = [g["name"] for g in run.earlier]
        say(f"note: {len(names)} group(s) in {run.folder.root} are from an earlier run, not this story "
            f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}); manifest.json keeps them under 'earlier'")


def _say_notes(job, say, shown: int = 3) -> None:
    """The group's notes (fallbacks taken: an empty mask, no match; how a picture was followed), the first few
    with their image, the rest counted; all of them are in manifest.json and each PNG's record."""
    notes = [(Path(record["path"]).stem, note) for record, image_notes in zip(job.records, job.notes, strict=True)
             for note in image_notes]
    for stem, note in notes[:shown]:
        say(f"{job.folder}/{stem}: {note}")
    if len(notes) > shown:
        say(f"{job.folder}: {len(notes) - shown} more note(s) in manifest.json")


def _write_layouts(run, args, say) -> None:
    if not getattr(args, "layout", None):
        return

    done = [j for j in run.jobs if j.state == "done"]
    if not done:
        _say("no finished group: no layout written", err=True)
        return
    title = next((s.title for s in run.checked.stories if s.title), "")
    written = write_layouts(run.folder, run.jobs, args.layout, title=title)
    say(f"layouts ({len(done)}/{len(run.jobs)} group(s)): {', '.join(str(run.folder.root / f) for f in written)}")


def cmd_ui(args) -> int:

    problem = missing_extra()
    if problem:
        raise InputError(problem)

    loading = Loading(args.memory, args.quantize, args.vae_tiling, args.gpu_ids, args.dtype).check(FLAGS)
    return serve(args.model, args.out, args.host, args.port, loading=loading, allow_hosts=args.allow_host or (),
                 flags=FLAGS)


def cmd_launch(args, argv: list[str], command: str = "generate") -> int:
    """``--gpus N`` (N > 1): start ``accelerate launch --multi_gpu --num_processes N -m characonsist ...`` with the
    same arguments, after the checks that need no model (bad input gets its one-line message here)."""


    n = args.gpus
    if parallel.launched_processes() > 1:
        raise InputError("--gpus N starts the processes itself: leave it out under accelerate launch / torchrun")
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < n:
        raise InputError(f"--gpus {n}: {visible or 'no'} CUDA GPU(s) visible; give at most {visible} (to try several "
                         f"processes on a CPU: torchrun --nproc_per_node {n} -m characonsist {command} ...)" if visible
                         else f"--gpus {n}: no CUDA GPU is visible (to try several processes on a CPU: torchrun "
                         f"--nproc_per_node {n} -m characonsist {command} ...)")
    if command == "generate":
        checked = validate_request(request_from_args(args), names=FLAGS)
        parallel.check_one_model_per_gpu(checked.settings.memory, FLAGS)
    process = subprocess.Popen(parallel.launch_command(n, parallel.without_option(argv, "--gpus")),
                               env=parallel.launch_environment())
    try:
        status = process.wait()
    except KeyboardInterrupt:   # Ctrl-C reaches the processes too; a SIGTERM to this one is passed on
        process.terminate()
        process.wait()
        raise
    if status:
        _say(f"characonsist: the {n}-process run ended with status {status} (see above); what was finished is kept: "
             "run the same command again to resume", err=True)
    return status if status in (0, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED) else EXIT_FAILED


def cmd_generate_parallel(args, procs) -> int:
    """One process of a data-parallel run (``accelerate launch -m characonsist generate ...``): process 0 prints
    and writes, the others only generate (``app.parallel``)."""

    quiet = args.quiet or not procs.main
    say = (lambda *a: None) if quiet else _say
    if quiet:
        _silence_libraries()
    bars = []

    def on_plan(run) -> None:
        todo, out = run.todo, run.folder.root
        say(f"{len(run.jobs)} group(s), {len(run.jobs) - len(todo)} already done, {len(todo)} to generate over "
            f"{procs.size} processes -> {out}")
        bars.append(sum(j.images for j in todo))

    def on_start() -> None:
        bars[0] = _progress(quiet, bars[0], "images").__enter__()

    def on_group(job, rank: int, ok: bool) -> None:
        if ok:
            say(f"{job.folder}: written (process {rank})")
            _say_notes(job, say)
        else:
            _say(f"group {job.folder} failed (process {rank}): {job.error}", err=True)
        if bars and not isinstance(bars[0], int):
            bars[0].update(job.images)

    try:
        summary = parallel.generate(request_from_args(args), procs, FLAGS, on_plan, on_start, on_group)
    except parallel.ParallelError as error:
        _say(f"characonsist: error: {error}", err=True)
        return EXIT_FAILED
    finally:
        if bars and not isinstance(bars[0], int):
            bars[0].__exit__(None, None, None)
    if not procs.main or summary.stopped:
        return 0   # process 0 reports and gives the run's status
    return _summary_status(summary, args, say, "; its groups are left for a rerun")


def cmd_generate_ray(args) -> int:
    """``generate --ray [ADDRESS]``: the groups as tasks of Ray actors, this process writing (``app.ray_runner``)."""

    say = (lambda *a: None) if args.quiet else _say
    bars = []

    def on_plan(run) -> None:
        todo = run.todo
        say(f"{len(run.jobs)} group(s), {len(run.jobs) - len(todo)} already done, {len(todo)} to generate on Ray "
            f"-> {run.folder.root}")
        bars.append(sum(j.images for j in todo))

    def on_start() -> None:
        bars[0] = _progress(args.quiet, bars[0], "images").__enter__()

    def on_group(job, worker: int, ok: bool) -> None:
        if ok:
            say(f"{job.folder}: written (worker {worker})")
            _say_notes(job, say)
        else:
            _say(f"group {job.folder} failed (worker {worker}): {job.error}", err=True)
        if bars and not isinstance(bars[0], int):
            bars[0].update(job.images)

    try:
        summary = ray_runner.generate(request_from_args(args), names=FLAGS, address=args.ray or None,
                                      workers=args.workers, on_plan=on_plan, on_start=on_start, on_group=on_group,
                                      say=say)
    except ParallelError as error:
        _say(f"characonsist: error: {error}", err=True)
        return EXIT_FAILED
    finally:
        if bars and not isinstance(bars[0], int):
            bars[0].__exit__(None, None, None)
    return _summary_status(summary, args, say)


def _summary_status(summary, args, say, lost_suffix: str = "") -> int:
    """The end of a run over several processes or Ray actors: lost workers, the count, the exit status."""
    for line in summary.lost:
        _say(f"characonsist: {line}{lost_suffix}", err=True)
    if summary.todo:
        out = Path(args.out)
        done = sum(j.state == "done" for j in summary.jobs)
        say(f"done: {done}/{len(summary.jobs)} group(s) in {out}; manifest: {out / 'manifest.json'}")
    return EXIT_FAILED if summary.failed or summary.lost else 0


def _say(message: str, err: bool = False) -> None:

    tqdm.write(message, file=sys.stderr if err else sys.stdout)


def _progress(quiet: bool, total: int, unit: str):
    if quiet:
        return nullcontext(_NoBar())

    return tqdm(total=total, unit=unit, desc=unit, position=0, dynamic_ncols=True)


class _NoBar:
    n = 0

    def __getattr__(self, name):
        return lambda *a, **k: None


def _silence_libraries() -> None:
    """--quiet: no loading bars or warnings from diffusers / transformers."""
    for name in ("diffusers", "transformers"):
        try:
            logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
            logging.set_verbosity_error()
            logging.disable_progress_bar()
        except Exception:
            pass


def demo_story_path() -> Path:

    return Path(str(files("characonsist") / "examples" / "demo_story.txt"))


def cmd_demo(args) -> int:

    out = Path(args.out)
    gen_args = build_parser().parse_args(["generate", str(demo_story_path()), "--model", "toy", "--out", str(out),
                                          "--save-masks", *(["--quiet"] if args.quiet else [])])
    status = cmd_generate(gen_args)
    if status == 0 and not args.quiet:
        manifest = read_json(out / "manifest.json") or {"groups": []}
        for group in manifest["groups"]:
            print(f"images:     {', '.join(str(out / i['path']) for i in [group['identity'], *group['frames']])}")
            print(f"masks:      {out / group['name'] / 'masks'}  ({len(group['masks'])} files)")
            print(f"storyboard: {out / group['storyboard']}")
        print(f"manifest:   {out / 'manifest.json'}")
    return status


def cmd_bench_toy(argv: list[str]) -> int:
    """``characonsist bench toy ...``: the toy benchmark's own options; the files it writes are checked first."""
    try:
        from .toy import bench
    except ImportError as e:
        raise InputError(f"the toy benchmark is not available in this install ({e})") from None
    parser = argparse.ArgumentParser(prog="characonsist bench toy", description="toy-world consistency benchmark")
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    if getattr(args, "json", None):
        check_writable_target(args.json, "file", "--json")
    if getattr(args, "images", None):
        check_writable_target(args.images, "folder", "--images")
    if getattr(args, "gpus", None) is not None:
        if args.gpus < 1:
            raise InputError(f"--gpus {args.gpus}: give at least 1")
        if not args.device.startswith("cuda"):
            raise InputError(f"--gpus {args.gpus} runs one process per GPU: give --device cuda")
        if args.gpus > 1:
            return cmd_launch(args, ["bench", "toy", *argv], command="bench toy")
    try:
        return int(bench.run(args) or 0)
    except OSError as e:   # e.g. the disk filled up while writing the results
        where = e.filename or args.json or args.images or "."
        raise FolderError(describe_os_error(e, where), where) from None


def cmd_eval(argv: list[str]) -> int:

    return evaluate(argv)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's kill is a Ctrl-C: finished work is kept
    except ValueError:  # not the main thread
        handler = None
    try:
        if argv[:2] == ["bench", "toy"]:   # the toy bench parses its own options (and its own --help)
            return cmd_bench_toy(argv[2:])
        if argv[:1] == ["eval"]:            # so does eval (characonsist.evaluate.cli)
            return cmd_eval(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "generate" and args.gpus is not None and args.ray is None:
            if args.gpus < 1:
                raise InputError(f"--gpus {args.gpus}: give at least 1")
            if args.gpus > 1:
                return cmd_launch(args, argv)
        return {"generate": cmd_generate, "demo": cmd_demo, "ui": cmd_ui}[args.command](args)
    except (InputError, FolderError) as e:
        print(f"characonsist: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ncharaconsist: interrupted; finished images are kept; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
