"""GPU benchmark of the CharaConsist engine against plain FLUX.

Full-size FLUX.1-dev architecture with random bf16 weights built on the GPU (``random_flux.py``), 1024x1024,
50 steps, seed 2025 for every image. Phases run in the order given (``--phases``, comma-separated, ``:N`` or
``:N+M`` sets a phase's frame counts, default ``--frames``); the pipeline is built once per process:

* ``main``: for each frame count N: the baseline, plain ``FluxPipeline`` generating the same N + 1 prompts as
  one batch (one generator per image); then ``CharaConsistPipeline.from_pipe`` with CharaConsist defaults
  (pre-run, token merge) with ``share_bg`` on and off (``main:N/on`` or ``/off``: only one), then each
  ``--ours-variants`` entry ``name:key=value;key=value``: share_bg on plus those method options as keyword
  arguments of the pipeline call (values read as Python literals where they parse, else strings). Also the
  measured bf16 matmul rate and the baseline's achieved TFLOP/s (``random_flux.transformer_flops_per_image_step``).
* ``peers``: the ``--peer-methods`` (default ConsiStory, StorySync, StoryDiffusion) on the same story and seed
  through the same ``from_pipe`` pipeline, each measured like ours in ``main``. Compared to the baseline of the
  same N from earlier in the process (``main:4,peers:4`` runs it once), else to one run right before them.
* ``plans``: SDPA alone (``sdpa_check.plan_cost`` / ``mask_check``): the first call on a new (query length, key
  length) pair against repeats of it, PyTorch's default backend (cuDNN on H100), flash and cuDNN forced, batch 1,
  24 heads x 128, Sq 1000-3500, Sk 4608 + 0-3000; and whether cuDNN takes a (1, 1, 1, Sk) key-padding mask
  (bool and float), its speed and its error against unpadded attention. Seconds; run it first.
* ``profile``: short profiled runs (baseline, ours): which attention kernels ran; GPU time of the method's
  components (``record_function`` ranges wrapped around them here, see ``instrument_engine``).
* ``breakdown``: ablations at N frames: the engine with method "vanilla" (pure engine overhead), then
  CharaConsist without pre-run / background sharing / token merge, switched on one at a time, then the full
  method; the deltas say where the extra time goes.
* ``picture``: the identity from a picture: CharaConsist at N frames with ``identity_image`` (a seeded
  random picture of ``--picture-size``, fitted to the run's size) for each ``--picture-inversions`` entry (default
  renoise, euler, fireflow), against the baseline and against CharaConsist without a picture at the same N
  (measured here unless an earlier phase did: ``x_story`` / ``gpu_peak_alloc_x_story``); the inversion's own
  forwards are the batch-1 calls (``inversion_s``, ``inversion_calls``).
* ``modes`` (last): peak GPU and host memory at 1024x1024 in the three modes (one GPU, model CPU offload,
  sequential CPU offload) for plain FLUX and ours, ``--mode-steps`` steps (sequential: ``--seq-steps``, it
  is slow) and time per step.

Every ours / peer record names the baseline it is compared to (``baseline``, its index ``baseline_record``,
``baseline_reused``: measured before the phase that ran this one) and holds ``x_baseline`` (wall),
``gpu_peak_alloc_x_baseline``, ``gpu_peak_reserved_x_baseline``, ``host_peak_delta_gib``. ``--budget-s`` skips
any run (and a baseline whose first compared run would not fit) that would end past that many seconds after the
build, by the speed measured so far; the records say so.

Device (each process builds the pipeline once; ``.bench_src/`` = ``git archive COMMIT src``, ``.whl/`` the
wheels, both carried; about 8 minutes each, the order is the priority, the budget guard drops the tail: the
guard counts 1.6x the baseline + 15 s for an ours or peer run, profile 80 s more, so A's ``main:4/off`` and B's
``breakdown:4`` are expected to be skipped):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.bench_src/src BENCH_ENGINE_COMMIT=$(cat .bench_src/COMMIT) PYTHONUNBUFFERED=1
    A: timeout 510 python3 bench/gpu_bench.py --phases plans,main:4/on,peers:4,main:4/off \
           --ours-variants cudnn:volatile_backend=default --budget-s 430 --out $OUT --tag peers
    B: timeout 480 python3 bench/gpu_bench.py --phases main:8/on,profile:4,breakdown:4 --budget-s 400 \
           --out $OUT --tag eight
Earlier (BENCHMARKS.md, 2026-11-22):
         python3 bench/gpu_bench.py --phases main:4,profile:4,main:8/on,breakdown:4,main:8/off --budget-s 425 \
             --out $OUT --tag final
         python3 bench/gpu_bench.py --phases modes:4 --modes ours:model,ours:sequential --skip-check --no-matmul \
             --out $OUT --tag modes
Report:  python bench/report.py bench/results/h100-2026-11-22/bench_final.json
CPU:     python bench/gpu_bench.py --tiny --phases plans,main:1,peers:1,profile:1,breakdown:1,picture:1,modes:1 \
             --ours-variants nomerge:use_token_merge=False --out /tmp/bench
Picture (measured 2026-12-06, BENCHMARKS.md table 4):
         timeout 540 python3 bench/gpu_bench.py --phases main:4/on,picture:4 --budget-s 480 --out $OUT --tag picture
Results: ``<out>/bench_<tag>.json`` (every record, written after each run), ``log_<tag>.txt``, profiler tables;
a summary is printed last.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:  # the installed package, or the one on PYTHONPATH (the device run uses a snapshot of a commit)
    import characonsist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

from measure import GIB, matmul_rate, measure, profile_digest, sync  # noqa: E402
from random_flux import (  # noqa: E402
    FLUX_DEV_TRANSFORMER,
    TINY_TRANSFORMER,
    build_random_flux,
    parameter_counts,
    transformer_flops_per_image_step,
)
from sdpa_check import (  # noqa: E402
    apply_policy,
    diagnose,
    forward_profile,
    mask_check,
    plan_cost,
    plans_lines,
    policy,
)
from workload import SEED, comparison, full_prompt, story  # noqa: E402

# the table phase's default entries, in priority order (the budget guard drops the tail): bf16 on one GPU (the
# 1.25x target), compiled on both sides, then the 24 GB and 16 GB candidates, the offload modes, 8 frames
TABLE_MODES = ["none/none", "none/none+compile", "int8/none", "fp8/none", "nf4/model-offload", "nf4/none",
               "int8/model-offload", "none/group-offload", "none/model-offload", "int8/group-offload",
               "fp8-storage/none", "int8-bnb/none", "none/sequential-offload", "none/none@8"]


def literal(text: str):
    """A method option's value: a Python literal where it parses (True, None, 3, 0.5), else the string."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``name:key=value;key=value,name2:...`` -> [(name, {key: value})]; values through ``literal``."""
    variants = []
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        name, sep, body = item.partition(":")
        options = {}
        for pair in (x.strip() for x in body.split(";")):
            key, eq, value = pair.partition("=")
            if not pair or not eq or not key.strip():
                raise ValueError(f"variant {item!r}: expected name:key=value[;key=value...]")
            options[key.strip()] = literal(value)
        if not sep or not name.strip() or not options:
            raise ValueError(f"variant {item!r}: expected name:key=value[;key=value...]")
        if name.strip() in {n for n, _ in variants}:
            raise ValueError(f"variant name {name.strip()!r} given twice")
        variants.append((name.strip(), options))
    return variants


def baseline_of(records: list[dict], record: dict) -> dict | None:
    """The baseline a run is compared to: the record it names (``baseline_record``), else (older results) the
    latest one-GPU baseline with the same frame count."""
    idx = record.get("baseline_record")
    if isinstance(idx, int) and 0 <= idx < len(records):
        return records[idx]
    if record.get("kind") not in ("ours", "peer") or record.get("mode"):
        return None
    for r in reversed(records):
        if r.get("kind") == "baseline" and r.get("frames") == record.get("frames") and "wall_s" in r \
                and not r.get("mode"):
            return r
    return None


def instrument_engine():
    """Wrap the CharaConsist method's components in ``record_function`` ranges (profiling only).

    The engine has no ranges of its own; the names imported into ``characonsist.methods.characonsist`` and
    the method's own steps are wrapped here, so the profiler attributes GPU time to masks, matching, merge,
    key re-encoding and the grouped attention. Returns a function that undoes the wrapping.
    """
    import functools

    from torch.profiler import record_function

    try:
        import characonsist.methods.characonsist as ccm
    except ImportError:
        return lambda: None
    undo = []

    def wrap(owner, attr, label):
        original = getattr(owner, attr, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapped(*a, **k):
            with record_function(label):
                return original(*a, **k)

        setattr(owner, attr, wrapped)
        undo.append((owner, attr, original))

    for attr, label in [("text_attention_spans", "cc::mask_attention"), ("foreground_mask", "cc::mask_morphology"),
                        ("cosine_similarity_matrix", "cc::match_similarity"), ("match_points", "cc::match_points"),
                        ("merge_tokens", "cc::merge"), ("reencode", "cc::rope_reencode"),
                        ("grouped_attention", "cc::grouped_attention")]:
        wrap(ccm, attr, label)
    cls = getattr(ccm, "CharaConsist", None)
    if cls is not None:
        for attr, label in [("attention", "cc::method_attention"), ("_plan", "cc::plan"),
                            ("end_step", "cc::end_step")]:
            wrap(cls, attr, label)

    def restore():
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)

    return restore


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.records: list[dict] = []
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / f"log_{args.tag}.txt", "a")
        self.env = self._env()
        self.log(json.dumps(self.env))
        self.rate = matmul_rate(self.device) if args.matmul else None
        if self.rate:
            self.log(f"measured bf16 matmul rate (8192^3, median of 10): {self.rate:.0f} TFLOP/s")
        t0 = time.perf_counter()
        self.flux = build_random_flux("tiny" if args.tiny else "full", self.device, dtype=args.dtype)
        sync(self.device)
        self.build_s = time.perf_counter() - t0
        self.flux.set_progress_bar_config(disable=True)
        if args.vae_slicing:  # both pipelines decode one image at a time: the transformer sets the GPU peak
            self.flux.vae.enable_slicing()
        self.params = parameter_counts(self.flux)
        self.t_start = time.perf_counter()
        self.per_image_step = None   # seconds, for the time-budget guard
        self.log(f"built random FLUX pipeline in {self.build_s:.1f} s: {self.params} B parameters; GPU "
                 f"{torch.cuda.memory_allocated() / GIB if self.device.type == 'cuda' else 0:.2f} GiB")
        self.ours = self._ours()
        self._warm = False
        if (self.device.type == "cuda" and not args.skip_check) or args.check_attention:
            try:
                self.check_attention()
            except Exception as exc:  # noqa: BLE001 - the benchmark still runs with PyTorch's default
                self.log(f"attention check failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ setup
    def _env(self) -> dict:
        import diffusers
        import transformers

        env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
               "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "device": str(self.device), "dtype": str(self.args.dtype), "argv": sys.argv,
               "engine_commit": os.environ.get("BENCH_ENGINE_COMMIT")}
        try:
            import characonsist

            env["characonsist_file"] = characonsist.__file__
        except ImportError:
            pass
        if self.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(self.device)
            env["gpu_total_gib"] = torch.cuda.get_device_properties(self.device).total_memory / GIB
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            env["diffusers_attention_backend"] = str(_AttentionBackendRegistry._active_backend)
        except Exception:  # noqa: BLE001 - informative only
            pass
        return env

    def _ours(self):
        try:
            from characonsist import CharaConsistPipeline
        except ImportError as exc:
            self.log(f"engine not available ({exc}); only the baseline runs")
            return None
        # diffusers' from_pipe casts the *shared* modules to float32 unless a dtype is given (0.42: dtype
        # defaults to float32), which would silently turn the baseline into a float32 model as well
        ours = CharaConsistPipeline.from_pipe(self.flux, dtype=self.args.dtype)
        ours.set_progress_bar_config(disable=True)
        dtypes = {p.dtype for m in (self.flux.transformer, self.flux.text_encoder_2) for p in m.parameters()}
        assert dtypes == {self.args.dtype}, f"from_pipe changed the modules' dtype to {dtypes}"
        return ours

    def check_attention(self):
        """SDPA backends on FLUX's shape; pick the policy; profile one plain step (where the time goes)."""
        diag = diagnose(tokens=(self.size // 16) ** 2 + self.args.max_sequence_length, device=self.device.type,
                        heads=2 if self.args.tiny else 24, head_dim=16 if self.args.tiny else 128)
        self.env["sdpa_check"] = diag
        for name, entry in diag["backends"].items():
            figures = (f"{entry['ms']:.2f} ms, {entry['tflops']:.0f} TFLOP/s, +{entry['extra_gib']:.2f} GiB"
                       if "ms" in entry else entry.get("error", "?"))
            self.log(f"sdpa {name:<9} {figures}  {entry.get('kernels', '')}")
            for w in entry.get("warnings", [])[:4]:
                self.log(f"    warning: {w}")
        chosen = policy(diag, self.args.sdpa)
        self.env["sdpa_policy"] = "pytorch default" if chosen is None else [b.name for b in chosen]
        self.log(f"sdpa policy ({self.args.sdpa}): {self.env['sdpa_policy']}")
        self._sdpa_ctx = apply_policy(chosen)
        prof = forward_profile(self.flux, self.size, self.args.max_sequence_length)
        self.env["one_step_profile"] = prof
        self.per_image_step = prof["gpu_ms"] / 1e3
        self.log(f"one plain step, batch 1 (text encoders included): {prof['wall_s']:.2f} s wall, "
                 f"{prof['gpu_ms']:.0f} ms GPU; top kernels:")
        for k in prof["top_kernels"]:
            self.log(f"    {k['ms']:9.1f} ms {k['calls']:5d}x  {k['kernel']}")

    def estimate(self, n_images: int, steps: int, factor: float) -> float:
        """Seconds a run of ``steps`` steps (warm-up included) should take at the current speed, plus slack."""
        return self.per_image_step * n_images * steps * factor + 15 if self.per_image_step else 0.0

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start) if self.args.budget_s else float("inf")

    def fits(self, name: str, n_images: int, steps: int, factor: float, extra_s: float = 0.0) -> bool:
        """False (and a note) when the run would overrun ``--budget-s`` by the current speed estimate.

        ``extra_s``: seconds that must fit after it as well (a baseline is only worth running when the first run
        compared to it fits too)."""
        if not self.args.budget_s or not self.per_image_step:
            return True
        estimate, left = self.estimate(n_images, steps, factor) + extra_s, self.left()
        if estimate <= left:
            return True
        self.log(f"[{name}] SKIPPED: needs about {estimate:.0f} s, {left:.0f} s left of --budget-s")
        self.records.append({"name": name, "skipped": f"estimate {estimate:.0f} s > {left:.0f} s left"})
        return False

    def compare(self, record: dict, base: dict | None, reused: bool):
        """Name the baseline a run is compared to (``baseline``, its index ``baseline_record``, whether it ran
        before the phase that measured this run: ``baseline_reused``) and add the ratios (``comparison``)."""
        index = next((i for i, r in enumerate(self.records) if r is base), None)
        if index is None or "wall_s" not in record or not any(r is record for r in self.records):
            return record
        record.update(baseline=base["name"], baseline_record=index, baseline_phase=base.get("phase"),
                      baseline_reused=reused)
        if "wall_s" in base:
            record.update(comparison(record, base))
            gpu = (f"GPU peak x{record['gpu_peak_alloc_x_baseline']:.3f}, " if "gpu_peak_alloc_x_baseline" in record
                   else "")
            self.log(f"    vs {base['name']} ({'reused, ' if reused else ''}phase {base.get('phase')}): "
                     f"x{record['x_baseline']:.3f} wall, {gpu}host {record['host_peak_delta_gib']:+.2f} GiB")
        self.save()
        return record

    def log(self, msg: str):
        print(msg, flush=True)
        self.log_file.write(msg + "\n")
        self.log_file.flush()

    # ------------------------------------------------------------------ calls
    @property
    def size(self) -> int:
        return self.args.size

    def baseline_fn(self, n_frames: int, steps: int, pipe=None):
        identity, frames = story(n_frames)
        prompts = [full_prompt(p) for p in [identity, *frames]]
        pipe = pipe or self.flux

        def fn():
            generators = [torch.Generator("cpu").manual_seed(SEED) for _ in prompts]
            return pipe(prompt=prompts, generator=generators, num_inference_steps=steps, height=self.size,
                        width=self.size, guidance_scale=3.5, output_type=self.args.output_type,
                        max_sequence_length=self.args.max_sequence_length)

        return fn

    def ours_fn(self, n_frames: int, steps: int, method: str = "characonsist", **options):
        identity, frames = story(n_frames)

        def fn():
            return self.ours(identity=identity, frames=frames, method=method, seed=SEED, num_inference_steps=steps,
                             height=self.size, width=self.size, guidance_scale=3.5,
                             output_type=self.args.output_type,
                             max_sequence_length=self.args.max_sequence_length, **options)

        return fn

    @staticmethod
    def factor(kind) -> float:
        """Time of a run relative to the baseline's, for the budget guard (ours at 4 frames: 1.52)."""
        return 1.0 if kind == "baseline" else 1.6

    def run(self, name: str, fn_of_steps, n_images: int, steps: int, warmup_steps: int | None = None, **meta):
        """Warm up with a short call of the same shape, then measure the full call."""
        warmup_steps = self.args.warmup_steps if warmup_steps is None else warmup_steps
        factor = self.factor(meta.get("kind"))
        if not self.fits(name, n_images, steps + warmup_steps, factor):
            return {"name": name, "skipped": True}
        if warmup_steps:
            measure(name + ":warmup", fn_of_steps(warmup_steps), self.flux.transformer, self.device,
                    log=lambda m: None)
        if meta.get("method") == "characonsist" and not meta.get("mode"):
            meta.update(characonsist_forwards(steps, meta.get("options") or {}))
        record = measure(name, fn_of_steps(steps), self.flux.transformer, self.device, log=self.log,
                         n_images=n_images, steps=steps, size=self.size, **meta)
        if meta.get("kind") == "baseline" and "wall_s" in record and not meta.get("mode"):
            self.per_image_step = record["wall_s"] / (n_images * steps)
        self.records.append(record)
        self.save()
        return record

    def flops(self, n_images: int, steps: int) -> float:
        config = TINY_TRANSFORMER if self.args.tiny else FLUX_DEV_TRANSFORMER
        tokens = (self.size // 16) ** 2
        return n_images * steps * transformer_flops_per_image_step(config, tokens, self.args.max_sequence_length)

    # ------------------------------------------------------------------ phases
    def find(self, kind: str, frames: int, **match) -> dict | None:
        """The latest successful record of ``kind`` for ``frames`` frames with the given fields."""
        for r in reversed(self.records):
            if r.get("kind") == kind and r.get("frames") == frames and "wall_s" in r and not r.get("mode") \
                    and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    def baseline(self, n: int, phase: str) -> dict:
        """Plain FluxPipeline, the N + 1 prompts as one batch; with the achieved TFLOP/s."""
        steps = self.args.steps
        base = self.run(f"baseline/{n + 1}img", lambda s: self.baseline_fn(n, s), n + 1, steps, phase=phase,
                        kind="baseline", frames=n)
        flops = self.flops(n + 1, steps)
        base["transformer_tflop"] = flops / 1e12
        if "wall_s" in base:
            base["tflops_wall"] = flops / base["wall_s"] / 1e12
            base["tflops_transformer"] = flops / max(base["transformer_s"], 1e-9) / 1e12
            if self.rate:
                base["matmul_rate_tflops"] = self.rate
                base["frac_of_matmul_wall"] = base["tflops_wall"] / self.rate
                base["frac_of_matmul_transformer"] = base["tflops_transformer"] / self.rate
        self.save()
        return base

    def phase_main(self, frames: list[int], share_bg: tuple[bool, ...] = (True, False)):
        """Baseline, ours with ``share_bg`` on/off, then each ``--ours-variants`` entry (share_bg on plus its
        options); runs an earlier phase measured (same N, same settings) are not repeated."""
        steps = self.args.steps
        if self.ours is not None and self.args.first_warmup_steps and not self._warm:
            measure("first-warmup", self.ours_fn(frames[0], self.args.first_warmup_steps), self.flux.transformer,
                    self.device, log=self.log)
            self._warm = True
        for n in frames:
            if self.ours is None:
                self.baseline(n, "main")
                continue
            base = self.find("baseline", n)
            reused = base is not None
            base = base or self.baseline(n, "main")
            for bg in share_bg:
                if self.find("ours", n, share_bg=bg, options={}) is not None:
                    continue
                record = self.run(f"ours/{n}frames/share_bg={'on' if bg else 'off'}",
                                  lambda s, n=n, b=bg: self.ours_fn(n, s, share_bg=b), n + 1, steps,
                                  phase="main", kind="ours", frames=n, share_bg=bg, method="characonsist", options={})
                self.compare(record, base, reused)
            for name, options in self.args.ours_variants:
                if self.find("ours", n, variant=name) is not None:
                    continue
                options = {"share_bg": True, **options}
                record = self.run(f"ours/{n}frames/{name}", lambda s, n=n, o=options: self.ours_fn(n, s, **o), n + 1,
                                  steps, phase="main", kind="ours", frames=n, share_bg=options["share_bg"],
                                  method="characonsist", options=options, variant=name)
                self.compare(record, base, reused)

    def phase_peers(self, frames: list[int]):
        """The peer methods (``--peer-methods``) on the same story and seed, each against plain FLUX: the
        baseline of the same N from earlier in this process when there is one, else one run right here."""
        steps = self.args.steps
        if self.ours is None:
            self.log("peers: engine not available; skipped")
            return
        for n in frames:
            base = self.find("baseline", n)
            reused = base is not None
            if base is None:
                first = self.estimate(n + 1, steps + self.args.warmup_steps, self.factor("peer"))
                if not self.fits(f"baseline/{n + 1}img (peers)", n + 1, steps + self.args.warmup_steps, 1.0, first):
                    continue
                base = self.baseline(n, "peers")
            for method in self.args.peer_methods:
                record = self.run(f"peers/{n}frames/{method}", lambda s, n=n, m=method: self.ours_fn(n, s, m), n + 1,
                                  steps, phase="peers", kind="peer", frames=n, method=method, options={})
                self.compare(record, base, reused)

    def phase_plans(self, frames: list[int]):
        """How long SDPA's first call on a new (query, key) length pair takes against repeats, per backend, and
        whether cuDNN takes a key-padding mask (``sdpa_check.plan_cost`` / ``mask_check``). FLUX's widths on
        CUDA; toy widths and lengths with ``--tiny``; skipped on a CPU otherwise."""
        record = {"name": "plans/sdpa", "phase": "plans", "sdpa_policy": self.env.get("sdpa_policy")}
        if self.device.type != "cuda" and not self.args.tiny:
            self.log("plans: needs CUDA (or --tiny for the toy path); skipped")
            record["skipped"] = "no CUDA"
        elif self.args.budget_s and self.left() < 30:
            self.log(f"plans: SKIPPED, {self.left():.0f} s left of --budget-s")
            record["skipped"] = "budget"
        else:
            device = self.device.type
            if self.args.tiny:
                shape = {"heads": 2, "head_dim": 16, "dtype": self.args.dtype}
                record["plan_cost"] = plan_cost(device, **shape, n_shapes=4, reps=2, q_range=(10, 40), k_base=64,
                                                k_extra=30)
                record["mask"] = mask_check(device, **shape, sq=20, sk=70, pad_to=32, reps=2)
            else:
                record["plan_cost"] = plan_cost(device, n_shapes=self.args.plan_shapes)
                record["mask"] = mask_check(device)
            self.log("[plans/sdpa] first SDPA call on a new (Sq, Sk) shape vs repeats; cuDNN with a key-padding mask:")
            for line in plans_lines(record):
                self.log(line)
        self.records.append(record)
        self.save()

    PROFILE_OVERHEAD_S = 80  # H100: the profile phase took 95 s for 16 s of profiled runs (trace processing)

    def phase_profile(self, frames: list[int]):
        n = frames[0]
        steps = self.args.profile_base_steps + self.factor("ours") * self.args.profile_steps * (1 if self._warm else 2)
        if not self.fits(f"profile/{n}frames", n + 1, steps, 1.0, self.PROFILE_OVERHEAD_S):
            return
        runs = [("baseline", self.baseline_fn(n, self.args.profile_base_steps))]
        if self.ours is not None:
            runs.append(("ours", self.ours_fn(n, self.args.profile_steps, share_bg=True)))
        undo = instrument_engine()
        for name, fn in runs:
            try:
                if not self._warm:
                    fn()  # same shapes once before the profiled call
                digest = profile_digest(fn, self.device, table_path=self.out / f"profile_{self.args.tag}_{name}.txt")
            except Exception as exc:  # noqa: BLE001
                digest = {"error": f"{type(exc).__name__}: {exc}"}
            record = {"name": f"profile/{name}", "phase": "profile", "frames": n,
                      "steps": self.args.profile_steps if name == "ours" else self.args.profile_base_steps, **digest}
            self.records.append(record)
            self.save()
            self.log(f"[profile/{name}] wall {digest.get('wall_ms', 0):.0f} ms (profiled), GPU kernels "
                     f"{digest.get('gpu_kernel_ms_total', 0):.0f} ms (busy {100 * digest.get('gpu_busy_frac', 0):.0f}%),"
                     f" attention kernels {digest.get('attention_kernel_ms', 0):.0f} ms; host API "
                     f"{ {k: v['calls'] for k, v in digest.get('host_api', {}).items()} }")
            for k in digest.get("attention_kernels", [])[:8]:
                self.log(f"    {k['gpu_ms']:9.1f} ms  {k['calls']:6d}x  {k['kernel']}")
            for op in digest.get("sdpa_ops", [])[:6]:
                self.log(f"    op {op['op']} x{op['calls']} ({op['gpu_ms']:.1f} ms)")
            for r in digest.get("ranges", [])[:25]:
                self.log(f"    range {r['range']}: {r['calls']}x, cpu {r['cpu_ms']:.1f} ms, gpu {r['gpu_ms']:.1f} ms")
            if "error" in digest:
                self.log(f"    ERROR {digest['error']}")
        undo()

    BREAKDOWN = [  # each variant switches one more component on; the deltas say where the time goes
        ("vanilla-engine", "vanilla", {}),
        ("cc-noprerun-nobg-nomerge", "characonsist", {"prerun": False, "share_bg": False, "use_token_merge": False}),
        ("cc-noprerun-bg-nomerge", "characonsist", {"prerun": False, "share_bg": True, "use_token_merge": False}),
        ("cc-noprerun-bg-merge", "characonsist", {"prerun": False, "share_bg": True, "use_token_merge": True}),
    ]

    def phase_breakdown(self, frames: list[int]):
        n, steps = frames[0], self.args.steps
        if self.find("baseline", n) is None:
            first = self.estimate(n + 1, steps + self.args.warmup_steps, self.factor("ours")) if self.ours else 0.0
            if not self.fits(f"baseline/{n + 1}img (breakdown)", n + 1, steps + self.args.warmup_steps, 1.0, first):
                return
            self.baseline(n, "breakdown")
        if self.ours is None:
            return
        base = self.find("baseline", n)
        variants = {name: (method, options) for name, method, options in self.BREAKDOWN}
        for name in self.args.breakdown:
            method, options = variants[name]
            record = self.run(f"breakdown/{n}frames/{name}", lambda s, m=method, o=options: self.ours_fn(n, s, m, **o),
                              n + 1, steps, phase="breakdown", kind="ours", frames=n, method=method, options=options)
            self.compare(record, base, base is not None and base.get("phase") != "breakdown")
        if self.find("ours", n, share_bg=True, options={}) is None:  # the full method, unless main measured it
            record = self.run(f"ours/{n}frames/share_bg=on", lambda s: self.ours_fn(n, s, share_bg=True), n + 1,
                              steps, phase="breakdown", kind="ours", frames=n, share_bg=True, method="characonsist",
                              options={})
            self.compare(record, base, base is not None and base.get("phase") != "breakdown")

    def picture(self):
        """The identity's picture for the picture phase: seeded random pixels of ``--picture-size`` (the run's
        size by default; another size also times the fitting)."""
        import numpy as np

        height, width = self.args.picture_size or (self.size, self.size)
        return np.random.default_rng(SEED).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def phase_picture(self, frames: list[int]):
        """CharaConsist with the identity from a picture, per inversion, against plain FLUX and against CharaConsist
        without a picture (the picture's own cost: encoding, inversion forwards, nothing else)."""
        steps = self.args.steps
        if self.ours is None:
            self.log("picture: engine not available; skipped")
            return
        picture = self.picture()
        for n in frames:
            base = self.find("baseline", n)
            reused = base is not None
            base = base or self.baseline(n, "picture")
            story_run = self.find("ours", n, share_bg=True, options={})
            if story_run is None:
                story_run = self.run(f"ours/{n}frames/share_bg=on", lambda s, n=n: self.ours_fn(n, s, share_bg=True),
                                     n + 1, steps, phase="picture", kind="ours", frames=n, share_bg=True,
                                     method="characonsist", options={})
                self.compare(story_run, base, reused)
            for inversion in self.args.picture_inversions:
                record = self.run(f"picture/{n}frames/{inversion}",
                                  lambda s, n=n, i=inversion: self.ours_fn(n, s, identity_image=picture, inversion=i),
                                  n + 1, steps, phase="picture", kind="picture", frames=n, method="characonsist",
                                  inversion=inversion, picture_size=list(picture.shape[:2]))
                self.compare(record, base, reused)
                if "wall_s" not in record:
                    continue
                single = record.get("transformer_by_batch", {}).get("1", {"calls": 0, "s": 0.0})
                record.update(inversion_calls=single["calls"], inversion_s=single["s"])
                line = f"    inversion {inversion}: {single['calls']} forwards of the identity, {single['s']:.2f} s"
                if story_run is not None and "wall_s" in story_run:
                    record.update(story=story_run["name"], x_story=record["wall_s"] / story_run["wall_s"],
                                  extra_s_vs_story=record["wall_s"] - story_run["wall_s"],
                                  host_delta_vs_story_gib=record["rss_peak_gib"] - story_run["rss_peak_gib"])
                    line += f"; x{record['x_story']:.3f} the story without a picture ({record['extra_s_vs_story']:+.2f} s)"
                    if "gpu_peak_alloc_gib" in record and "gpu_peak_alloc_gib" in story_run:
                        record["gpu_peak_alloc_x_story"] = record["gpu_peak_alloc_gib"] / story_run["gpu_peak_alloc_gib"]
                        line += f", GPU peak x{record['gpu_peak_alloc_x_story']:.3f}"
                self.log(line)
                self.save()

    def phase_modes(self, frames: list[int]):
        """``--modes`` entries ``pipe:mode`` in order; pipe ours|plain-flux, mode one-gpu|model|sequential."""
        n = frames[0]
        fns = {"plain-flux": lambda s: self.baseline_fn(n, s), "ours": lambda s: self.ours_fn(n, s)}
        for entry in self.args.modes:
            label, mode = entry.split(":")
            if label == "ours" and self.ours is None:
                continue
            steps = self.args.seq_steps if mode == "sequential" else self.args.mode_steps
            name = f"modes/{mode if mode == 'one-gpu' else mode + '-offload'}/{label}"
            if mode != "one-gpu":
                if self.device.type != "cuda":
                    self.log(f"{name}: CPU offload needs an accelerator; skipped")
                    continue
                pipe = self.ours if label == "ours" else self.flux
                t0 = time.perf_counter()
                try:
                    getattr(pipe, f"enable_{mode}_cpu_offload")()
                except Exception as exc:  # noqa: BLE001
                    self.log(f"{name}: enabling failed: {exc}")
                    continue
                self.log(f"{name}: enabled in {time.perf_counter() - t0:.1f} s")
            # no warm-up: it would only repeat the weight transfers (the first call pays cuDNN plan set-up)
            self.run(name, fns[label], n + 1, steps, warmup_steps=0, phase="modes", kind=label,
                     mode=mode, frames=n)

    # ------------------------------------------------------------------ output
    def save(self):
        payload = {"env": self.env, "matmul_tflops": self.rate, "build_s": self.build_s if hasattr(self, "build_s")
                   else None, "params_b": getattr(self, "params", None), "records": self.records}
        with open(self.out / f"bench_{self.args.tag}.json", "w") as f:
            json.dump(payload, f, indent=1, default=str)

    def summary(self):
        self.log("\n==== summary " + json.dumps({k: self.env.get(k) for k in ("gpu", "torch", "diffusers", "date_utc")}))
        if self.rate:
            self.log(f"bf16 matmul rate measured: {self.rate:.0f} TFLOP/s")
        for r in self.records:
            if r.get("phase") == "plans" and "skipped" not in r:
                self.log(f"{r['name']:<48} first SDPA call on a new shape vs repeats:")
                for line in plans_lines(r):
                    self.log(line)
                continue
            if "wall_s" not in r:
                if "error" in r:
                    self.log(f"{r['name']:<48} ERROR {r['error'][:150]}")
                continue
            base = baseline_of(self.records, r)
            line = f"{r['name']:<48} {r['wall_s']:8.2f} s"
            if base and "wall_s" in base:
                line += f"  x{r['wall_s'] / base['wall_s']:.3f} {base['name']}{' (reused)' if r.get('baseline_reused') else ''}"
                line += f"  host +{r['rss_peak_gib'] - base['rss_peak_gib']:.2f} GiB"
                if "gpu_peak_alloc_gib" in r:
                    line += f"  GPU x{r['gpu_peak_alloc_gib'] / base['gpu_peak_alloc_gib']:.3f}"
            line += f"  tr {r['transformer_s']:.2f} s/{r['transformer_calls']}"
            if "gpu_peak_alloc_gib" in r:
                line += f"  GPU {r['gpu_peak_alloc_gib']:.2f}/{r['gpu_peak_reserved_gib']:.2f} GiB"
                line += f" (denoise {r['gpu_denoise_peak_alloc_gib']:.2f})"
            line += f"  RSS peak {r['rss_peak_gib']:.2f} GiB"
            if r.get("steps") and r.get("mode"):
                line += f"  {r['wall_s'] / r['steps']:.2f} s/step"
            if "tflops_wall" in r:
                line += f"  {r['tflops_wall']:.0f} TFLOP/s wall, {r['tflops_transformer']:.0f} in transformer"
                if "frac_of_matmul_wall" in r:
                    line += f" ({100 * r['frac_of_matmul_wall']:.0f}% / {100 * r['frac_of_matmul_transformer']:.0f}%)"
            if r.get("nonfinite_outputs") or r.get("nonfinite_images"):
                line += f"  NONFINITE {r.get('nonfinite_outputs')}/{r.get('nonfinite_images')}"
            self.log(line)
        for n in sorted({r["frames"] for r in self.records if r.get("phase") == "breakdown"}):
            chain = [("baseline", self.find("baseline", n))]
            chain += [(name, self.find("ours", n, method=m, options=o)) for name, m, o in self.BREAKDOWN]
            chain += [("cc-full", self.find("ours", n, share_bg=True, options={}))]
            chain = [(name, r) for name, r in chain if r is not None]
            self.log(f"breakdown, {n} frames (wall deltas; transformer-time deltas):")
            for (_, prev), (name, cur) in zip(chain, chain[1:], strict=False):   # consecutive pairs
                self.log(f"    +{name:<28} {cur['wall_s'] - prev['wall_s']:+8.2f} s   "
                         f"{cur['transformer_s'] - prev['transformer_s']:+8.2f} s")
        for r in self.records:
            if r.get("kind") == "ours" and not r.get("mode") and "wall_s" in r:
                base = baseline_of(self.records, r)
                if base and "wall_s" in base:
                    for line in segment_lines(r, base):
                        self.log(line)


def characonsist_forwards(steps: int, options: dict) -> dict:
    """Forwards of the pre-run and the main run's first step, from the method's own phase plan."""
    from characonsist.methods import get_method

    phases = get_method("characonsist", **options).phases(steps)
    return {"prerun_forwards": sum(p.steps - p.start for p in phases if not p.final),
            "main_start": phases[-1].start}


def segments(record: dict, base: dict, mask_step: int = 10, share_end: int = 41) -> list[tuple[str, int, float, float]]:
    """Where an ours run's transformer time goes, from its per-forward times (CharaConsist's default schedule).

    Forwards beyond ``steps`` come first: the layout pre-run. The main run splits at the mask step (masks
    refreshed every step up to it) and at the end of sharing. Returns (segment, forwards, seconds, extra seconds
    over the baseline's mean forward time at the same batch: the pre-run's forwards are all extra, the main
    run's only by what they take beyond a plain forward).
    """
    calls = [ms / 1e3 for ms in record["transformer_call_ms"]]
    plain = sum(base["transformer_call_ms"]) / len(base["transformer_call_ms"]) / 1e3
    start = record.get("main_start", 0)                    # main steps taken over from the pre-run
    pre = record.get("prerun_forwards", len(calls) - record["steps"])
    main = pre - start                                     # index of main step k is main + k
    cuts = [("pre-run", 0, pre), (f"main steps {start}-{mask_step}", pre, main + mask_step + 1),
            (f"main steps {mask_step + 1}-{share_end - 1}", main + mask_step + 1, main + share_end),
            (f"main steps {share_end}-{record['steps'] - 1}", main + share_end, len(calls))]
    out = []
    for name, lo, hi in cuts:
        part = calls[lo:hi]
        # the pre-run is all extra, except the steps the main run takes over from it
        plain_part = start * plain if name == "pre-run" else len(part) * plain
        out.append((name, len(part), sum(part), sum(part) - plain_part))
    outside = (record["wall_s"] - record["transformer_s"]) - (base["wall_s"] - base["transformer_s"])
    out.append(("outside the transformer", 0, record["wall_s"] - record["transformer_s"], outside))
    return out


def segment_lines(record: dict, base: dict) -> list[str]:
    lines = [f"segments of {record['name']} (baseline {base['name']}: "
             f"{sum(base['transformer_call_ms']) / len(base['transformer_call_ms']):.0f} ms per forward):"]
    plain = sum(base["transformer_call_ms"]) / len(base["transformer_call_ms"]) / 1e3
    for name, n, seconds, extra in segments(record, base):
        lines.append(f"    {name:<26} {n:3d} forwards {seconds:7.2f} s (plain speed {n * plain:6.2f} s)  "
                     f"extra {extra:+7.2f} s")
    lines.append(f"    {'total':<26}               {record['wall_s']:7.2f} s  extra "
                 f"{record['wall_s'] - base['wall_s']:+7.2f} s")
    return lines


def default_checkpoint() -> str:
    """Where the table's random FLUX folder goes: /dev/shm (memory: saved and read at memory speed) when it has
    room for FLUX.1-dev's 31.5 GiB with some to spare, else /tmp."""
    import shutil

    try:
        if shutil.disk_usage("/dev/shm").free > 40 * GIB:
            return "/dev/shm/characonsist-random-flux"
    except OSError:
        pass
    return "/tmp/characonsist-random-flux"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy widths on the CPU (tests the whole script)")
    p.add_argument("--phases", default="main,profile")
    p.add_argument("--frames", default="4,8", help="frame counts (identity excluded) for phases without ':N'")
    p.add_argument("--steps", type=int, default=None, help="default 50 (tiny: 12)")
    p.add_argument("--size", type=int, default=None, help="default 1024 (tiny: 64)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--first-warmup-steps", type=int, default=4, help="one ours call first (pre-run, mask, match)")
    p.add_argument("--mode-steps", type=int, default=3)
    p.add_argument("--modes", default="ours:model,ours:sequential,plain-flux:model,plain-flux:sequential",
                   help="pipe:mode entries, pipe ours|plain-flux, mode one-gpu|model|sequential")
    p.add_argument("--breakdown", default="vanilla-engine,cc-noprerun-bg-merge,cc-noprerun-nobg-nomerge,"
                   "cc-noprerun-bg-nomerge", help="breakdown variants, in the order to run them")
    p.add_argument("--peer-methods", default="consistory,storysync,storydiffusion",
                   help="methods the peers phase runs, in order (engine registry names)")
    p.add_argument("--ours-variants", default="",
                   help="extra CharaConsist runs in main (share_bg on plus these method options), comma-separated "
                   "name:key=value[;key=value], values as Python literals where they parse, e.g. "
                   "'cudnn:volatile_backend=default,nomerge:use_token_merge=False'")
    p.add_argument("--plan-shapes", type=int, default=10, help="plans phase: new (Sq, Sk) pairs per backend")
    p.add_argument("--picture-inversions", default="renoise,euler,fireflow",
                   help="picture phase: inversion specs (characonsist.inversion), comma-separated")
    p.add_argument("--picture-size", default=None, help="picture phase: the picture's HEIGHTxWIDTH (default: the "
                   "run's size)")
    p.add_argument("--skip-check", action="store_true", help="no SDPA check / one-step profile on CUDA")
    p.add_argument("--seq-steps", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--profile-base-steps", type=int, default=2)
    p.add_argument("--max-sequence-length", type=int, default=None, help="default 512 (tiny: 128)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (tiny: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny: 1)")
    p.add_argument("--output-type", default="np")
    p.add_argument("--device", default=None)
    p.add_argument("--sdpa", default="auto", choices=["auto", "default", "flash", "efficient", "cudnn"],
                   help="SDPA backend policy (sdpa_check.policy); auto keeps PyTorch's choice when it is fused")
    p.add_argument("--budget-s", type=float, default=None, help="skip runs that would end past this many seconds")
    p.add_argument("--no-vae-slicing", dest="vae_slicing", action="store_false")
    p.add_argument("--check-attention", action="store_true", help="run the SDPA check off CUDA too (tests)")
    p.add_argument("--no-matmul", dest="matmul", action="store_false")
    p.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    p.add_argument("--tag", default=None, help="file name tag (default: the phases)")
    p.add_argument("--table-modes", default=",".join(TABLE_MODES),
                   help="table phase: QUANTIZE/MEMORY[+compile][@N] entries in priority order (memory_table.py)")
    p.add_argument("--table-gpus", default="0", help="table phase: GPUs running entries side by side, e.g. 0,1")
    p.add_argument("--checkpoint", default=None, help="table phase: the random FLUX folder, built if missing "
                   "(default /dev/shm or /tmp/characonsist-random-flux; tiny: OUT/tiny-checkpoint)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of +compile entries")
    p.add_argument("--table-child", default=None, help=argparse.SUPPRESS)   # one entry, in its own process
    args = p.parse_args(argv)
    args.frames = [int(x) for x in str(args.frames).split(",") if x]
    # "main:4,profile,main:8/on,breakdown:4,modes": run in this order; ":N[+M]" sets the phase's frame
    # counts, "/on" or "/off" the share_bg values of a main phase
    phases = []
    for token in (x for x in args.phases.split(",") if x):
        token, _, bg = token.partition("/")
        name, _, counts = token.partition(":")
        frames = [int(v) for v in counts.split("+")] if counts else args.frames
        phases.append((name, frames, {"share_bg": tuple(v == "on" for v in bg.split("+"))} if bg else {}))
    args.phases = phases
    args.modes = [m for m in args.modes.split(",") if m]
    args.breakdown = [b for b in args.breakdown.split(",") if b]
    args.peer_methods = [m.strip() for m in args.peer_methods.split(",") if m.strip()]
    args.picture_inversions = [m.strip() for m in args.picture_inversions.split(",") if m.strip()]
    if args.picture_size:
        try:
            args.picture_size = tuple(int(v) for v in args.picture_size.lower().split("x"))
            assert len(args.picture_size) == 2 and min(args.picture_size) > 0
        except (ValueError, AssertionError):
            p.error(f"--picture-size {args.picture_size!r}: expected HEIGHTxWIDTH, e.g. 1536x1024")
    try:
        args.ours_variants = parse_variants(args.ours_variants)
    except ValueError as exc:
        p.error(f"--ours-variants: {exc}")
    args.steps = args.steps or (12 if args.tiny else 50)
    args.size = args.size or (64 if args.tiny else 1024)
    args.max_sequence_length = args.max_sequence_length or (128 if args.tiny else 512)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.tag = args.tag or "-".join(name for name, _, _ in args.phases)
    valid = {"main", "peers", "plans", "profile", "breakdown", "picture", "modes", "table"}
    names = [name for name, _, _ in args.phases]
    if set(names) - valid:
        p.error(f"unknown phases {sorted(set(names) - valid)}; valid: {sorted(valid)}")
    if "table" in names and len(names) > 1:
        p.error("table runs alone (each of its entries is a process of its own)")
    if "table" in names and args.phases[0][1] != args.frames:
        args.frames = args.phases[0][1]
    args.table_modes = [m.strip() for m in args.table_modes.split(",") if m.strip()]
    args.table_gpus = [g.strip() for g in str(args.table_gpus).split(",") if g.strip()]
    args.checkpoint = args.checkpoint or (str(Path(args.out) / "tiny-checkpoint") if args.tiny else default_checkpoint())
    if "modes" in names and names.index("modes") != len(names) - 1:
        p.error("modes must be the last phase (it leaves the pipeline offloaded)")
    return args


def table_env(args) -> dict:
    """Versions and device of a table process."""
    import importlib.metadata

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "argv": sys.argv,
           "engine_commit": os.environ.get("BENCH_ENGINE_COMMIT"), "device": args.device}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "bitsandbytes", "peft"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if args.table_child and torch.cuda.is_available():   # the parent never touches the GPUs (no CUDA context)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
        env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env


def main_table(args):
    """``--phases table`` (the parent: every entry in its own process) or ``--table-child`` (one entry)."""
    import memory_table

    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"bench_{args.tag}.json"
    env = table_env(args)
    if args.table_child == "checkpoint":
        records = [memory_table.build_checkpoint(args)]
    elif args.table_child:
        records = memory_table.run_entry(memory_table.parse_entry(args.table_child, args.frames[0]), args)
    else:
        log = open(Path(args.out) / f"log_{args.tag}.txt", "a")

        def say(message):
            print(message, flush=True)
            log.write(message + "\n")
            log.flush()

        say(json.dumps(env))
        records = memory_table.run_table(args, args.table_modes, log=say)
        say("\n==== table (identity + N frames; GPU and RSS peaks over baseline and ours; x plain: ours / plain "
            "FluxPipeline in the same mode and process; x eager: / plain uncompiled)")
        for line in memory_table.table_lines(records):
            say(line)
    path.write_text(json.dumps({"env": env, "records": records}, indent=1, default=str))
    return records


def main(argv=None) -> Bench:
    args = parse_args(argv)
    if args.table_child or [name for name, _, _ in args.phases] == ["table"]:
        return main_table(args)
    bench = Bench(args)
    for phase, frames, options in args.phases:
        t0 = time.perf_counter()
        getattr(bench, f"phase_{phase}")(frames, **options)
        bench.log(f"phase {phase}:{frames} took {time.perf_counter() - t0:.1f} s")
    bench.summary()
    bench.save()
    return bench


if __name__ == "__main__":
    main()
