"""Measuring tools for the GPU benchmark: wall time, transformer time, GPU and host memory peaks, profiler digests.

* ``HostPeak``: peak resident set size over a region, sampled by a thread from ``/proc/self/status`` (VmRSS).
  ``ru_maxrss`` / VmHWM only ever grow over the process, so they cannot separate one run from the next.
* ``TransformerProbe``: hooks on the transformer: number of forwards, batch size of each, time inside each
  (CUDA events, no synchronisation), NaN/inf in any output, and the peak allocated GPU memory seen at the end of
  each forward (the peak of the denoising loop, before the VAE decode).
* ``measure``: one run of a callable with all of the above, errors caught and recorded.
"""

from __future__ import annotations

import gc
import re
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch

GIB = 1024**3


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB; only a fallback


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    """VmHWM: the process's peak RSS so far (monotonic, like ru_maxrss)."""
    return _status_kib("VmHWM") * 1024


class HostPeak:
    """Peak RSS over a ``with`` block, sampled every ``interval`` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


class TransformerProbe:
    """Forward hooks on ``module``: per-forward batch size and duration, non-finite outputs, GPU peak."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.cuda = module, device.type == "cuda"
        self.calls: list[tuple[int, object, object]] = []  # (batch, start, end): CUDA events or perf_counter
        self.denoise_peak = 0
        self._bad = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else -1
        self.calls.append((batch, self._now(), None))

    def _post(self, module, args, kwargs, output):
        batch, start, _ = self.calls[-1]
        self.calls[-1] = (batch, start, self._now())
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if isinstance(sample, torch.Tensor):
            bad = (~torch.isfinite(sample)).sum()
            self._bad = bad if self._bad is None else self._bad + bad
        if self.cuda:
            self.denoise_peak = max(self.denoise_peak, torch.cuda.max_memory_allocated())

    def __enter__(self):
        self._handles = [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.module.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False

    def summary(self) -> dict:
        """Call after synchronising. Seconds inside the transformer, by batch size."""
        by_batch: dict[int, list[float]] = {}
        durations = []
        for batch, start, end in self.calls:
            if end is None:
                continue
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            by_batch.setdefault(batch, []).append(seconds)
            durations.append((batch, seconds))
        return {
            "transformer_calls": sum(len(v) for v in by_batch.values()),
            "transformer_s": sum(sum(v) for v in by_batch.values()),
            "transformer_by_batch": {str(b): {"calls": len(v), "s": sum(v)} for b, v in sorted(by_batch.items())},
            "transformer_call_ms": [round(s * 1e3, 1) for _, s in durations],
            "nonfinite_outputs": int(self._bad.item()) if self._bad is not None else None,
        }


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nonfinite_in(obj) -> int:
    """NaN/inf count in every array or tensor inside a pipeline output (PIL images have none)."""
    if isinstance(obj, torch.Tensor):
        return int((~torch.isfinite(obj.float())).sum())
    if isinstance(obj, np.ndarray):
        return int((~np.isfinite(obj)).sum()) if obj.dtype.kind == "f" else 0
    if isinstance(obj, (list, tuple)):
        return sum(_nonfinite_in(x) for x in obj)
    if hasattr(obj, "__dict__") and not hasattr(obj, "size"):
        return sum(_nonfinite_in(v) for k, v in vars(obj).items() if k in ("images", "identity", "frames"))
    return 0


def measure(name: str, fn: Callable[[], object], transformer: torch.nn.Module, device: torch.device,
            log: Callable[[str], None] = print, **meta) -> dict:
    """Run ``fn()`` once and return its figures; an exception is recorded, not raised."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    record: dict = {"name": name, **meta}
    with HostPeak() as host, TransformerProbe(transformer, device) as probe:
        t0 = time.perf_counter()
        try:
            out = fn()
            sync(device)
            record["wall_s"] = time.perf_counter() - t0
            record["nonfinite_images"] = _nonfinite_in(out)
            for key in ("notes", "settings"):
                if hasattr(out, key):
                    record[key] = getattr(out, key)
            del out
        except Exception as exc:  # noqa: BLE001 - a failed scenario must not end the benchmark
            sync(device)
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            record["traceback"] = traceback.format_exc()[-4000:]
    record.update(probe.summary())
    record["rss_start_gib"] = host.start / GIB
    record["rss_peak_gib"] = host.peak / GIB
    record["vmhwm_gib"] = hwm_bytes() / GIB
    if device.type == "cuda":
        record["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        record["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        record["gpu_denoise_peak_alloc_gib"] = probe.denoise_peak / GIB
    msg = f"[{name}] " + (f"ERROR {record['error']}" if "error" in record else f"{record['wall_s']:.2f} s")
    msg += f", transformer {record['transformer_s']:.2f} s in {record['transformer_calls']} calls"
    if device.type == "cuda":
        msg += (f", GPU peak {record['gpu_peak_alloc_gib']:.2f} GiB alloc / {record['gpu_peak_reserved_gib']:.2f} "
                f"reserved (denoise {record['gpu_denoise_peak_alloc_gib']:.2f})")
    msg += f", RSS {record['rss_start_gib']:.2f} -> peak {record['rss_peak_gib']:.2f} GiB"
    log(msg)
    if "error" in record:
        log(record["traceback"])
    return record


def matmul_rate(device: torch.device, n: int = 8192, warmup: int = 3, reps: int = 10) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s, median of ``reps``) on random data; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / float(np.median(times)) / 1e12


ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa|flex|efficient|triton_tem", re.I)
INTERNAL = ("aten::", "cuda", "void ", "Memcpy", "Memset", "ProfilerStep", "Optimizer", "autograd", "<built-in",
            "Activity Buffer", "Lazy Function", "Torch-Compiled", "Unrecognized")


def _device_us(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile_digest(fn: Callable[[], object], device: torch.device, table_path=None) -> dict:
    """Profile one run: attention kernels (name, calls, GPU ms), user ``record_function`` ranges, GPU total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    host_sync = {evt.key: {"calls": evt.count, "cpu_ms": evt.cpu_time_total / 1e3} for evt in averages
                 if evt.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                                "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")}
    kernels, ranges = [], []
    total_kernel_us = 0.0
    for evt in averages:
        is_device = "cuda" in str(getattr(evt, "device_type", "")).lower()
        if is_device and not getattr(evt, "is_user_annotation", False):
            total_kernel_us += _self_device_us(evt)
            if ATTENTION_KERNEL.search(evt.key):
                kernels.append({"kernel": evt.key[:160], "calls": evt.count, "gpu_ms": _self_device_us(evt) / 1e3})
        elif not evt.key.startswith(INTERNAL) and (getattr(evt, "is_user_annotation", False) or "::" in evt.key
                                                    or "characonsist" in evt.key.lower()):
            ranges.append({"range": evt.key[:120], "calls": evt.count, "cpu_ms": evt.cpu_time_total / 1e3,
                           "gpu_ms": _device_us(evt) / 1e3, "on_device": is_device})
    # aten-level attention ops (which SDPA entry point ran)
    sdpa_ops = [{"op": evt.key, "calls": evt.count, "gpu_ms": _device_us(evt) / 1e3} for evt in averages
                if evt.key.startswith("aten::") and ATTENTION_KERNEL.search(evt.key)]
    if table_path is not None:
        for sort_by in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
            try:
                table = averages.table(sort_by=sort_by, row_limit=80, max_name_column_width=90)
                break
            except Exception:  # noqa: BLE001 - sort key names differ between torch versions
                continue
        with open(table_path, "w") as f:
            f.write(table)
    kernels.sort(key=lambda r: -r["gpu_ms"])
    ranges.sort(key=lambda r: -(r["gpu_ms"] or r["cpu_ms"]))
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms_total": total_kernel_us / 1e3,
            "gpu_busy_frac": total_kernel_us / 1e3 / (wall * 1e3), "attention_kernels": kernels,
            "attention_kernel_ms": sum(k["gpu_ms"] for k in kernels), "sdpa_ops": sdpa_ops,
            "host_api": host_sync, "ranges": ranges[:60]}
