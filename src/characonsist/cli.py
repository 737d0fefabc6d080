"""``characonsist``: generate consistent-character storyboards from story files (and run the demo / benchmarks).

``characonsist generate STORY --model MODEL --out DIR`` is the official ``inference.py`` made safe to leave
running overnight: every input is checked before the model loads, every image is written atomically with its
settings, and a rerun resumes where the last one stopped (a group is the unit: its identity and frames are
generated together). See ``characonsist generate --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import signal
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from ._compat import dtype_kwarg
from .output import (
    mask_visual,
    match_visual,
    read_json,
    read_png_record,
    remove_stale_temporaries,
    save_png,
    settings_hash,
    storyboard,
    write_json,
)
from .storyfile import Group, Story, StoryError, check_prompt_lengths, load_story

# Defaults of the official code for FLUX.1-dev; a model folder may override them with characonsist_defaults.json.
FLUX_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 3.5,
                 "max_sequence_length": 512}
DEFAULTS_FILE = "characonsist_defaults.json"
# Method names, used only until the engine's registry (characonsist.methods.METHODS) can be imported.
FALLBACK_METHODS = ("vanilla", "characonsist")
# Memory modes: name -> (what it does, GPU memory the official README measured for FLUX.1-dev at 1024x1024).
MEMORY_MODES = {
    "none": ("whole model on one GPU", 37),
    "model-offload": ("enable_model_cpu_offload: one model at a time on the GPU", 26),
    "balanced": ('device_map="balanced": spread over the GPUs in --gpu-ids (per-GPU memory)', 20),
    "sequential-offload": ("enable_sequential_cpu_offload: one layer at a time on the GPU (slow)", 3),
}
MEMORY_ALIASES = {"0": "none", "1": "model-offload", "2": "balanced", "3": "sequential-offload"}  # official init_mode
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; anything else is taken as a folder path
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """Bad input found before any work: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="characonsist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"characonsist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate every group of story files into a storyboard folder",
                         description="Generate every group of the story files; rerun the same command to resume.")
    add_generate_arguments(gen)

    demo = sub.add_parser("demo", help="run the built-in example story on the toy model (CPU, seconds)")
    demo.add_argument("--out", default="characonsist-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    bench = sub.add_parser("bench", help="benchmarks: `characonsist bench toy --help`", add_help=False)
    bench.add_argument("suite", nargs="?", choices=["toy"], help="which benchmark (toy: the toy-world consistency bench)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    evaluate = sub.add_parser("eval", help="the papers' metrics on run folders: `characonsist eval --help`",
                              add_help=False, prefix_chars="\0")  # every argument goes to characonsist.evaluate
    evaluate.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


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
    p.add_argument("--height", type=int, help="image height, multiple of 16 (default: the model's, 1024 for FLUX)")
    p.add_argument("--width", type=int, help="image width, multiple of 16 (default: the model's, 1024 for FLUX)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, 50 for FLUX.1-dev)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's, 3.5 for FLUX.1-dev)")
    p.add_argument("--seed", type=int, default=2025, help="seed of every image without its own (official: %(default)s)")
    p.add_argument("--max-sequence-length", type=int, help="T5 prompt length limit in tokens (default: the model's, 512)")
    p.add_argument("--memory", default="none", metavar="MODE",
                   help="memory mode: none | model-offload | sequential-offload | balanced (or official init_mode 0-3)")
    p.add_argument("--gpu-ids", default="0", help="GPU ids, comma-separated; only `balanced` uses more than the first")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--batch-size", type=int, help="most images in one forward pass, identity included (default: whole group)")
    p.add_argument("--overwrite", action="store_true", help="replace groups that were generated with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages (errors still go to stderr)")


# ---------------------------------------------------------------------------------------------- checks

def method_names() -> list[str]:
    """Valid ``--method`` values: the engine's registry once it exists, else the fallback list."""
    try:
        from .methods import METHODS
    except ImportError:
        return list(FALLBACK_METHODS)
    return sorted(METHODS)


def method_options(method: str, args) -> dict:
    """The method's options: --share-bg / --token-merge / --option as given, else the method's own defaults
    (only share_bg and use_token_merge are recorded when left at their defaults)."""
    try:
        from .methods import method_class
    except ImportError:
        config = {"share_bg": True, "use_token_merge": True} if method == "characonsist" else {}
    else:
        try:
            cls = method_class(method)
        except ValueError as e:  # registered but not built yet / its dependencies missing
            raise UsageError(str(e)) from None
        config = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    options = {k: config[k] for k in ("share_bg", "use_token_merge") if k in config}
    for name, flag, value in (("share_bg", "--share-bg", args.share_bg),
                              ("use_token_merge", "--token-merge", args.token_merge)):
        if value is not None:
            if name not in config:
                raise UsageError(f"{flag}: method {method!r} has no option {name}; its options: "
                                 f"{', '.join(config) or 'none'}")
            options[name] = bool(value)
    for item in args.option or []:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE, KEY one of the options of method {method!r}: "
                             f"{', '.join(config) or 'none'}")
        options[key] = _parse_value(text, config[key], item)
    return options


def _parse_value(text: str, default, item: str):
    """A --option value in the type of the option's default."""
    try:
        if text.lower() == "none":   # e.g. schedule_steps=none; the method's config checks what it accepts
            return None
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("true", "1", "yes", "on")
        if default is None:   # an optional option (int | None, float | None, ...): read the literal
            for kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    pass
            return text
        return type(default)(text)
    except ValueError:
        raise UsageError(f"--option {item!r}: {text!r} is not a {type(default).__name__}") from None


def check_memory(args) -> tuple[str, list[int]]:
    mode = MEMORY_ALIASES.get(args.memory, args.memory)
    if mode not in MEMORY_MODES:
        raise UsageError(f"unknown memory mode {args.memory!r}; valid: {', '.join(MEMORY_MODES)} (or 0-3 as in the "
                         "official init_mode)")
    try:
        gpus = [int(g) for g in str(args.gpu_ids).split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"--gpu-ids {args.gpu_ids!r} must be comma-separated integers, e.g. 0,1") from None
    if not gpus:
        raise UsageError("--gpu-ids names no GPU")
    return mode, gpus


@dataclass
class ModelRef:
    """Where the model comes from: ``toy``, a local folder or a hub id; ``folder`` holds its files if known."""

    name: str
    kind: str
    folder: Path | None = None
    defaults: dict = field(default_factory=dict)


def resolve_model(name: str) -> ModelRef:
    """Find the model without loading it: toy, an existing folder, or a hub id (access checked on the hub)."""
    if name == "toy":
        try:
            from .toy import model as toy
        except ImportError as e:
            raise UsageError(f"the toy model is not available in this install ({e})") from None
        try:
            defaults = toy.load_toy_defaults(toy.TOY_MODEL_DIR)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        return ModelRef(name, "toy", Path(toy.TOY_MODEL_DIR), {k: v for k, v in defaults.items() if k in FLUX_DEFAULTS})
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"model folder {name!r} has no model_index.json: not a diffusers pipeline folder "
                             "(save one with FluxPipeline.save_pretrained)")
        return ModelRef(name, "local", path, _folder_defaults(path))
    if not HUB_ID.fullmatch(name):
        raise UsageError(f"model folder {name!r} does not exist (a hub id looks like owner/name, e.g. "
                         "black-forest-labs/FLUX.1-dev; `toy` is the model shipped with the package)")
    check_hub_access(name)
    return ModelRef(name, "hub", None, _schnell_defaults(_hub_file(name, "transformer/config.json")))


def _folder_defaults(folder: Path) -> dict:
    data = read_json(folder / DEFAULTS_FILE) or {}
    own = {k: v for k, v in data.items() if k in FLUX_DEFAULTS}
    return {**_schnell_defaults(folder / "transformer" / "config.json"), **own}


def _schnell_defaults(config_path: Path | None) -> dict:
    """FLUX.1-schnell's defaults for a transformer without guidance embedding (distilled: 4 steps, no guidance,
    256 T5 tokens, as its model card runs it); {} for guidance-distilled models like FLUX.1-dev."""
    config = read_json(config_path) if config_path else None
    if config and config.get("guidance_embeds") is False:
        return {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}
    return {}


def _hub_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:  # defaults only: FLUX.1-dev's are used when the file cannot be had
        return None


def check_hub_access(repo: str) -> None:
    """Fail early, with what to do, if a hub model is gated, missing, or neither reachable nor cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(repo, "model_index.json")
    except GatedRepoError:
        raise UsageError(
            f"{repo} is a gated model and this machine has no access token for it: accept its license at "
            f"https://huggingface.co/{repo} (logged in), then run `hf auth login` or set HF_TOKEN, and rerun") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo} was not found on the Hugging Face hub (if it is private, log in with "
                         "`hf auth login` or set HF_TOKEN); or pass a local folder") from None
    except LocalEntryNotFoundError:
        raise UsageError(f"cannot reach the Hugging Face hub and {repo} is not in the local cache: download it "
                         "where there is a connection, or pass a local folder") from None


def load_t5_tokenizer(ref: ModelRef):
    """The model's T5 tokenizer alone (no weights), or None when it cannot be had without the model."""
    from transformers import AutoTokenizer

    try:
        if ref.folder is not None:
            return AutoTokenizer.from_pretrained(ref.folder / "tokenizer_2")
        return AutoTokenizer.from_pretrained(ref.name, subfolder="tokenizer_2")
    except Exception:  # no tokenizer saved separately / no network: checked after loading the model instead
        return None


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class Job:
    """One group to produce: where its files go, what each image is, and what is already on disk."""

    group: Group
    folder: str                      # relative to the output folder
    records: list[dict]              # per image, identity first: what goes in the PNG and the manifest
    hash: str
    state: str = "todo"              # todo | partial | done | conflict | failed
    finished: list[bool] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    error: str | None = None
    masks: list[str] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    engine_settings: dict | None = None


def image_paths(folder: str, n_frames: int) -> list[str]:
    digits = max(2, len(str(n_frames)))
    return [f"{folder}/identity.png"] + [f"{folder}/frame_{i:0{digits}d}.png" for i in range(1, n_frames + 1)]


def plan_jobs(stories: list[Story], run: dict, out: Path, save_masks: bool) -> list[Job]:
    """Every group with its settings hash and its state on disk (finished images are recognised by hash)."""
    jobs = []
    for story in stories:
        prefix = f"{Path(story.path).stem}/" if len(stories) > 1 else ""
        for group in story.groups:
            folder = prefix + group.name
            images = []
            for image in group.images:
                images.append({"background": image.background, "character": image.character, "action": image.action,
                               "seed": run["seed"] if image.seed is None else image.seed,
                               "height": image.height or run["height"], "width": image.width or run["width"]})
            key = {k: run[k] for k in ("model", "dtype", "method", "method_options", "num_inference_steps",
                                       "guidance_scale", "max_sequence_length")}
            group_hash = settings_hash({**key, "images": images})
            paths = image_paths(folder, len(group.frames))
            records = []
            for i, (image, spec, path) in enumerate(zip(group.images, images, paths)):
                records.append({"group": folder, "role": "identity" if i == 0 else "frame", "index": i, "path": path,
                                "prompt": image.prompt, **spec, "caption": group.captions[i], "method": run["method"],
                                "settings": key, "settings_hash": group_hash, "version": __version__})
            job = Job(group, folder, records, group_hash)
            _inspect(job, out, save_masks)
            jobs.append(job)
    return jobs


def _inspect(job: Job, out: Path, save_masks: bool) -> None:
    job.finished, conflict, kept = [], False, []
    for record in job.records:
        path = out / record["path"]
        old = read_png_record(path) if path.exists() else None
        job.finished.append(old is not None and old.get("settings_hash") == job.hash)
        kept.append(old if job.finished[-1] else None)
        if path.exists() and not job.finished[-1]:
            conflict = True
            for change in _describe_change(old, record):
                if change not in job.changes:
                    job.changes.append(change)
    board = read_png_record(out / job.folder / "storyboard.png")
    board_ok = board is not None and board.get("settings_hash") == job.hash
    if conflict:
        job.state = "conflict"
        job.changes = job.changes or ["the group's images or their number changed"]
    elif all(job.finished) and board_ok and (board.get("masks_saved") or not save_masks):
        job.state = "done"
        job.masks = board.get("masks", [])
    elif any(job.finished) or board_ok:
        job.state = "partial"
    if all(job.finished):  # what the manifest says about images made by an earlier run
        job.notes = [old.get("notes", []) for old in kept]
        job.engine_settings = kept[0].get("engine_settings")


def _describe_change(old: dict | None, new: dict) -> list[str]:
    """What differs between an image on disk and the one this run would make (settings first)."""
    name = Path(new["path"]).stem
    if old is None:
        return [f"{name}.png exists but is not a finished characonsist image"]
    old_settings = old.get("settings", {})
    changed = [f"{key} {old_settings.get(key)!r} -> {value!r}" for key, value in new["settings"].items()
               if old_settings.get(key) != value]
    changed += [f"{name} {key} {old.get(key)!r} -> {new.get(key)!r}"
                for key in ("background", "character", "action", "seed", "height", "width") if old.get(key) != new.get(key)]
    return changed


# ---------------------------------------------------------------------------------------------- engine

@dataclass
class GroupResult:
    """What generating one group gives back (identity first everywhere)."""

    images: list
    masks: list | None = None
    matches: list | None = None
    notes: list[list[str]] | None = None
    settings: dict | None = None


def resolve_dtype(name: str) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU (recorded resolved, so the settings hash is stable)."""
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def load_engine(ref: ModelRef, run: dict, mode: str, gpus: list[int], progress: bool = True):
    """Load the pipeline in the memory mode; return ``generate(job, step_callback) -> GroupResult``."""
    import torch

    from . import CharaConsistPipeline

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, run["dtype"])
    device = f"cuda:{gpus[0]}" if cuda else "cpu"
    if ref.kind == "toy":
        from .toy.model import load_toy_pipeline

        flux, _ = load_toy_pipeline(device=device, dtype=dtype, path=ref.folder)
        pipe = CharaConsistPipeline.from_pipe(flux)
    elif mode == "balanced":
        free = {g: f"{int(torch.cuda.get_device_properties(g).total_memory * 0.9 / 2**30)}GiB" for g in gpus}
        pipe = _from_pretrained(CharaConsistPipeline, ref.name, **dtype_kwarg(dtype), device_map="balanced",
                                max_memory=free)
    else:
        pipe = _from_pretrained(CharaConsistPipeline, ref.name, **dtype_kwarg(dtype))
        if mode == "model-offload":
            pipe.enable_model_cpu_offload(gpu_id=gpus[0])
        elif mode == "sequential-offload":
            pipe.enable_sequential_cpu_offload(gpu_id=gpus[0])
        else:
            pipe.to(device)
    # the engine's own bar is the step bar (its total counts pre-runs and chunks); under the CLI's image bar
    pipe.set_progress_bar_config(disable=not progress, desc="steps", position=1, leave=False, dynamic_ncols=True)

    def generate(job: Job) -> GroupResult:
        images = job.group.images
        out = pipe(identity=images[0], frames=images[1:], method=run["method"], height=run["height"],
                   width=run["width"], num_inference_steps=run["num_inference_steps"],
                   guidance_scale=run["guidance_scale"], seed=[r["seed"] for r in job.records],
                   max_sequence_length=run["max_sequence_length"], batch_size=run["batch_size"],
                   **run["method_options"])
        return GroupResult([out.identity, *out.frames], out.masks, out.matches, out.notes, out.settings)

    generate.tokenizer = getattr(pipe, "tokenizer_2", None)
    return generate


def _from_pretrained(cls, name: str, **kwargs):
    """``from_pretrained`` with ``torch_dtype`` (newer diffusers call it ``dtype`` and warn; older lack it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return cls.from_pretrained(name, **kwargs)


def oom_advice(mode: str, gpus: list[int]) -> str:
    """Which memory modes would fit, from the official FLUX.1-dev measurements and this GPU's size."""
    total = None
    try:
        import torch

        total = torch.cuda.get_device_properties(gpus[0]).total_memory / 2**30
    except Exception:
        pass
    order = list(MEMORY_MODES)
    fits = []
    for other in order[order.index(mode) + 1:] if mode in order else order:
        need = MEMORY_MODES[other][1]
        if other == "balanced" and len(gpus) < 2:
            continue
        if total is None or need <= total:
            fits.append(f"--memory {other} (about {need} GB{' per GPU' if other == 'balanced' else ''})")
    size = f" ({total:.0f} GiB)" if total else ""
    hint = "; ".join(fits) if fits else "none of the memory modes fits this GPU; use a smaller --height/--width"
    return (f"GPU out of memory in memory mode {mode!r} on GPU {gpus[0]}{size}. Memory modes that would fit: {hint}. "
            "A smaller --batch-size also lowers the peak (figures: official FLUX.1-dev at 1024x1024).")


def _is_oom(error: BaseException) -> bool:
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# ---------------------------------------------------------------------------------------------- writing

def write_group(job: Job, result: GroupResult, out: Path, save_masks: bool) -> None:
    """Save the group's unfinished images (finished ones are never rewritten), masks, and storyboard."""
    import numpy as np
    from PIL import Image

    images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in result.images]
    if len(images) != len(job.records):
        raise RuntimeError(f"the engine returned {len(images)} images for a group of {len(job.records)}")
    job.notes = [list(n) for n in (result.notes or [[] for _ in images])]
    job.engine_settings = result.settings
    for i, (image, record) in enumerate(zip(images, job.records)):
        if job.finished[i]:  # made by an earlier run: never rewritten
            continue
        record = {**record, "notes": job.notes[i], "engine_settings": result.settings}
        save_png(out / record["path"], image, record)
        job.finished[i] = True
    job.masks = []
    if save_masks and result.masks is not None:
        for i, (image, record) in enumerate(zip(images, job.records)):
            stem = Path(record["path"]).stem
            if result.masks[i] is not None:
                path = f"{job.folder}/masks/{stem}_mask.png"
                save_png(out / path, mask_visual(image, result.masks[i]), {"settings_hash": job.hash})
                job.masks.append(path)
            match = result.matches[i - 1] if i and result.matches else None
            if match is not None:
                path = f"{job.folder}/masks/{stem}_match.png"
                sim = getattr(match, "sim", None)
                grids = [None if m is None else tuple(np.shape(m)) for m in (result.masks[0], result.masks[i])]
                visual = match_visual(images[0], image, _numpy(match.frame_idx), _numpy(match.id_idx),
                                      None if sim is None else _numpy(sim), id_grid=grids[0], frame_grid=grids[1])
                save_png(out / path, visual, {"settings_hash": job.hash})
                job.masks.append(path)
    write_storyboard(job, out, save_masks, images)
    job.state = "done"


def _numpy(tensor):
    return tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else tensor


def write_storyboard(job: Job, out: Path, save_masks: bool, images: list | None = None) -> None:
    """The group's sheet: identity and frames in a grid with captions (read from disk when not given)."""
    from PIL import Image

    if images is None:
        images = []
        for record in job.records:
            with Image.open(out / record["path"]) as image:
                images.append(image.convert("RGB"))
    captions = []
    for r in job.records:
        label = "identity" if r["role"] == "identity" else f"frame {r['index']}"
        captions.append(f"{label}: {r['caption'] or r['prompt']}")
    sheet = storyboard(images, captions, title=job.folder)
    save_png(out / job.folder / "storyboard.png", sheet,
             {"settings_hash": job.hash, "masks_saved": save_masks, "masks": job.masks})


def versions() -> dict:
    found = {"characonsist": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = None
    return found


def write_manifest(out: Path, stories: list[Story], run: dict, jobs: list[Job]) -> None:
    groups = []
    for job in jobs:
        entry = {"name": job.folder, "status": job.state, "settings_hash": job.hash,
                 "storyboard": f"{job.folder}/storyboard.png" if job.state == "done" else None,
                 "masks": job.masks, "engine_settings": job.engine_settings}
        images = []
        for i, r in enumerate(job.records):
            item = {k: r[k] for k in ("path", "prompt", "background", "character", "action", "seed", "height",
                                      "width", "caption")}
            item["finished"] = bool(job.finished[i]) if job.finished else False
            if job.notes:
                item["notes"] = job.notes[i]
            images.append(item)
        entry["identity"], entry["frames"] = images[0], images[1:]
        if job.error:
            entry["error"] = job.error
        if job.changes and job.state == "conflict":
            entry["changes"] = job.changes
        groups.append(entry)
    write_json(out / "manifest.json", {
        "format": "characonsist-manifest/1", "stories": [s.path for s in stories], "settings": run,
        "versions": versions(), "groups": groups})


# ---------------------------------------------------------------------------------------------- commands

def resolve_run(args, ref: ModelRef, method: str) -> dict:
    """The full settings of this run: the user's, else the model folder's defaults, else FLUX.1-dev's."""
    defaults = {**FLUX_DEFAULTS, **ref.defaults}
    run = {"model": ref.name, "dtype": resolve_dtype(args.dtype), "method": method, "method_options": method_options(method, args),
           "height": args.height or defaults["height"], "width": args.width or defaults["width"],
           "num_inference_steps": args.steps or defaults["num_inference_steps"],
           "guidance_scale": defaults["guidance_scale"] if args.guidance is None else args.guidance,
           "max_sequence_length": args.max_sequence_length or defaults["max_sequence_length"],
           "seed": args.seed, "batch_size": args.batch_size, "save_masks": args.save_masks}
    for name in ("height", "width"):
        if run[name] <= 0 or run[name] % 16:
            raise UsageError(f"--{name} {run[name]} is not a positive multiple of 16 (FLUX works on 16-pixel patches)")
    if run["num_inference_steps"] < 1:
        raise UsageError("--steps must be at least 1")
    if run["max_sequence_length"] < 1 or run["max_sequence_length"] > 512:
        raise UsageError("--max-sequence-length must be between 1 and 512 (FLUX's T5 limit)")
    if run["batch_size"] is not None and run["batch_size"] < 2:
        raise UsageError("--batch-size must be at least 2 (a batch holds the identity and at least one frame)")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} is out of range (0 to 2**63-1)")
    return run


@dataclass
class Checked:
    """Everything ``generate`` found out before loading the model."""

    stories: list[Story]
    ref: ModelRef
    run: dict
    mode: str
    gpus: list[int]
    tokenizer: object | None


def check_inputs(args) -> Checked:
    """Step 1: every check that needs no model (raises UsageError / StoryError)."""
    methods = method_names()
    if args.method not in methods:
        raise UsageError(f"unknown method {args.method!r}; valid: {', '.join(methods)}")
    mode, gpus = check_memory(args)
    problems, stories = [], []
    for path in args.story:
        try:
            stories.append(load_story(path))
        except StoryError as e:
            problems += e.problems
    stems = [Path(s.path).stem for s in stories]
    if len(set(stems)) != len(stems):
        problems.append("two story files have the same name; their output folders would collide")
    if problems:
        raise StoryError(problems)
    ref = resolve_model(args.model)
    run = resolve_run(args, ref, args.method)
    if mode != "none" and ref.kind != "toy":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"memory mode {mode!r} needs a CUDA GPU and none is visible; use --memory none")
    tokenizer = load_t5_tokenizer(ref)
    if tokenizer is not None:
        problems = [p for s in stories for p in check_prompt_lengths(s, tokenizer, run["max_sequence_length"])]
        if problems:
            raise StoryError(problems)
    return Checked(stories, ref, run, mode, gpus, tokenizer)


def plan_output(args, checked: Checked, out: Path) -> list[Job]:
    """Step 2: what is already on disk; stop on groups made with other settings unless --overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    jobs = plan_jobs(checked.stories, checked.run, out, args.save_masks)
    conflicts = [j for j in jobs if j.state == "conflict"]
    if conflicts and not args.overwrite:
        lines = [f"  {j.folder}: " + "; ".join(j.changes[:4]) + (f" (+{len(j.changes) - 4} more)" if len(j.changes) > 4 else "")
                 for j in conflicts]
        raise UsageError(f"{len(conflicts)} group(s) in {out} were generated with other settings:\n" + "\n".join(lines)
                         + "\nRerun with --overwrite to replace them, or choose another --out.")
    for job in conflicts:  # --overwrite: start the group from scratch, without the old group's extra files
        job.finished = [False] * len(job.records)
        job.state = "todo"
        expected = {r["path"] for r in job.records}
        for old in [*(out / job.folder).glob("frame_*.png"), *(out / job.folder / "masks").glob("*.png")]:
            if old.relative_to(out).as_posix() not in expected:
                old.unlink()
    for job in jobs:  # all images there, only the storyboard lost: no model needed
        if job.state != "done" and all(job.finished) and not args.save_masks:
            write_storyboard(job, out, args.save_masks)
            job.state = "done"
    return jobs


def cmd_generate(args) -> int:
    say = (lambda *a: None) if args.quiet else _say
    checked = check_inputs(args)
    run, mode, gpus, out = checked.run, checked.mode, checked.gpus, Path(args.out)
    jobs = plan_output(args, checked, out)
    todo = [j for j in jobs if j.state != "done"]
    say(f"{len(jobs)} group(s), {len(jobs) - len(todo)} already done, {len(todo)} to generate -> {out}")
    write_manifest(out, checked.stories, run, jobs)
    if not todo:
        return 0

    # step 3: generate, one group at a time, saving each as soon as it is done
    if args.quiet:
        _silence_libraries()
    try:
        generate = load_engine(checked.ref, run, mode, gpus, progress=not args.quiet)
    except Exception as error:
        if _is_oom(error):
            _say(f"loading the model failed: {oom_advice(mode, gpus)}", err=True)
            return EXIT_FAILED
        raise
    if checked.tokenizer is None and getattr(generate, "tokenizer", None) is not None:
        problems = [p for s in checked.stories
                    for p in check_prompt_lengths(s, generate.tokenizer, run["max_sequence_length"])]
        if problems:
            raise StoryError(problems)
    failed = 0
    with _progress(args.quiet, sum(len(j.records) for j in todo), "images") as image_bar:
        for job in todo:
            image_bar.set_postfix_str(job.folder)
            try:
                write_group(job, generate(job), out, args.save_masks)
                fallbacks = sum(len(n) for n in job.notes)
                if fallbacks:
                    say(f"{job.folder}: {fallbacks} fallback note(s) (empty mask, no match, ...): see manifest.json")
            except KeyboardInterrupt:
                raise
            except Exception as error:  # one bad group must not end an overnight run
                failed += 1
                job.state = "failed"
                job.error = oom_advice(mode, gpus) if _is_oom(error) else f"{type(error).__name__}: {error}"
                _say(f"group {job.folder} failed: {job.error}", err=True)
                if _is_oom(error):
                    _free_cuda()
            finally:
                write_manifest(out, checked.stories, run, jobs)
            image_bar.update(len(job.records))
    say(f"done: {len(jobs) - failed}/{len(jobs)} group(s) in {out}; manifest: {out / 'manifest.json'}")
    return EXIT_FAILED if failed else 0


def _say(message: str, err: bool = False) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr if err else sys.stdout)


def _progress(quiet: bool, total: int, unit: str):
    if quiet:
        return nullcontext(_NoBar())
    from tqdm import tqdm

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


def _free_cuda() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def demo_story_path() -> Path:
    from importlib.resources import files

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


def cmd_bench(args) -> int:
    if args.suite != "toy":
        print("usage: characonsist bench toy [options]   (see `characonsist bench toy --help`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        from .toy import bench
    except ImportError as e:
        raise UsageError(f"the toy benchmark is not available in this install ({e})") from None
    parser = argparse.ArgumentParser(prog="characonsist bench toy", description="toy-world consistency benchmark")
    bench.add_arguments(parser)
    return int(bench.run(parser.parse_args(args.rest)) or 0)


def cmd_eval(args) -> int:
    from .evaluate.cli import main as evaluate

    return evaluate(args.rest)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.suite is None:
        args.suite = "help"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's kill is a Ctrl-C: finished work is kept
    except ValueError:  # not the main thread
        handler = None
    try:
        return {"generate": cmd_generate, "demo": cmd_demo, "bench": cmd_bench,
                "eval": cmd_eval}[args.command](args)
    except (UsageError, StoryError) as e:
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

