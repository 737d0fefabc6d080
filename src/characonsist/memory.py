"""Fitting FLUX on the GPUs people have: weight formats, offload modes, VAE tiling, and ``memory="auto"``.

Everything here is diffusers' own machinery; the engine needs to know none of it, because its attention processors
call the layers' own linears (quantized, offloaded or carrying a LoRA) exactly as diffusers' processors do:

* weight formats (``QUANTIZATIONS``): torchao int8 weight-only and float8, bitsandbytes NF4 and LLM.int8, all
  through ``PipelineQuantizationConfig`` passed to ``from_pretrained`` (``quantization_config``), on the transformer
  and the T5 encoder (the two large models); ``fp8-storage`` is ``enable_layerwise_casting`` (weights stored in
  float8, each layer cast to the compute dtype when it runs).
* memory modes (``MODES``): one GPU, ``enable_model_cpu_offload``, ``enable_group_offload`` (block level, CUDA
  streams), ``enable_sequential_cpu_offload``, ``device_map="balanced"``.
* ``choose_plan``: the fastest (weight format, memory mode) that fits the GPU's free memory and the host's available
  memory, from ``estimate_needs`` (figures measured in BENCHMARKS.md where there are any, else estimates scaled from
  them; each result says which).

``load_pipeline`` loads a pipeline with all of it; ``characonsist.app.model`` calls it for the command line.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ._compat import dtype_kwarg

GIB = 1024**3


@dataclass(frozen=True)
class Quantization:
    """A weight format: how the transformer's and the T5 encoder's weights are stored."""

    name: str
    help: str
    backend: str | None          # "torchao" | "bitsandbytes" | "layerwise-casting" | None
    bytes_per_param: float | None  # stored bytes per weight (None: the dtype's)
    needs_cuda: bool = False
    min_capability: tuple[int, int] | None = None   # CUDA compute capability it needs


QUANTIZATIONS: dict[str, Quantization] = {q.name: q for q in [
    Quantization("none", "weights in --dtype", None, None),
    Quantization("int8", "torchao int8 weight-only: half the weight memory of bf16, any GPU (CPU too)", "torchao", 1.0),
    Quantization("fp8", "torchao float8 weights and activations (fp8 matmuls): half the memory, GPUs of compute "
                 "capability >= 8.9 (Ada, Hopper)", "torchao", 1.0, needs_cuda=True, min_capability=(8, 9)),
    Quantization("nf4", "bitsandbytes 4-bit NF4: about 0.28x the weight memory of bf16; CUDA only", "bitsandbytes",
                 0.5625, needs_cuda=True),
    Quantization("int8-bnb", "bitsandbytes LLM.int8: half the memory; CUDA only", "bitsandbytes", 1.0,
                 needs_cuda=True),
    Quantization("fp8-storage", "enable_layerwise_casting: weights stored in float8, computed in --dtype", "layerwise",
                 1.0),
]}

# The components a weight format applies to: FLUX's two large models (CLIP-L and the VAE stay in --dtype).
QUANTIZED_COMPONENTS = ("transformer", "text_encoder_2")


def quantized_components(model_index: dict | None) -> tuple[str, ...]:
    """The components a weight format applies to in a pipeline of this ``model_index.json``: the transformer and
    the large text encoder, which is FLUX.1's ``text_encoder_2`` (T5-XXL; its CLIP-L ``text_encoder`` stays) or the
    only ``text_encoder`` of Chroma (T5-XXL) and FLUX.2 [klein] (Qwen3, as large as its transformer)."""
    if not model_index or "text_encoder_2" in model_index:
        return QUANTIZED_COMPONENTS
    return ("transformer", "text_encoder") if "text_encoder" in model_index else ("transformer",)


def read_model_index(name: str) -> dict | None:
    """A pipeline's ``model_index.json``: from a local folder, else from the hub (or its cache); None if neither."""
    path = Path(str(name)) / "model_index.json"
    try:
        if not path.parent.is_dir():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(name), "model_index.json"))
        data = json.loads(path.read_text())
    except Exception:  # the default (FLUX.1's components) is used when it cannot be had
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Mode:
    """A memory mode: where the weights live while the story runs."""

    name: str
    help: str
    needs_cuda: bool = True
    min_gpus: int = 1


MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("none", "the whole pipeline on one GPU (or the CPU)", needs_cuda=False),
    Mode("model-offload", "enable_model_cpu_offload: one model at a time on the GPU"),
    Mode("group-offload", "enable_group_offload: transformer blocks streamed from the host on a CUDA stream"),
    Mode("balanced", 'device_map="balanced": the models spread over the GPUs in --gpu-ids', min_gpus=2),
    Mode("sequential-offload", "enable_sequential_cpu_offload: one layer at a time on the GPU (slow)"),
]}
MEMORY_ALIASES = {"0": "none", "1": "model-offload", "2": "balanced", "3": "sequential-offload"}  # official init_mode

# ------------------------------------------------------------------------------------------------ figures

# FLUX.1-dev's parameter counts (bench/random_flux.py builds the architecture; BENCHMARKS.md lists them).
FLUX_DEV_PARAMS = {"transformer": 11.90e9, "text_encoder_2": 4.76e9, "text_encoder": 0.123e9, "vae": 0.084e9}
FLUX_DEV_WIDTH = 3072   # the transformer's hidden width (24 heads x 128)

# Measured on one H100 (BENCHMARKS.md, "Memory modes", engine 59266a1 and the final engine b2e16b8; FLUX.1-dev
# architecture in bf16, identity + 4 frames at 1024x1024, the VAE decoding one image at a time):
MEASURED_ACTIVATION_GIB = 34.39 - 31.46    # one-GPU peak allocated minus the weights: 5 images x (4096 + 512) tokens
MEASURED_ACTIVATION_TOKENS = 5 * (4096 + 512)
MEASURED_HOST_BASE_GIB = 2.43              # peak RSS of the one-GPU run (weights on the GPU)
GPU_CONTEXT_GIB = 0.6                      # CUDA context and allocator slack outside max_memory_allocated: estimate
RESERVED_OVER_ALLOCATED = 1.10             # reserved / allocated, measured 37.93 / 34.39

# Wall time relative to bf16 on one GPU (CharaConsist's defaults, identity + 4 frames). Measured where ``MEASURED``
# holds the mode (below); the rest are estimates.
SPEED = {
    "mode": {"none": (1.0, "measured"), "balanced": (1.1, "estimate"), "group-offload": (1.29, "measured"),
             "model-offload": (1.19, "measured"), "sequential-offload": (5.1, "measured")},
    "quantize": {"none": (1.0, "measured"), "fp8": (0.95, "estimate"), "fp8-storage": (1.05, "estimate"),
                 "int8": (1.19, "measured"), "nf4": (1.3, "estimate"), "int8-bnb": (2.0, "estimate")},
}


@dataclass(frozen=True)
class Measured:
    """One (weight format, memory mode) measured on the GPU: FLUX.1-dev's architecture, CharaConsist's defaults,
    identity + 4 frames at 1024x1024 in one lockstep batch (5 x (4096 + 512) tokens), 50 steps. GiB; ``speed`` is
    the story's wall time over the bf16 one-GPU story's."""

    gpu_gib: float        # peak allocated, plain FluxPipeline and ours in the same process (the larger)
    reserved_gib: float   # peak reserved, the same
    host_gib: float       # peak RSS of the process, loading included (VmHWM)
    speed: float
    source: str
    speed_measured: bool = True   # False: the memory was measured, the speed is the SPEED table's estimate


# BENCHMARKS.md, "Memory modes measured": one H100 80GB, 2026-12-06, engine e113a73, weights loaded through
# ``load_pipeline`` from a saved random FLUX.1-dev folder; speed = ours / ours in bf16 on one GPU (60.01 s, same
# machine, same hour). The bf16 offload rows are the first session's (2026-11-22, engine 59266a1, a few steps).
_H100 = "H100, 2026-12-06, BENCHMARKS.md"
MEASURED: dict[tuple[str, str], Measured] = {
    ("none", "none"): Measured(34.39, 37.93, 2.43, 1.0, _H100),
    ("int8", "none"): Measured(19.01, 22.47, 10.49, 1.188, _H100),
    ("int8", "model-offload"): Measured(14.14, 16.83, 25.93, 1.414, _H100),
    ("nf4", "model-offload"): Measured(9.27, 11.80, 19.63, 1.118, _H100),
    ("none", "group-offload"): Measured(9.91, 16.17, 58.38, 1.293, _H100),
    ("none", "model-offload"): Measured(25.13, 27.35, 33.5, 1.3, "H100, 2026-11-22, BENCHMARKS.md",
                                        speed_measured=False),
    ("none", "sequential-offload"): Measured(2.72, 3.82, 33.6, 5.1, "H100, 2026-11-22, BENCHMARKS.md"),
}


@dataclass
class ModelSize:
    """Parameters per component (``transformer``, ``text_encoder_2``, ...) and the transformer's hidden width."""

    params: dict[str, float]
    width: int = FLUX_DEV_WIDTH
    largest_block: dict[str, float] = field(default_factory=dict)   # params of the largest repeated block
    source: str = "FLUX.1-dev's parameter counts"
    quantized: tuple[str, ...] = QUANTIZED_COMPONENTS   # the components a weight format applies to


def flux_dev_size() -> ModelSize:
    # the largest repeated blocks: a FLUX double block (~340 M parameters), a T5-XXL block (~193 M)
    return ModelSize(dict(FLUX_DEV_PARAMS), FLUX_DEV_WIDTH, {"transformer": 0.34e9, "text_encoder_2": 0.193e9})


def _safetensors_params(path: Path) -> tuple[int, dict[str, int]]:
    """Parameters in a safetensors file, from its header only (no weights read); and per top-level block prefix."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total, blocks = 0, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in entry["shape"]:
            n *= dim
        total += n
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):   # "transformer_blocks.3.attn..." -> "transformer_blocks.3"
            if part.isdigit():
                key = ".".join(parts[:i + 1])
                blocks[key] = blocks.get(key, 0) + n
                break
    return total, blocks


def model_size(folder: str | Path | None) -> ModelSize:
    """Parameter counts of a local diffusers folder from its safetensors headers; FLUX.1-dev's when there is no
    folder (a hub id not downloaded) or it holds no safetensors."""
    if folder is None or not Path(folder).is_dir():
        return flux_dev_size()
    params, largest = {}, {}
    for component in FLUX_DEV_PARAMS:
        files = sorted((Path(folder) / component).glob("*.safetensors"))
        if not files:
            continue
        total, blocks = 0, {}
        for path in files:
            n, b = _safetensors_params(path)
            total += n
            blocks.update({k: blocks.get(k, 0) + v for k, v in b.items()})
        params[component] = float(total)
        largest[component] = float(max(blocks.values(), default=0))
    if "transformer" not in params:
        return flux_dev_size()
    width = FLUX_DEV_WIDTH
    config = Path(folder) / "transformer" / "config.json"
    try:
        cfg = json.loads(config.read_text())
        width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ModelSize(params, width, largest, source=f"parameter counts of {folder}",
                     quantized=quantized_components(read_model_index(str(folder))))


@dataclass
class Needs:
    """Estimated peak memory of one story run in a (weight format, memory mode), GiB; ``basis`` says how."""

    gpu_gib: float            # peak allocated per GPU
    gpu_reserved_gib: float   # what the GPU must have free (reserved + CUDA context)
    host_gib: float           # peak host RSS
    speed: float              # wall time relative to bf16 on one GPU
    basis: str
    measured: bool = False    # the memory figures are a GPU measurement of this (format, mode) (``MEASURED``)


def _bytes(component: str, quantize: str, dtype_bytes: float, quantized=QUANTIZED_COMPONENTS) -> float:
    q = QUANTIZATIONS[quantize]
    if component in quantized and q.bytes_per_param is not None:
        return q.bytes_per_param
    return dtype_bytes


def _model_estimate(mode: str, quantize: str, size: ModelSize, images: int, tokens: int, text_len: int,
                    dtype_bytes: float, gpus: int) -> tuple[float, float]:
    """(peak allocated GiB, peak host GiB) from the model alone: weights at their format's bytes per parameter,
    activations scaled from the one-GPU bf16 measurement by the batch's tokens and the transformer's width."""
    weights = {c: n * _bytes(c, quantize, dtype_bytes, size.quantized) / GIB for c, n in size.params.items()}
    total = sum(weights.values())
    act = _activations(size, images, tokens, text_len, dtype_bytes)
    blocks = max((n * _bytes(c, quantize, dtype_bytes, size.quantized) / GIB for c, n in size.largest_block.items()),
                 default=0.0)
    if mode == "none":
        gpu, held = total + act, 0.0
    elif mode == "model-offload":
        gpu, held = max(weights.values()) + act, total
    elif mode == "balanced":
        gpu, held = max(max(weights.values()), total / max(gpus, 1)) + act, 0.0
    elif mode == "group-offload":   # two groups of one block resident (the stream prefetches the next)
        gpu, held = 2 * blocks + 0.25 + act, total
    elif mode == "sequential-offload":
        gpu, held = blocks + act, total
    else:
        raise ValueError(f"unknown memory mode {mode!r}; valid: {', '.join(MODES)}")
    return gpu, MEASURED_HOST_BASE_GIB + held   # model offload measured 33.5 GiB: 31.46 GiB of weights + 2.0


def _activations(size: ModelSize, images: int, tokens: int, text_len: int, dtype_bytes: float) -> float:
    return (MEASURED_ACTIVATION_GIB * images * (tokens + text_len) / MEASURED_ACTIVATION_TOKENS
            * size.width / FLUX_DEV_WIDTH * dtype_bytes / 2.0)


def _is_flux_dev(size: ModelSize) -> bool:
    return (size.width == FLUX_DEV_WIDTH and "transformer" in size.params
            and abs(size.params["transformer"] / FLUX_DEV_PARAMS["transformer"] - 1) < 0.02)


def estimate_needs(mode: str, quantize: str = "none", size: ModelSize | None = None, images: int = 5,
                   tokens: int = 4096, text_len: int = 512, dtype_bytes: float = 2.0, gpus: int = 1) -> Needs:
    """Peak GPU and host memory and relative speed of a story of ``images`` images (identity included) of ``tokens``
    image tokens each (1024x1024: 4096).

    Three kinds of figure, each result's ``basis`` says which:

    * **measured**: FLUX.1-dev's architecture in bf16 (or the format), a (format, mode) of ``MEASURED``: the GPU
      measurement itself, its activations moved by the difference in tokens when the story is not identity + 4 frames
      at 1024x1024.
    * **calibrated**: another format in a mode that was measured: the model's estimate times the largest
      measured-over-estimated ratio of that mode (the estimates were low by up to 3x for group offload, whose
      streamed groups and pinned host copies the model does not count).
    * **estimate**: the model alone (other models' sizes, unmeasured modes).
    """
    size = size or flux_dev_size()
    if mode not in MODES:
        raise ValueError(f"unknown memory mode {mode!r}; valid: {', '.join(MODES)}")
    gpu, host = _model_estimate(mode, quantize, size, images, tokens, text_len, dtype_bytes, gpus)
    speed_mode, how_mode = SPEED["mode"][mode]
    speed_q, how_q = SPEED["quantize"][quantize]
    speed, speed_basis = speed_mode * speed_q, "estimate"
    reserved = gpu * RESERVED_OVER_ALLOCATED
    flux_dev = _is_flux_dev(size) and dtype_bytes == 2.0
    measured = MEASURED.get((quantize, mode)) if flux_dev else None
    if measured is not None:
        extra = _activations(size, images, tokens, text_len, dtype_bytes) - MEASURED_ACTIVATION_GIB
        gpu, host, speed = measured.gpu_gib + extra, measured.host_gib, measured.speed
        reserved = measured.reserved_gib + extra * RESERVED_OVER_ALLOCATED
        basis = f"memory measured ({measured.source})"
        speed_basis = "measured" if measured.speed_measured else "estimate"
    else:
        ratios = [(m.reserved_gib / (est[0] * RESERVED_OVER_ALLOCATED), m.host_gib / est[1])
                  for (q, md), m in MEASURED.items() if md == mode and flux_dev
                  for est in [_model_estimate(md, q, size, 5, 4096, 512, 2.0, gpus)]]
        if ratios:
            gpu_ratio = max(1.0, max(r[0] for r in ratios))
            host_ratio = max(1.0, max(r[1] for r in ratios))
            reserved, host = reserved * gpu_ratio, host * host_ratio
            gpu *= gpu_ratio
            basis = f"memory estimate calibrated on the measured {mode} entries (BENCHMARKS.md, {size.source})"
        else:
            basis = f"memory estimate (BENCHMARKS.md, {size.source})"
        if how_mode == how_q == "measured":
            speed_basis = "from measured factors"
    return Needs(gpu, reserved + GPU_CONTEXT_GIB, host, speed, f"{basis}; speed {speed_basis}",
                 measured=measured is not None)


@dataclass
class MemoryPlan:
    """A (weight format, memory mode) and why it was chosen."""

    quantize: str
    memory: str
    needs: Needs | None = None
    reason: str = ""
    vae_tiling: bool = False

    def describe(self) -> str:
        return f"--quantize {self.quantize} --memory {self.memory}" + (f": {self.reason}" if self.reason else "")


def available_quantizations(cuda: bool, capability: tuple[int, int] | None = None) -> list[str]:
    """Weight formats usable here: their package importable, CUDA present where they need it."""

    found = []
    for q in QUANTIZATIONS.values():
        if q.needs_cuda and not cuda:
            continue
        if q.min_capability and (capability is None or capability < q.min_capability):
            continue
        if q.backend in ("torchao", "bitsandbytes") and importlib.util.find_spec(q.backend) is None:
            continue
        found.append(q.name)
    return found


def choose_plan(gpu_free_gib: float | None, host_gib: float, quantizations: list[str], gpus: int = 1,
                size: ModelSize | None = None, images: int = 5, tokens: int = 4096, text_len: int = 512,
                dtype_bytes: float = 2.0, margin_gib: float = 0.5, modes: list[str] | None = None,
                keep_weights_within: float = 1.5) -> MemoryPlan:
    """The fastest (weight format, memory mode) whose needs fit ``gpu_free_gib`` (None: no GPU, the CPU
    runs everything in mode ``none``) and ``host_gib``, among ``quantizations`` (e.g. ``["none"]`` to keep the
    weights as they are) and ``modes`` (default: all that ``gpus`` GPUs allow). Plans whose memory was measured
    (``MEASURED``) come first: an estimated plan is chosen only when no measured one fits, since the estimates were
    off by up to 3x where they could be checked. Ties go to the one needing less GPU memory. The weights stay as
    they are (``none``, when offered) if a mode fits them at most ``keep_weights_within`` times slower than the
    fastest plan that fits: another format changes the images. When nothing fits, the one needing the least GPU
    memory, with a reason that says so."""
    if not quantizations:
        raise ValueError("no weight format to choose from")
    if gpu_free_gib is None:
        q = "none" if "none" in quantizations else quantizations[0]
        return MemoryPlan(q, "none", None, "no CUDA GPU: everything on the CPU")
    candidates = []
    for q in quantizations:
        for m, mode in MODES.items():
            if mode.min_gpus > gpus or (modes is not None and m not in modes):
                continue
            needs = estimate_needs(m, q, size, images, tokens, text_len, dtype_bytes, gpus)
            candidates.append((needs.speed, needs.gpu_reserved_gib, q, m, needs))
    candidates.sort(key=lambda c: (c[0], c[1]))
    budget = f"{gpu_free_gib:.1f} GiB free on the GPU, {host_gib:.1f} GiB host memory available"
    fits = [c for c in candidates
            if c[4].gpu_reserved_gib + margin_gib <= gpu_free_gib and c[4].host_gib + margin_gib <= host_gib]
    fits = [c for c in fits if c[4].measured] or fits
    if fits:
        speed, _, q, m, needs = fits[0]
        kept = next((c for c in fits if c[2] == "none"), None)
        what = "the fastest that fits"
        if q != "none" and kept is not None and kept[0] <= keep_weights_within * speed:
            speed, _, q, m, needs = kept
            what = f"the fastest that fits with the weights as they are (within {keep_weights_within}x of the fastest)"
        faster = [f"{cq}/{cm}" for s, _, cq, cm, _ in candidates if s < speed and (cq, cm) != (q, m)][:3]
        why = (f"{what} ({budget}; needs about {needs.gpu_reserved_gib:.1f} GiB GPU, {needs.host_gib:.1f} GiB host, "
               f"{needs.speed:.2f}x the time of one GPU in bf16; {needs.basis})")
        if faster:
            why += f"; faster: {', '.join(faster)}"
        return MemoryPlan(q, m, needs, why)
    smallest = min(candidates, key=lambda c: (c[4].gpu_reserved_gib, c[0]))
    return MemoryPlan(smallest[2], smallest[3], smallest[4],
                      f"nothing fits ({budget}); the smallest needs about {smallest[4].gpu_reserved_gib:.1f} GiB GPU "
                      f"and {smallest[4].host_gib:.1f} GiB host: it may run out of memory; try smaller images or "
                      "--batch-size 2")


def visible_memory(gpu: int = 0) -> tuple[float | None, float, int, tuple[int, int] | None]:
    """(free GiB on ``gpu`` or None without CUDA, available host GiB, visible GPUs, compute capability)."""
    import psutil
    import torch

    host = psutil.virtual_memory().available / GIB
    if not torch.cuda.is_available():
        return None, host, 0, None
    free, _ = torch.cuda.mem_get_info(gpu)
    return free / GIB, host, torch.cuda.device_count(), torch.cuda.get_device_capability(gpu)


# ------------------------------------------------------------------------------------------------ loading

def check_quantization(quantize: str, cuda: bool | None = None) -> str | None:
    """A problem with using weight format ``quantize`` here (unknown name, package missing, no CUDA), or None."""

    if quantize not in QUANTIZATIONS:
        return f"unknown weight format {quantize!r}; valid: {', '.join(QUANTIZATIONS)}, auto"
    q = QUANTIZATIONS[quantize]
    if q.needs_cuda:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            return f"--quantize {quantize} needs a CUDA GPU ({q.backend}); on the CPU use int8 or fp8-storage"
    if q.backend in ("torchao", "bitsandbytes") and importlib.util.find_spec(q.backend) is None:
        return f"--quantize {quantize} needs the {q.backend} package: pip install {q.backend}"
    return None


def quantization_config(quantize: str, dtype, components=QUANTIZED_COMPONENTS):
    """diffusers' ``PipelineQuantizationConfig`` for a weight format (None for ``none`` and ``fp8-storage``, which is
    applied after loading). Each component gets its own library's config class (diffusers for the transformer,
    transformers for the text encoder); ``components``: ``quantized_components`` of the model."""
    q = QUANTIZATIONS[quantize]
    if q.backend not in ("torchao", "bitsandbytes"):
        return None
    from diffusers import PipelineQuantizationConfig

    mapping = {}
    for component in components:
        if component == "transformer":
            import diffusers as lib
        else:
            import transformers as lib
        if q.backend == "torchao":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig

            ao = Int8WeightOnlyConfig() if quantize == "int8" else Float8DynamicActivationFloat8WeightConfig()
            mapping[component] = lib.TorchAoConfig(ao)
        elif quantize == "nf4":
            mapping[component] = lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=dtype)
        else:
            mapping[component] = lib.BitsAndBytesConfig(load_in_8bit=True)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def enable_fp8_storage(pipe, dtype, components=QUANTIZED_COMPONENTS) -> None:
    """``fp8-storage``: diffusers' layerwise casting on the large models (weights stored in float8_e4m3fn, each layer
    cast to ``dtype`` while it runs); norms, embeddings and the input/output projections stay in ``dtype``
    (diffusers' default skip list; in T5 also the embeddings and the feed-forward output ``wo``, whose input T5
    casts to the stored weight's dtype; in a causal LM its output head ``lm_head``, which klein never calls and which
    may share its weight with the token embedding (a config with ``tie_word_embeddings``))."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    for name in components:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if hasattr(module, "enable_layerwise_casting"):
            module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        else:
            apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                    skip_modules_pattern=("norm", "relative_attention_bias", "shared", "embed", r"\.wo$",
                                                          "lm_head"),
                                    skip_modules_classes=(torch.nn.Embedding,))


def apply_memory_mode(pipe, memory: str, device, gpus: list[int] | None = None) -> None:
    """Put a loaded pipeline in a memory mode (``balanced`` is chosen at load time: ``load_pipeline``)."""
    import torch

    gpu = (torch.device(device).index or 0) if torch.device(device).type == "cuda" else None
    if memory != "none" and getattr(pipe, "hf_device_map", None) is not None:
        # loaded straight onto the GPU (device_map="cuda"; quantizers work there): the hooks take over. Model offload
        # moves the models to the host itself; group and sequential offload expect them there. ``pipe.to`` (unlike
        # ``reset_device_map``) leaves bitsandbytes 8-bit models, which cannot move, where they are.
        pipe.hf_device_map = None
        if memory in ("group-offload", "sequential-offload"):
            pipe.to("cpu")
    if memory == "none":
        if getattr(pipe, "hf_device_map", None) is None:
            pipe.to(device)
    elif memory == "model-offload":   # without a GPU: diffusers' hooks from the CPU to the CPU (how tests run them)
        pipe.enable_model_cpu_offload(**({"gpu_id": gpu} if gpu is not None else {"device": torch.device(device)}))
    elif memory == "sequential-offload":
        pipe.enable_sequential_cpu_offload(gpu_id=gpu)
    elif memory == "group-offload":
        cuda = torch.device(device).type == "cuda"
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1, use_stream=cuda)
    elif memory != "balanced":
        raise ValueError(f"unknown memory mode {memory!r}; valid: {', '.join(MODES)}")
    if memory != "none":   # decode one image at a time: the same images, a smaller peak
        pipe.vae.enable_slicing()


def load_pipeline(cls, name: str, dtype, quantize: str = "none", memory: str = "none", gpus: list[int] | None = None,
                  vae_tiling: bool = False, loras=(), attention_backend: str | None = None, compile: bool = False,
                  **kwargs):
    """``cls.from_pretrained`` in a weight format and memory mode, with LoRAs, an attention backend and compiled
    blocks.

    The weights load straight onto the GPU (``device_map``) where the mode keeps them there, or where they are
    quantized (torchao and bitsandbytes quantize where they load) and the quantized pipeline fits the GPU's free
    memory; offload modes then move them to the host. ``loras``: ``{"source", "scale"}`` dicts (or sources), loaded
    with ``load_lora_weights`` before any offload hook. ``vae_tiling``: ``vae.enable_tiling()`` (decodes in tiles;
    the images change slightly at the tile seams). ``compile``: ``compile_pipeline`` (regional compilation).
    """
    import torch


    gpus = list(gpus or [0])
    cuda = torch.cuda.is_available()
    device = f"cuda:{gpus[0]}" if cuda else "cpu"
    components = quantized_components(read_model_index(name)) if quantize != "none" else QUANTIZED_COMPONENTS
    config = quantization_config(quantize, dtype, components)
    if config is not None:
        kwargs["quantization_config"] = config
    if memory == "balanced":
        free = {g: f"{int(torch.cuda.get_device_properties(g).total_memory * 0.9 / GIB)}GiB" for g in gpus}
        kwargs.update(device_map="balanced", max_memory=free)
    elif cuda and (memory == "none" or config is not None):
        free, _ = torch.cuda.mem_get_info(gpus[0])
        need = estimate_needs("none", quantize, model_size(name if Path(str(name)).is_dir() else None),
                              images=0, dtype_bytes=torch.empty((), dtype=dtype).element_size()).gpu_gib
        if memory == "none" or need * RESERVED_OVER_ALLOCATED + GPU_CONTEXT_GIB <= free / GIB:
            torch.cuda.set_device(gpus[0])
            kwargs["device_map"] = "cuda"
    pipe = cls.from_pretrained(name, **dtype_kwarg(dtype), **kwargs)
    if quantize == "fp8-storage":
        enable_fp8_storage(pipe, dtype, components)
    load_loras(pipe, loras)
    apply_memory_mode(pipe, memory, device, gpus)
    if quantize != "none":   # memory is short: decode one image at a time (the same images, a smaller peak)
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if attention_backend:
        pipe.transformer.set_attention_backend(attention_backend)
    if compile:
        compile_pipeline(pipe)
    return pipe


def load_loras(pipe, loras) -> list[str]:
    """``pipe.load_lora_weights`` for each LoRA (a file, a folder or a hub id; or ``{"source", "scale"}``), all active
    at their scales (``set_adapters``). Returns the adapter names."""
    names, scales = [], []
    for i, lora in enumerate(loras or ()):
        source, scale = (lora["source"], lora.get("scale", 1.0)) if isinstance(lora, dict) else (lora, 1.0)
        path = Path(str(source))
        name = f"lora_{i}"
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        else:
            pipe.load_lora_weights(str(source), adapter_name=name)
        names.append(name)
        scales.append(float(scale))
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return names


def compile_pipeline(pipe, **kwargs) -> None:
    """Regional compilation: ``transformer.compile_repeated_blocks(**kwargs)`` (each FLUX block type compiled once
    and reused by every block of that type; diffusers >= 0.35), else ``torch.compile`` of each block.

    The engine's processors leave the method's attention out of the graph (``backbones.flux1.FluxLayerProcessor``), so
    ``fullgraph=True`` cannot be used with a consistency method; plain FLUX (``method="vanilla"`` excepted, which
    also goes through the engine) can."""
    transformer = pipe.transformer
    if hasattr(transformer, "compile_repeated_blocks") and getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**kwargs)
        return
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.compile(**kwargs)


def settings(pipe) -> dict:
    """What a loaded pipeline runs with, for a manifest: weight formats per component, offload hooks, attention
    backend, compiled blocks, LoRA adapters (read from the modules, not from what was asked)."""
    out: dict = {}
    formats = {}
    for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        config = getattr(module, "config", None)
        qc = getattr(config, "quantization_config", None) if config is not None else None
        if qc is None and hasattr(module, "hf_quantizer"):
            qc = getattr(module.hf_quantizer, "quantization_config", None)
        if qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
            formats[name] = str(getattr(method, "value", method))
        params = list(module.parameters())
        if params:
            formats.setdefault(name, str(params[0].dtype).replace("torch.", ""))
    out["weights"] = formats
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        procs = getattr(transformer, "attn_processors", {})
        backend = next((getattr(p, "_attention_backend", None) for p in procs.values()), None)
        out["attention_backend"] = str(getattr(backend, "value", backend)) if backend is not None else "default"
        adapters = []
        if hasattr(transformer, "peft_config"):
            adapters = sorted(transformer.peft_config)
        out["lora_adapters"] = adapters
    return out
