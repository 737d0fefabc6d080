"""The memory-mode table: weight format x memory mode -> peak GPU allocated / reserved, peak host RSS,
wall time, ratio to plain FluxPipeline in the same mode and process (``gpu_bench.py --phases table``).

A random full-size FLUX.1-dev pipeline is saved once per machine as a diffusers folder (``--checkpoint``; about
31.5 GiB in bf16, ``checkpoint`` entry), so every mode loads it through the real loading code
(``characonsist.memory.load_pipeline``: ``from_pretrained`` with the mode's ``quantization_config``, then the
offload hooks). Each entry runs in its own process, so its host RSS and GPU peaks are its own:

* load: seconds, peak RSS while loading, GPU allocated after loading, the weight format per component as loaded;
* ``baseline``: plain ``FluxPipeline`` over the same modules (same hooks, same quantized linears) generating the
  identity + N frames as one batch, after a 1-step warm-up;
* ``ours``: ``CharaConsistPipeline`` with CharaConsist's defaults on the same story and seed, after a warm-up call
  (pre-run, masks, matches) and a 1-step warm-up; its ratios to the baseline (``workload.comparison``).

Entries are ``QUANTIZE/MEMORY[+compile][@N]`` (``characonsist.memory``: QUANTIZATIONS x MODES; ``@N`` frames,
default ``--frames``' first). ``+compile``: plain FluxPipeline uncompiled first (``baseline-eager``), then
``compile_repeated_blocks`` on the shared transformer, then baseline and ours compiled; ours is also compared to
the uncompiled baseline. ``sequential-offload`` runs ``--seq-steps`` steps (it is slow); every record has its steps.

Entries run in order on the GPUs of ``--table-gpus`` (one process per GPU at a time, ``CUDA_VISIBLE_DEVICES``);
an entry that would end past ``--budget-s`` by the estimate (``estimate_s``, corrected by the entries measured so
far) is skipped and recorded as such; a child past its time is killed and recorded.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import GIB, HostPeak, measure, sync  # noqa: E402
from workload import SEED, comparison, full_prompt, story  # noqa: E402

# Seconds an entry takes on one H200 at 1024x1024, 50 steps, identity + 4 frames (estimates: about 0.85 s per
# forward of 5 images in bf16, 118 forwards with warm-ups, plus loading), before the speed factors of
# characonsist.memory.SPEED; corrected by the entries measured in the same table.
BASE_ESTIMATE_S = 150.0
COMPILE_EXTRA_S = 150.0
LOAD_S = 30.0


def parse_entry(entry: str, default_frames: int) -> dict:
    """``int8/model-offload+compile@8`` -> {quantize, memory, compile, frames, name}."""
    from characonsist.memory import MODES, QUANTIZATIONS

    body, _, frames = entry.partition("@")
    body, plus, flag = body.partition("+")
    quantize, slash, memory = body.partition("/")
    if not slash or quantize not in QUANTIZATIONS or memory not in MODES or (plus and flag != "compile"):
        raise ValueError(f"table entry {entry!r}: expected QUANTIZE/MEMORY[+compile][@N] with QUANTIZE in "
                         f"{', '.join(QUANTIZATIONS)} and MEMORY in {', '.join(MODES)}")
    return {"name": entry, "quantize": quantize, "memory": memory, "compile": bool(plus),
            "frames": int(frames) if frames else default_frames}


def estimate_s(entry: dict, tiny: bool, correction: float = 1.0) -> float:
    """Seconds the entry should take (its process, loading included)."""
    from characonsist.memory import SPEED

    if tiny:
        return 30.0 * correction
    speed = SPEED["mode"][entry["memory"]][0] * SPEED["quantize"][entry["quantize"]][0]
    if entry["memory"] == "sequential-offload":
        speed *= 0.2   # --seq-steps steps, not 50
    run = BASE_ESTIMATE_S * speed * (entry["frames"] + 1) / 5
    return (LOAD_S + run + (COMPILE_EXTRA_S + run / 3 if entry["compile"] else 0.0)) * correction


# ------------------------------------------------------------------ the checkpoint (its own process)

def build_checkpoint(args) -> dict:
    """Random FLUX.1-dev (or tiny) pipeline saved as a diffusers folder at ``args.checkpoint``, if not there."""
    from random_flux import build_random_flux

    folder = Path(args.checkpoint)
    if (folder / "model_index.json").is_file():
        return {"name": "checkpoint", "reused": True, "path": str(folder)}
    t0 = time.perf_counter()
    device = torch.device(args.device)
    pipe = build_random_flux("tiny" if args.tiny else "full", device, dtype=args.dtype)
    sync(device)
    built = time.perf_counter() - t0
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"name": "checkpoint", "path": str(folder), "build_s": built, "save_s": time.perf_counter() - t0 - built,
            "size_gib": size / GIB}


# ------------------------------------------------------------------ one entry (its own process)

def _pipes(entry: dict, args):
    from diffusers import FluxPipeline

    from characonsist import CharaConsistPipeline, memory

    ours = memory.load_pipeline(CharaConsistPipeline, args.checkpoint, args.dtype, quantize=entry["quantize"],
                                memory=entry["memory"], gpus=[0])
    names = FluxPipeline.__init__.__code__.co_varnames
    flux = FluxPipeline(**{k: v for k, v in ours.components.items() if k in names})
    for p in (ours, flux):
        p.set_progress_bar_config(disable=True)
    return ours, flux


def run_entry(entry: dict, args) -> list[dict]:
    """Load in the entry's mode, then baseline and ours (see the module docstring). Returns the records."""
    from diffusers import FluxPipeline  # noqa: F401  (imported before the load is timed)

    from characonsist import CharaConsistPipeline, memory  # noqa: F401

    device = torch.device(args.device)
    records: list[dict] = []
    t_start = time.perf_counter()
    meta = {"entry": entry["name"], "quantize": entry["quantize"], "memory": entry["memory"],
            "compile": entry["compile"], "frames": entry["frames"]}
    if device.type != "cuda" and entry["memory"] not in ("none", "group-offload"):
        return [{"name": f"{entry['name']}/load", **meta, "skipped": f"{entry['memory']} needs CUDA"}]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with HostPeak() as host:
        t0 = time.perf_counter()
        try:
            ours, flux = _pipes(entry, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the table goes on with the next entry
            import traceback

            return [{"name": f"{entry['name']}/load", **meta, "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}]
        sync(device)
        load_s = time.perf_counter() - t0
    load = {"name": f"{entry['name']}/load", **meta, "load_s": load_s, "load_rss_peak_gib": host.peak / GIB,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "rss_after_load_gib": host.start / GIB, "pipeline": memory.settings(ours)}
    if device.type == "cuda":
        load["gpu_after_load_gib"] = torch.cuda.memory_allocated() / GIB
        load["gpu_load_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    records.append(load)
    print(f"[{load['name']}] {load_s:.1f} s, RSS peak {load['load_rss_peak_gib']:.2f} GiB, weights "
          f"{load['pipeline'].get('weights')}", flush=True)

    n = entry["frames"]
    steps = args.seq_steps if entry["memory"] == "sequential-offload" else args.steps
    identity, frames = story(n)
    prompts = [full_prompt(p) for p in [identity, *frames]]
    common = dict(height=args.size, width=args.size, guidance_scale=3.5, output_type=args.output_type,
                  max_sequence_length=args.max_sequence_length)

    def baseline_fn(s):
        return lambda: flux(prompt=prompts, num_inference_steps=s, **common,
                            generator=[torch.Generator("cpu").manual_seed(SEED) for _ in prompts])

    def ours_fn(s):
        return lambda: ours(identity=identity, frames=frames, method="characonsist", seed=SEED, num_inference_steps=s,
                            **common)

    def timed(name, fn_of_steps, kind, warmups):
        budget = args.budget_s
        if budget and records and "per_forward_s" in meta:
            need = meta["per_forward_s"] * (steps * 1.3 + sum(warmups)) + 10
            left = budget - (time.perf_counter() - t_start)
            if need > left:
                records.append({"name": name, **meta, "kind": kind, "skipped": f"needs ~{need:.0f} s, {left:.0f} left"})
                return None
        warm_s = []
        for w in warmups:
            t0 = time.perf_counter()
            measure(name + ":warmup", fn_of_steps(w), flux.transformer, device, log=lambda m: None)
            warm_s.append(time.perf_counter() - t0)
        record = measure(name, fn_of_steps(steps), flux.transformer, device, log=print, kind=kind, steps=steps,
                         n_images=n + 1, size=args.size, warmup_s=warm_s, **meta)
        records.append(record)
        return record

    eager = None
    if entry["compile"]:
        eager = timed(f"{entry['name']}/baseline-eager", baseline_fn, "baseline-eager", [1])
        memory.compile_pipeline(ours, backend=args.compile_backend)
    base = timed(f"{entry['name']}/baseline", baseline_fn, "baseline", [1])
    if base is not None and "wall_s" in base:
        meta["per_forward_s"] = base["wall_s"] / steps
    ours_warm = [args.first_warmup_steps, 1] if args.first_warmup_steps else [1]
    mine = timed(f"{entry['name']}/ours", ours_fn, "ours", ours_warm)
    if mine is not None and base is not None and "wall_s" in mine and "wall_s" in base:
        mine.update(comparison(mine, base), baseline=base["name"])
        if eager is not None and "wall_s" in eager:
            mine["x_baseline_eager"] = mine["wall_s"] / eager["wall_s"]
            base["x_baseline_eager"] = base["wall_s"] / eager["wall_s"]
    for r in records:
        r.pop("per_forward_s", None)
    return records


# ------------------------------------------------------------------ the table (the parent process)

def _child(args, what: str, gpu: str, timeout: float, tag: str, work: Path, log) -> tuple[list[dict], str | None]:
    """Run ``gpu_bench.py --table-child WHAT`` on one GPU, writing in ``work``; its records, or an error. Its
    output goes into the table's log (``log``), after it ends."""
    cmd = [sys.executable, str(HERE / "gpu_bench.py"), "--table-child", what, "--checkpoint", str(args.checkpoint),
           "--steps", str(args.steps), "--size", str(args.size), "--max-sequence-length", str(args.max_sequence_length),
           "--seq-steps", str(args.seq_steps), "--first-warmup-steps", str(args.first_warmup_steps),
           "--compile-backend", args.compile_backend, "--out", str(work), "--tag", tag, "--output-type",
           args.output_type, "--dtype", str(args.dtype).replace("torch.", ""), "--frames", str(args.frames[0])]
    if timeout != float("inf"):
        cmd += ["--budget-s", str(int(timeout))]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
    out = work / f"out_{tag}.txt"
    killed = None
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=None if timeout == float("inf") else timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            killed = f"killed after {timeout + 30:.0f} s"
    text = out.read_text(errors="replace")
    noise = ("Failed to load", "register_constant", "Unable to import `torchao`", "it/s]", "requires torchvision")
    log("\n".join(f"    {tag} | {line}" for line in text.splitlines() if not any(n in line for n in noise)))
    result = work / f"bench_{tag}.json"
    records = json.loads(result.read_text())["records"] if result.is_file() else []
    if killed or proc.returncode != 0:
        return records, killed or f"exit status {proc.returncode}: {text[-1500:]}"
    return records, None


def run_table(args, entries: list[str], log=print) -> list[dict]:
    """The checkpoint, then every entry on the GPUs of ``args.table_gpus``; returns all records."""
    import tempfile

    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="table-"))   # the children's files: $OUT takes few files back
    t_start = time.perf_counter()
    gpus = args.table_gpus
    parsed = [parse_entry(e, args.frames[0]) for e in entries]
    records: list[dict] = []
    budget = args.budget_s or float("inf")
    got, error = _child(args, "checkpoint", gpus[0], budget, "checkpoint", work, log)
    records += got or [{"name": "checkpoint", "error": error}]
    if error:
        log(f"checkpoint failed: {error}")
        return records
    log(f"checkpoint: {got[0]}")
    todo: queue.Queue = queue.Queue()
    for e in parsed:
        todo.put(e)
    lock = threading.Lock()
    measured: list[tuple[float, float]] = []   # (estimate, actual) of finished entries
    cuda = torch.device(args.device).type == "cuda"

    def worker(gpu: str):
        while True:
            try:
                entry = todo.get_nowait()
            except queue.Empty:
                return
            if not cuda and entry["memory"] not in ("none", "group-offload"):
                with lock:
                    records.append({"name": f"{entry['name']}/load", "entry": entry["name"],
                                    "skipped": f"{entry['memory']} needs CUDA"})
                continue
            with lock:
                correction = (sum(a for _, a in measured) / sum(e for e, _ in measured)) if measured else 1.0
            estimate = estimate_s(entry, args.tiny, correction)
            left = budget - (time.perf_counter() - t_start)
            if estimate > left:
                with lock:
                    records.append({"name": f"{entry['name']}", "entry": entry["name"],
                                    "skipped": f"estimate {estimate:.0f} s > {left:.0f} s left of --budget-s"})
                log(f"[{entry['name']}] SKIPPED: estimate {estimate:.0f} s, {left:.0f} s left")
                continue
            tag = entry["name"].replace("/", "_").replace("+", "_").replace("@", "_")
            t0 = time.perf_counter()
            got, error = _child(args, entry["name"], gpu, left, tag, work, log)
            took = time.perf_counter() - t0
            with lock:
                for r in got:
                    r["gpu_index"], r["entry_s"] = gpu, took
                records.extend(got)
                if error:
                    records.append({"name": f"{entry['name']}/process", "entry": entry["name"], "error": error[:2000]})
                measured.append((estimate, took))
            log(f"[{entry['name']}] {took:.0f} s on GPU {gpu} (estimated {estimate:.0f} s)"
                + (f"; {error[:300]}" if error else ""))

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def table_lines(records: list[dict]) -> list[str]:
    """The issue's table: one row per entry."""
    lines = [f"{'entry':<32} {'load s':>7} {'load RSS':>8} {'GPU alloc/resv GiB':>19} {'RSS GiB':>8} "
             f"{'plain s':>8} {'ours s':>8} {'x plain':>7} {'x eager':>7} {'x bf16':>7}"]
    # ours against ours in bf16 on one GPU (same frame count, another process of the same table)
    bf16 = {r.get("frames"): r["wall_s"] for r in records
            if r.get("kind") == "ours" and r.get("quantize") == "none" and r.get("memory") == "none"
            and not r.get("compile") and "wall_s" in r}
    entries = []
    for r in records:
        if r.get("entry") and r["entry"] not in entries:
            entries.append(r["entry"])
    for e in entries:
        rows = {r.get("kind") or r["name"].rsplit("/", 1)[-1]: r for r in records if r.get("entry") == e}
        load, base, mine = rows.get("load"), rows.get("baseline"), rows.get("ours")
        bad = [r for r in rows.values() if "error" in r or "skipped" in r]
        if load is None or "load_s" not in load:
            why = bad[0].get("error") or bad[0].get("skipped") if bad else "not run"
            lines.append(f"{e:<32} {str(why)[:110]}")
            continue
        peak = [r for r in (base, mine) if r and "wall_s" in r]
        gpu = (f"{max(r.get('gpu_peak_alloc_gib', 0) for r in peak):6.2f} / "
               f"{max(r.get('gpu_peak_reserved_gib', 0) for r in peak):6.2f}") if peak else "-"
        rss = max([load["load_rss_peak_gib"]] + [r["rss_peak_gib"] for r in peak])
        lines.append(f"{e:<32} {load['load_s']:7.1f} {load['load_rss_peak_gib']:8.2f} {gpu:>19} {rss:8.2f} "
                     f"{base['wall_s'] if base and 'wall_s' in base else float('nan'):8.2f} "
                     f"{mine['wall_s'] if mine and 'wall_s' in mine else float('nan'):8.2f} "
                     f"{mine.get('x_baseline', float('nan')) if mine else float('nan'):7.3f} "
                     f"{mine.get('x_baseline_eager', float('nan')) if mine else float('nan'):7.3f} "
                     f"{mine['wall_s'] / bf16[mine.get('frames')] if mine and 'wall_s' in mine and mine.get('frames') in bf16 else float('nan'):7.3f}")
        for r in bad:
            lines.append(f"    {r['name']}: {(r.get('error') or r.get('skipped'))[:150]}")
    return lines
