"""How the model will be loaded, decided before it is: the memory mode and GPUs, the weight format, LoRAs and the
attention backend checked, ``auto`` resolved against this machine (``characonsist.memory.choose_plan``), and what
to say when a group runs out of GPU memory.

Messages name the fields (``memory``, ``gpu_ids``, ``quantize``, ``loras``, ``attention_backend``); ``names`` maps
them to a front end's own labels (the command line: its flags).
"""

from __future__ import annotations

from pathlib import Path

from .. import memory
from ..inputs import InputError
from ..memory import MEMORY_ALIASES, MODES, QUANTIZATIONS, MemoryPlan, check_quantization, estimate_needs
from .model import HUB_ID, ModelRef
from .settings import Lora, label, setting

# Memory modes: name -> (what it does, GPU memory in GB for FLUX.1-dev at 1024x1024: the official README's figures,
# group offload's measured, characonsist.memory.MEASURED through estimate_needs), from the most to the least GPU
# memory (the out-of-memory advice offers the modes after the one that failed).
MEMORY_MODES = {
    "none": (MODES["none"].help, 37),
    "model-offload": (MODES["model-offload"].help, 26),
    "balanced": (MODES["balanced"].help + " (per-GPU memory)", 20),
    "group-offload": (MODES["group-offload"].help, round(estimate_needs("group-offload").gpu_reserved_gib)),
    "sequential-offload": (MODES["sequential-offload"].help, 3),
}


def check_memory(memory: str, gpu_ids, names: dict | None = None) -> tuple[str, list[int]]:
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
        raise InputError(f"{label(names, 'gpu_ids')} {gpu_ids!r} must be comma-separated integers, e.g. 0,1") \
            from None
    if not gpus or any(g < 0 for g in gpus):
        raise InputError(f"{label(names, 'gpu_ids')} {gpu_ids!r} names no GPU (give ids >= 0, e.g. 0 or 0,1)")
    return mode, gpus


def check_memory_device(mode: str, names: dict | None = None) -> None:
    """InputError when the memory mode needs a CUDA GPU (every mode but ``none``; ``auto`` picks one that fits)
    and none is visible."""
    if mode not in ("none", "auto"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"memory mode {mode!r} needs a CUDA GPU and none is visible; use "
                             f"{setting(names, 'memory', 'none')}")


def check_quantize(quantize: str, names: dict | None = None) -> str:
    """The weight format's name (``auto`` stays ``auto``); InputError if it is unknown or cannot run here."""
    if quantize == "auto":
        return quantize
    if quantize not in QUANTIZATIONS:
        raise InputError(f"unknown weight format {label(names, 'quantize')} {quantize!r}; valid: "
                         f"{', '.join(QUANTIZATIONS)}, auto")
    problem = check_quantization(quantize)
    if problem:
        raise InputError(problem)
    return quantize


def check_attention_backend(name: str | None, names: dict | None = None) -> str | None:
    """A diffusers attention backend name (``transformer.set_attention_backend``), or None for PyTorch's default;
    whether its package is installed is checked when the model loads."""
    if name in (None, "", "default"):
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName

    valid = [b.value for b in AttentionBackendName]
    if name not in valid:
        raise InputError(f"unknown attention backend {name!r}; valid: default, {', '.join(valid)}")
    return name


def check_loras(specs, names: dict | None = None) -> tuple[Lora, ...]:
    """LoRAs given as ``SOURCE[:SCALE]`` (a LoRA file or folder, or a hub id) or ``{"source", "scale"}``; a local
    path must exist."""
    loras, field = [], label(names, "loras")
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
            raise InputError(f"{field} {spec!r}: give a LoRA file or folder, or a hub id, optionally :SCALE")
        if not (isinstance(scale, (int, float)) and scale == scale and abs(scale) != float("inf")):
            raise InputError(f"{field} {spec!r}: the scale must be a finite number")
        path = Path(source).expanduser()
        if not path.exists() and not HUB_ID.fullmatch(source):
            raise InputError(f"{field} {source!r}: no such file or folder (a hub id looks like owner/name)")
        loras.append(Lora(str(path) if path.exists() else source, float(scale)))
    return tuple(loras)


def plan_memory(mode: str, quantize: str, ref: ModelRef, height: int, width: int, max_sequence_length: int,
                dtype: str, gpus: list[int], images: int) -> MemoryPlan:
    """Resolve memory / quantize ``auto``: the fastest pair that fits this machine's free GPU memory and available
    host memory for the largest group (``characonsist.memory.choose_plan``). A mode or weight format given
    explicitly is kept."""
    gpu_free, host, n_gpus, capability = memory.visible_memory(gpus[0])
    formats = [quantize] if quantize != "auto" else (
        memory.available_quantizations(gpu_free is not None, capability))
    tokens = (height // 16) * (width // 16)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 2)
    modes = None if mode == "auto" else [mode]
    return memory.choose_plan(gpu_free, host, formats, gpus=min(len(gpus), max(n_gpus, 1)),
                              size=memory.model_size(ref.folder), images=images, tokens=tokens,
                              text_len=max_sequence_length, dtype_bytes=dtype_bytes, modes=modes)


def oom_advice(mode: str, gpus, names: dict | None = None) -> str:
    """Which memory modes would fit, from the official FLUX.1-dev measurements and this GPU's size."""
    gpus = list(gpus)
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
            fits.append(f"{setting(names, 'memory', other)} (about {need} GB{' per GPU' if other == 'balanced' else ''})")
    size = f" ({total:.0f} GiB)" if total else ""
    sizes = f"{label(names, 'height')}/{label(names, 'width')}"
    hint = "; ".join(fits) if fits else f"none of the memory modes fits this GPU; use a smaller {sizes}"
    return (f"GPU out of memory in memory mode {mode!r} on GPU {gpus[0]}{size}. Memory modes that would fit: {hint}. "
            f"A smaller {label(names, 'batch_size')} also lowers the peak; {setting(names, 'quantize', 'int8')} or "
            f"nf4 halves or quarters the weights; {setting(names, 'memory', 'auto')} picks a mode that fits "
            "(figures: FLUX.1-dev at 1024x1024).")


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
