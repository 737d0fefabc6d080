"""Which fused attention kernel PyTorch's SDPA picks for FLUX's shape, and how fast each backend is.

FLUX.1 at 1024x1024 attends over 512 text + 4096 image tokens, 24 heads of 128. The check times every SDPA
backend (default choice, flash, memory-efficient, cuDNN, math) on that shape, laid out as diffusers passes it
(B, S, H, D permuted to B, H, S, D), records why a backend refuses (PyTorch's warnings), and names the kernel
the default choice launches. ``policy`` turns the result into a backend priority for the benchmark: the
default when it already runs a fused kernel, else the fastest fused backend first (math stays last, for the
text encoder's masked attention).
"""

from __future__ import annotations

import time
import warnings

import torch

GIB = 1024**3


def _backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int = 5) -> float:
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def _default_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    names = {}
    for evt in prof.key_averages():
        if "cuda" in str(getattr(evt, "device_type", "")).lower() or evt.key.startswith("aten::_scaled_dot"):
            names[evt.key[:140]] = names.get(evt.key[:140], 0.0) + float(getattr(evt, "self_device_time_total", 0.0))
    return [k for k, _ in sorted(names.items(), key=lambda kv: -kv[1])][:6]


def diagnose(batch: int = 2, tokens: int = 4608, heads: int = 24, head_dim: int = 128, device: str = "cuda") -> dict:
    """Time each SDPA backend on FLUX's attention shape (bf16)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=torch.bfloat16).permute(0, 2, 1, 3)
               for _ in range(3))
    flops = 4 * batch * heads * tokens * tokens * head_dim
    result = {"shape": [batch, heads, tokens, head_dim], "flags": {
        "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_sdp_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
        "math_sdp_enabled": torch.backends.cuda.math_sdp_enabled(),
        "is_flash_attention_available": getattr(torch.backends.cuda, "is_flash_attention_available", lambda: None)(),
    }, "backends": {}}

    def call():
        return F.scaled_dot_product_attention(q, k, v)

    candidates = {"default": None, **_backends()}
    for name, backend in candidates.items():
        entry = {}
        cuda = device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if backend is None:
                    seconds = _time(call)
                    entry["kernels"] = _default_kernels(call)
                else:
                    with sdpa_kernel([backend]):
                        seconds = _time(call)
                entry["ms"] = seconds * 1e3
                entry["tflops"] = flops / seconds / 1e12
                entry["extra_gib"] = ((torch.cuda.max_memory_allocated() - base) / GIB) if cuda else 0.0
            except Exception as exc:  # noqa: BLE001 - a refused backend is a result
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        reasons = sorted({str(w.message)[:300] for w in caught})
        if reasons:
            entry["warnings"] = reasons
        result["backends"][name] = entry
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def policy(diag: dict, mode: str = "auto"):
    """SDPA backend priority for the benchmark (list of SDPBackend), or None to keep PyTorch's default.

    ``auto``: keep the default when it is within 15% of the fastest fused backend; else the fused backends
    fastest first, math last. ``default``: never change. A backend name (``flash``/``efficient``/``cudnn``):
    that one first.
    """
    backends = _backends()
    fused = {n: e["ms"] for n, e in diag["backends"].items() if n in ("flash", "efficient", "cudnn") and "ms" in e}
    if mode == "default" or not fused:
        return None
    order = sorted(fused, key=fused.get)
    if mode in backends:
        order = [mode] + [n for n in order if n != mode]
    else:
        default = diag["backends"].get("default", {}).get("ms")
        if default is not None and default <= 1.15 * fused[order[0]]:
            return None
    return [backends[n] for n in order] + [backends["math"]]


def apply_policy(backends):
    """Enter ``sdpa_kernel(backends)`` for the rest of the process (priority order kept where supported)."""
    from torch.nn.attention import sdpa_kernel

    if backends is None:
        return None
    try:
        ctx = sdpa_kernel(backends, set_priority=True)
    except TypeError:
        ctx = sdpa_kernel(backends)
    ctx.__enter__()
    return ctx


def forward_profile(pipe, size: int = 1024, max_sequence_length: int = 512, top: int = 12) -> dict:
    """One plain FLUX step at batch 1, profiled: the GPU kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        return pipe(prompt=["a photo"], num_inference_steps=1, height=size, width=size, output_type="latent",
                    max_sequence_length=max_sequence_length)

    step()
    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync()
    wall = time.perf_counter() - t0
    rows = []
    for evt in prof.key_averages():
        if "cuda" in str(getattr(evt, "device_type", "")).lower() and not getattr(evt, "is_user_annotation", False):
            rows.append((float(getattr(evt, "self_device_time_total", 0.0)) / 1e3, evt.count, evt.key[:120]))
    rows.sort(reverse=True)
    return {"wall_s": wall, "gpu_ms": sum(r[0] for r in rows),
            "top_kernels": [{"ms": ms, "calls": n, "kernel": k} for ms, n, k in rows[:top]]}
