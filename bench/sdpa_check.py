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


# ---------------------------------------------------------------------------------------------- plan cost
def plan_shapes(n: int = 10, q_range=(1000, 3500), k_base: int = 4608, k_extra: int = 3000, salt: int = 0):
    """``n`` distinct (query length, key length) pairs spread over the ranges, with odd offsets (``salt``) so
    that no two backends (and no shape the pipeline ran) share one: every pair is new to the process."""
    out = []
    for i in range(n):
        frac = i / max(n - 1, 1)
        out.append((q_range[0] + round(frac * (q_range[1] - q_range[0])) + 7 * salt + 3,
                    k_base + round(frac * k_extra) + 11 * salt + 5))
    return out


def _timed(call, device: str) -> float:
    """Seconds for one call, synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _qkv(sq: int, sk: int, heads: int, head_dim: int, device: str, dtype):
    """FLUX's layout as diffusers passes it: (B, S, H, D) permuted to (B, H, S, D)."""
    q = torch.randn(1, sq, heads, head_dim, device=device, dtype=dtype).permute(0, 2, 1, 3)
    k, v = (torch.randn(1, sk, heads, head_dim, device=device, dtype=dtype).permute(0, 2, 1, 3) for _ in range(2))
    return q, k, v


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def plan_cost(device: str = "cuda", heads: int = 24, head_dim: int = 128, dtype=torch.bfloat16, n_shapes: int = 10,
              reps: int = 5, q_range=(1000, 3500), k_base: int = 4608, k_extra: int = 3000,
              backends=("default", "flash", "cudnn")) -> dict:
    """First call of SDPA on a (query length, key length) shape new to the process against repeats of it.

    For each backend (``default``: whatever ``F.scaled_dot_product_attention`` picks under the process's policy,
    cuDNN on H100; the others forced with ``sdpa_kernel``): one call on an unrelated shape first (library and
    kernel loading, ``init_ms``), then ``n_shapes`` new pairs with both lengths new, then one pair with only the
    key length new and one with only the query length new; each first call and ``reps`` repeats timed with
    synchronisation. ``overhead_ms`` = first - median repeat: the per-shape set-up (cuDNN builds an execution
    plan per shape; flash has none). Batch 1, as the engine's grouped calls.
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    forced = _backends()
    result = {"device": device, "heads": heads, "head_dim": head_dim, "dtype": str(dtype), "reps": reps,
              "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "backends": {}}
    for salt, name in enumerate(backends, start=1):
        entry = {"shapes": []}
        shapes = [(sq, sk, "both new") for sq, sk in plan_shapes(n_shapes, q_range, k_base, k_extra, salt)]
        sq0, sk0 = shapes[0][:2]
        shapes += [(sq0, sk0 + 2 * 13 + salt, "key length new"), (sq0 + 2 * 17 + salt, sk0, "query length new")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([forced[name]]) if name in forced else _null():
                    init = _qkv(max(q_range[0] // 2, 8) + salt, k_base // 2 + salt, heads, head_dim, device, dtype)
                    entry["init_ms"] = _timed(lambda init=init: F.scaled_dot_product_attention(*init), device) * 1e3
                    for sq, sk, kind in shapes:
                        q, k, v = _qkv(sq, sk, heads, head_dim, device, dtype)

                        def call(q=q, k=k, v=v):
                            return F.scaled_dot_product_attention(q, k, v)

                        first = _timed(call, device)
                        repeat = _median([_timed(call, device) for _ in range(reps)])
                        entry["shapes"].append({"sq": sq, "sk": sk, "kind": kind, "first_ms": first * 1e3,
                                                "repeat_ms": repeat * 1e3, "overhead_ms": (first - repeat) * 1e3})
                    if name == "default" and device == "cuda":
                        entry["kernels"] = _default_kernels(call)
            except Exception as exc:  # noqa: BLE001 - a refused backend is a result
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        reasons = sorted({str(w.message)[:300] for w in caught})
        if reasons:
            entry["warnings"] = reasons[:6]
        both = [s for s in entry["shapes"] if s["kind"] == "both new"]
        if both:
            entry["first_ms_median"] = _median([s["first_ms"] for s in both])
            entry["repeat_ms_median"] = _median([s["repeat_ms"] for s in both])
            entry["overhead_ms_mean"] = sum(s["overhead_ms"] for s in both) / len(both)
            entry["overhead_ms_total"] = sum(s["overhead_ms"] for s in both)
        result["backends"][name] = entry
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def mask_check(device: str = "cuda", heads: int = 24, head_dim: int = 128, dtype=torch.bfloat16, sq: int = 2000,
               sk: int = 5000, pad_to: int = 256, reps: int = 5) -> dict:
    """Does cuDNN attention take a key-padding ``attn_mask`` of shape (1, 1, 1, Sk)?

    Keys padded from ``sk`` up to a multiple of ``pad_to``; the mask keeps the real keys (boolean: True = attend;
    float: 0 / -inf). Each of (cuDNN forced, PyTorch's default choice) x (bool, float) is run: whether it ran,
    first-call and median repeat time, and the largest difference from unpadded attention on the real keys
    (default backend), which a correct key-padding mask makes ~0. Unmasked cuDNN on the padded and the real
    shape are timed for scale.
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    cudnn = _backends()["cudnn"]
    padded = -(-sk // pad_to) * pad_to
    q, k, v = _qkv(sq, padded, heads, head_dim, device, dtype)
    reference = F.scaled_dot_product_attention(q, k[:, :, :sk], v[:, :, :sk]).float()
    keep = torch.zeros(1, 1, 1, padded, dtype=torch.bool, device=device)
    keep[..., :sk] = True
    masks = {"bool": keep, "float": torch.zeros(1, 1, 1, padded, dtype=dtype, device=device).masked_fill(
        ~keep, float("-inf"))}
    result = {"sq": sq, "sk": sk, "sk_padded": padded, "mask_shape": [1, 1, 1, padded], "runs": {}}
    runs = [(f"cudnn/{kind}", True, kind) for kind in masks] + [(f"default/{kind}", False, kind) for kind in masks]
    runs += [("cudnn/no-mask-padded", True, None), ("cudnn/no-mask-real", True, "real")]
    for label, force, kind in runs:
        entry = {"ran": False}
        if kind == "real":
            args, mask = (q, k[:, :, :sk].contiguous(), v[:, :, :sk].contiguous()), None
        else:
            args, mask = (q, k, v), masks.get(kind)

        def call(args=args, mask=mask):
            return F.scaled_dot_product_attention(*args, attn_mask=mask)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([cudnn]) if force else _null():
                    entry["first_ms"] = _timed(call, device) * 1e3
                    entry["repeat_ms"] = _median([_timed(call, device) for _ in range(reps)]) * 1e3
                    out = call()
                entry["ran"] = True
                if kind in masks:
                    entry["max_abs_diff"] = float((out.float() - reference).abs().max())
                if not force and device == "cuda":
                    entry["kernels"] = _default_kernels(call)[:3]
            except Exception as exc:  # noqa: BLE001 - a refusal is the answer
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        reasons = sorted({str(w.message)[:300] for w in caught})
        if reasons:
            entry["warnings"] = reasons[:6]
        result["runs"][label] = entry
    return result


def plans_lines(result: dict) -> list[str]:
    """Human-readable lines of a ``plans`` record (``plan_cost`` under ``plan_cost``, ``mask_check`` under ``mask``)."""
    lines = []
    for name, e in result.get("plan_cost", {}).get("backends", {}).items():
        if "error" in e and not e.get("shapes"):
            lines.append(f"    sdpa {name:<8} new shapes: ERROR {e['error'][:120]}")
            continue
        line = f"    sdpa {name:<8} init {e.get('init_ms', 0):7.1f} ms"
        if "first_ms_median" in e:
            line += (f"; new (Sq, Sk): first call {e['first_ms_median']:7.2f} ms (median), repeat "
                     f"{e['repeat_ms_median']:6.2f} ms, set-up {e['overhead_ms_mean']:+7.2f} ms per shape")
        extra = {s["kind"]: s["overhead_ms"] for s in e.get("shapes", []) if s["kind"] != "both new"}
        if extra:
            line += "; " + ", ".join(f"{k} {v:+.2f} ms" for k, v in extra.items())
        if "error" in e:
            line += f"; ERROR {e['error'][:80]}"
        lines.append(line)
    mask = result.get("mask", {})
    for label, e in mask.get("runs", {}).items():
        if e.get("ran"):
            line = f"    mask {label:<20} ran: first {e['first_ms']:7.2f} ms, repeat {e['repeat_ms']:6.2f} ms"
            if "max_abs_diff" in e:
                line += f", max |diff| vs unpadded {e['max_abs_diff']:.3g}"
            if e.get("kernels"):
                line += f"  [{e['kernels'][0][:60]}]"
        else:
            line = f"    mask {label:<20} refused: {e.get('error', '?')[:120]}"
        lines.append(line)
    return lines
