"""Which model a request names, what can be known of it without its weights, and loading it in a memory mode.

``resolve_model`` finds the model (``toy``, a local diffusers folder, or a hub id) and reads its defaults and
limits from config files only; ``load_engine`` loads the pipeline and returns the function that generates one
story job.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import InputError, ModelLimits, model_defaults, model_limits, read_config
from ..memory import MEMORY_ALIASES, MODES, QUANTIZATIONS, MemoryPlan, estimate_needs

# Memory modes: name -> (what it does, GPU memory in GB for FLUX.1-dev at 1024x1024: the official README's figures,
# group offload's from characonsist.memory.estimate_needs), from the most to the least GPU memory.
MEMORY_MODES = {
    "none": (MODES["none"].help, 37),
    "model-offload": (MODES["model-offload"].help, 26),
    "group-offload": (MODES["group-offload"].help, round(estimate_needs("group-offload").gpu_reserved_gib)),
    "balanced": (MODES["balanced"].help + " (per-GPU memory)", 20),
    "sequential-offload": (MODES["sequential-offload"].help, 3),
}
DTYPES = ("auto", "bfloat16", "float16", "float32")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; anything else is taken as a folder path


@dataclass
class ModelRef:
    """Where the model comes from: ``toy``, a local folder or a hub id; ``folder`` holds its files if known."""

    name: str
    kind: str                                        # toy | local | hub
    folder: Path | None = None
    defaults: dict = field(default_factory=dict)     # height, width, steps, guidance, max_sequence_length
    vae_config: dict | None = None


def resolve_model(name: str) -> ModelRef:
    """Find the model without loading it: toy, an existing folder, or a hub id (access checked on the hub)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError("model: give a hub id (owner/name), a local diffusers folder, or `toy`")
    if name == "toy":
        try:
            from ..toy import model as toy
        except ImportError as e:
            raise InputError(f"the toy model is not available in this install ({e})") from None
        try:
            toy.load_toy_defaults(toy.TOY_MODEL_DIR)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
        folder = Path(toy.TOY_MODEL_DIR)
        return ModelRef(name, "toy", folder, model_defaults(folder), read_config(folder / "vae" / "config.json"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model folder {name!r} has no model_index.json: not a diffusers pipeline folder "
                             "(save one with FluxPipeline.save_pretrained)")
        return ModelRef(name, "local", path, model_defaults(path), read_config(path / "vae" / "config.json"))
    if path.exists():
        raise InputError(f"model {name!r} is a file; give a diffusers pipeline folder, a hub id or `toy`")
    if not HUB_ID.fullmatch(name):
        raise InputError(f"model folder {name!r} does not exist (a hub id looks like owner/name, e.g. "
                         "black-forest-labs/FLUX.1-dev; `toy` is the model shipped with the package)")
    check_hub_access(name)
    return ModelRef(name, "hub", None, model_defaults(None, read_config(_hub_file(name, "transformer/config.json"))),
                    read_config(_hub_file(name, "vae/config.json")))


def _hub_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:  # defaults and limits only: FLUX.1-dev's are used when the file cannot be had
        return None


def check_hub_access(repo: str) -> None:
    """Fail early, with what to do, if a hub model is gated, missing, or neither reachable nor cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)   # its "... thrown while requesting HEAD" warning: the message below says it
    try:
        hf_hub_download(repo, "model_index.json")
    except GatedRepoError:
        raise InputError(
            f"{repo} is a gated model and this machine has no access token for it: accept its license at "
            f"https://huggingface.co/{repo} (logged in), then run `hf auth login` or set HF_TOKEN, and rerun") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo} was not found on the Hugging Face hub (if it is private, log in with "
                         "`hf auth login` or set HF_TOKEN); or pass a local folder") from None
    except LocalEntryNotFoundError:
        raise InputError(f"cannot reach the Hugging Face hub and {repo} is not in the local cache: download it "
                         "where there is a connection, or pass a local folder") from None
    finally:
        hub_log.setLevel(level)


def load_t5_tokenizer(ref: ModelRef):
    """The tokenizer of the transformer's text tokens alone (no weights): FLUX.1's T5 ``tokenizer_2``, or the only
    ``tokenizer`` of a backbone with one text encoder (Chroma); None when it cannot be had without the model."""
    from transformers import AutoTokenizer

    for sub in ("tokenizer_2", "tokenizer"):
        try:
            if ref.folder is not None:
                index = read_config(ref.folder / "model_index.json") or {}
                if sub in index and (ref.folder / sub).is_dir():
                    return AutoTokenizer.from_pretrained(ref.folder / sub)
                continue
            return AutoTokenizer.from_pretrained(ref.name, subfolder=sub)
        except Exception:  # no tokenizer saved separately / no network: checked after loading the model instead
            continue
    return None


def limits_of(ref: ModelRef, tokenizer=None) -> ModelLimits:
    """What the model takes (sizes, vocabulary), from its config files and tokenizer."""
    return model_limits(ref.vae_config, ref.defaults, tokenizer)


def check_memory(memory: str, gpu_ids) -> tuple[str, list[int]]:
    """The memory mode's name (``auto`` stays ``auto``: ``plan_memory`` resolves it) and the GPU ids (``"0,1"`` or a
    list of ints)."""
    mode = MEMORY_ALIASES.get(str(memory), memory)
    if mode not in MEMORY_MODES and mode != "auto":
        raise InputError(f"unknown memory mode {memory!r}; valid: {', '.join(MEMORY_MODES)}, auto (or 0-3 as in the "
                         "official init_mode)")
    try:
        gpus = [int(g) for g in str(gpu_ids).split(",") if g.strip()] if isinstance(gpu_ids, str) \
            else [int(g) for g in gpu_ids]
    except (TypeError, ValueError):
        raise InputError(f"--gpu-ids {gpu_ids!r} must be comma-separated integers, e.g. 0,1") from None
    if not gpus or any(g < 0 for g in gpus):
        raise InputError(f"--gpu-ids {gpu_ids!r} names no GPU (give ids >= 0, e.g. 0 or 0,1)")
    return mode, gpus


def check_memory_device(mode: str) -> None:
    """InputError when the memory mode needs a CUDA GPU (every mode but ``none``; ``auto`` picks one that fits)
    and none is visible."""
    if mode not in ("none", "auto"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"memory mode {mode!r} needs a CUDA GPU and none is visible; use --memory none")


def check_quantize(quantize: str, ref: ModelRef | None = None) -> str:
    """The weight format's name (``auto`` stays ``auto``); InputError if it is unknown or cannot run here."""
    from ..memory import check_quantization

    if quantize == "auto":
        return quantize
    if quantize not in QUANTIZATIONS:
        raise InputError(f"unknown weight format --quantize {quantize!r}; valid: {', '.join(QUANTIZATIONS)}, auto")
    problem = check_quantization(quantize)
    if problem:
        raise InputError(problem)
    return quantize


def check_attention_backend(name: str | None) -> str | None:
    """A diffusers attention backend name (``transformer.set_attention_backend``), or None for PyTorch's default;
    whether its package is installed is checked when the model loads."""
    if name in (None, "", "default"):
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName

    valid = [b.value for b in AttentionBackendName]
    if name not in valid:
        raise InputError(f"unknown attention backend {name!r}; valid: default, {', '.join(valid)}")
    return name


def check_loras(specs) -> list[dict]:
    """``--lora`` values ``SOURCE[:SCALE]`` (a LoRA file or folder, or a hub id) as ``{"source", "scale"}``; a
    local path must exist."""
    loras = []
    for spec in specs or []:
        if isinstance(spec, dict):
            source, scale = spec.get("source"), spec.get("scale", 1.0)
        else:
            source, _, tail = str(spec).rpartition(":")
            try:
                scale = float(tail)
            except ValueError:
                source, scale = str(spec), 1.0
            if not source:
                source, scale = str(spec), 1.0
        if not isinstance(source, str) or not source.strip():
            raise InputError(f"--lora {spec!r}: give a LoRA file or folder, or a hub id, optionally :SCALE")
        if not (isinstance(scale, (int, float)) and scale == scale and abs(scale) != float("inf")):
            raise InputError(f"--lora {spec!r}: the scale must be a finite number")
        path = Path(source).expanduser()
        if not path.exists() and not HUB_ID.fullmatch(source):
            raise InputError(f"--lora {source!r}: no such file or folder (a hub id looks like owner/name)")
        loras.append({"source": str(path) if path.exists() else source, "scale": float(scale)})
    return loras


def plan_memory(mode: str, quantize: str, ref: ModelRef, run: dict, gpus: list[int], images: int) -> MemoryPlan:
    """Resolve ``--memory auto`` / ``--quantize auto``: the fastest pair that fits this machine's free GPU memory
    and available host memory for the largest group (``characonsist.memory.choose_plan``). A mode or weight format
    given explicitly is kept."""
    from .. import memory

    gpu_free, host, n_gpus, capability = memory.visible_memory(gpus[0])
    formats = [quantize] if quantize != "auto" else (
        memory.available_quantizations(gpu_free is not None, capability))
    tokens = (run["height"] // 16) * (run["width"] // 16)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}.get(run["dtype"], 2)
    modes = None if mode == "auto" else [mode]
    return memory.choose_plan(gpu_free, host, formats, gpus=min(len(gpus), max(n_gpus, 1)),
                              size=memory.model_size(ref.folder), images=images, tokens=tokens,
                              text_len=run["max_sequence_length"], dtype_bytes=dtype_bytes, modes=modes)


def resolve_dtype(name: str) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU (recorded resolved, so the settings hash is stable)."""
    if name not in DTYPES:
        raise InputError(f"dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass
class GroupResult:
    """What generating one group gives back (identity first everywhere)."""

    images: list
    masks: list | None = None
    matches: list | None = None
    notes: list[list[str]] | None = None
    settings: dict | None = None


def load_engine(ref: ModelRef, run: dict, mode: str, gpus: list[int], progress: bool = True):
    """Load the pipeline in the run's weight format and the memory mode; return ``generate(job,
    progress_callback=None) -> GroupResult``."""
    return story_engine(load_pipeline(ref, run["dtype"], mode, gpus, progress, run), run)


def load_pipeline(ref: ModelRef, dtype: str, mode: str, gpus: list[int], progress: bool = True,
                  run: dict | None = None):
    """The ``CharaConsistPipeline`` of ``ref`` in ``dtype`` and the memory mode, with the run's weight format, LoRAs,
    attention backend and compiled blocks when it gives them (``characonsist.memory.load_pipeline``). A long-lived
    front end such as the web UI loads it once and makes a ``story_engine`` per run."""
    import torch

    from .. import CharaConsistPipeline, memory

    run = run or {}
    name = str(ref.folder) if ref.kind == "toy" else ref.name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = memory.load_pipeline(CharaConsistPipeline, name, getattr(torch, dtype),
                                    quantize=run.get("quantize", "none"), memory=mode, gpus=gpus,
                                    vae_tiling=bool(run.get("vae_tiling")), loras=run.get("loras") or (),
                                    attention_backend=run.get("attention_backend"), compile=bool(run.get("compile")))
    # the engine's own bars (one per pass) go under the front end's image bar
    pipe.set_progress_bar_config(disable=not progress, desc="steps", position=1, leave=False, dynamic_ncols=True)
    return pipe


def story_engine(pipe, run: dict):
    """``generate(job, progress_callback=None) -> GroupResult`` for a loaded pipeline and a run's settings.
    ``generate`` also passes ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` to the pipeline
    (the web UI's live previews); they never change an image that only reads."""

    def generate(job, progress_callback=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)) -> GroupResult:
        from .jobs import picture_of

        images = job.group.images
        picture = picture_of(job)
        extra = {"identity_image": picture, "inversion": run.get("inversion")} if picture is not None else {}
        out = pipe(identity=images[0], frames=images[1:], method=run["method"], height=run["height"],
                   width=run["width"], num_inference_steps=run["num_inference_steps"],
                   guidance_scale=run["guidance_scale"], seed=[r["seed"] for r in job.records],
                   max_sequence_length=run["max_sequence_length"], batch_size=run["batch_size"],
                   progress_callback=progress_callback, callback_on_step_end=callback_on_step_end,
                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **run["method_options"],
                   **extra)
        return GroupResult([out.identity, *out.frames], out.masks, out.matches, out.notes, out.settings)

    generate.tokenizer = pipe.prompt_tokenizer
    generate.limits = pipe.input_limits()
    generate.pipe = pipe
    return generate


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
            "A smaller --batch-size also lowers the peak; --quantize int8 or nf4 halves or quarters the weights; "
            "--memory auto picks a mode that fits (figures: FLUX.1-dev at 1024x1024).")


def is_oom(error: BaseException) -> bool:
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_cuda() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass
