"""Train the toy FLUX model of the toy world: seeded, resumable, and the recipe of the shipped weights.

The shipped weights (toy model v4, an intermediate checkpoint: docs/TOY_WORLD.md, "Training round 4") are v3's
(below) trained on for 7,400 more steps with two-panel images whose one panel is a cleaner reference
(``--reference-frac``, ``reference_noise``), in three self-contained device calls on one H200 (log, state and
checks of each: ``bench/results/toy-train-2026-12-06/``)::

    MINUTES=7.6 ARGS="--reference-frac 0.5 --two-character-every 3" bash bench/toy_train_call.sh $OUT 0 11000
    ARGS="--reference-frac 0.9 --two-character-every 0" bash bench/toy_train_call.sh $OUT 2820 10600
    ARGS="--reference-frac 0.9 --two-character-every 0" bash bench/toy_train_call.sh $OUT 6560 10600

(each call's returned ``weights.tar.*`` unpacked into ``src/characonsist/toy/weights`` before the next.) v3 was
made in three calls of under 10 minutes (the log and state: ``bench/results/toy-train-2026-12-01/``)::

    python -m characonsist.toy.train --out RUN --stage init --vae-from src/characonsist/toy/weights/vae  # v1's VAE
    torchrun --nproc_per_node 2 -m characonsist.toy.train --out RUN --stage transformer --precision bf16 \
        --compile --steps auto --extra-minutes 7.3 --minutes 9.0 --lr 5e-4      # steps 0-1000, 2 GPUs, eager
    python -m characonsist.toy.train --out RUN --stage transformer --precision bf16 --compile \
        --rewarm 200 --steps 9600 --minutes 8.75                                  # steps 1000-4280, one GPU
    python -m characonsist.toy.train --out RUN --stage transformer --precision bf16 \
        --rewarm 100 --steps 8800 --minutes 8.2                                   # steps 4280-8800 (LR decay)
    python -m characonsist.toy.train --out RUN --stage export                 # on any machine (ships the EMA)

``bench/toy_train_call.sh`` wraps init, transformer, export and the quick checks into one self-contained device call
that starts from the weights in the working tree and counts on from ``--at-step`` (round 4, docs/TOY_WORLD.md; the
v3 calls above resumed a run folder kept on a warm machine, which a machine taken back loses). ``--stage init
--transformer-from FOLDER`` starts a new run from a shipped transformer, to continue training it. ``--cache DIR``
keeps the rendered data set for a later call on the same machine. GPU runs are not bit-exact, so a rerun gives an
equivalent model, not the identical bytes.

Stages (``--stage vae|init|transformer|all|export``; ``all`` = vae then transformer in one call):

1. ``vae``: render a fixed, seeded data set of the toy world (``n_images``: random identities, each drawn
   ``per_identity`` times in random scenes and actions), train an ``AutoencoderKL`` (128 px -> 16 x 32 x 32
   latents, scale factor 4 like FLUX's 8 at 1024 px), measure the latents' ``shift_factor`` and
   ``scaling_factor``, and save a ``FluxPipeline`` folder (random frozen CLIP and T5 encoders, project-made
   tokenizers, a fresh transformer) to ``RUN/pipeline``. ``init`` does the same around an existing VAE.
2. ``transformer``: rectified flow matching as in FLUX (``x_t = (1 - s) x_0 + s n``, the model predicts
   ``n - x_0`` at timestep ``s``; ``s`` logit-normal, then shifted by the same ``mu`` the pipeline's scheduler
   uses at this image size), with the pipeline's own packing, position ids and prompt encoding, so that
   ``FluxPipeline.__call__`` samples it as it is. Resumes from ``RUN`` and stops after ``--minutes``; the
   learning rate schedule is counted in steps (warm up, hold, then decay over the last ``decay_frac`` of
   ``--steps``), so the result depends on the step count, not on where a run was cut. An EMA of the weights
   is kept and is what ships.
3. ``export``: cast to float16 and save the shipped folder with ``characonsist_defaults.json``.

Two-character images (``world.render_two``) can be mixed in with ``--two-character-every K`` (off by default, so
the shipped recipe is unchanged; ``step_kind``, ``two_character_batch``).

Text conditioning (v2): the prompt reaches the image through FLUX's joint attention only (context-free T5
tokens, a constant pooled CLIP vector; ``build_pipeline``), the premise of every mask in the methods.
Everything that the text encoders and the VAE produce is rounded to float16 first, so the float16 folder that
ships is exactly the one the transformer was trained with. The run folder travels between GPU calls under a
size limit: the transformer's float32 weights in 15 MB shards, the EMA in float16; Adam's moments are rebuilt
after a resume (``--rewarm``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .model import TOY_MODEL_DIR
from .training.config import TrainConfig
from .training.data import _dataset
from .training.loop import Dist, _log, _save_state, _state, export, init_from_vae, probe, train_transformer, train_vae


def probe_auto(batch: int) -> tuple[str, int]:
    """The first (precision, batch) whose probe runs, each in its own process (a CUDA error is fatal)."""

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for precision, b in (("bf16", batch), ("fp32", batch), ("bf16", batch // 2), ("fp32", batch // 2)):
        res = subprocess.run([sys.executable, "-m", "characonsist.toy.train", "--out", "/tmp/probe", "--stage",
                              "probe", "--precision", precision, "--batch", str(b)], env=env,
                             capture_output=True, text=True)
        print("\n".join((res.stdout + res.stderr).strip().splitlines()[-12:]), flush=True)
        if res.returncode == 0:
            return precision, b
    raise RuntimeError("no probe ran: see the errors above")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoint; resumed if present)")
    ap.add_argument("--stage", choices=("vae", "init", "transformer", "all", "export", "render", "probe"),
                    default="all")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this invocation")
    ap.add_argument("--steps", default=None, help="total transformer steps (schedule length), or 'auto'")
    ap.add_argument("--precision", choices=("bf16", "fp32", "auto"), default="fp32",
                    help="transformer training; 'auto' (probe stage): try bf16 then fp32, at the batch then half")
    ap.add_argument("--rewarm", type=int, default=0, help="warm the learning rate up again after a resume")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the rendered data set (reused)")
    ap.add_argument("--n-images", type=int, default=None)
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="images per step and process")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--weights", type=Path, default=None, help="export: target folder (default: the package's)")
    ap.add_argument("--vae-from", type=Path, default=None, help="init: the trained VAE folder to start from")
    ap.add_argument("--transformer-from", type=Path, default=None,
                    help="init: start the transformer from this folder's weights (continue a shipped model)")
    ap.add_argument("--extra-minutes", type=float, default=0.0,
                    help="with --steps auto: minutes of training planned in later calls (the schedule spans them)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    ap.add_argument("--two-character-every", type=int, default=None,
                    help="train every k-th non-two-panel step on two-character images (0: never, the default; kept "
                         "in the run's config once set)")
    ap.add_argument("--n-two-characters", type=int, default=None, help="size of the two-character data set")
    ap.add_argument("--reference-frac", type=float, default=None,
                    help="share of two-panel images with a cleaner reference panel (reference_noise; 0: v3's recipe)")
    ap.add_argument("--two-panel-every", type=int, default=None, help="every k-th step trains on two-panel images")
    ap.add_argument("--at-step", type=int, default=None,
                    help="init with --transformer-from: count the steps on from here (the weights were trained for "
                         "this many steps of the same schedule; a self-contained call continuing the last one's "
                         "exported weights: bench/toy_train_call.sh)")
    ap.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights, not the EMA")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # On the lent H100 (torch 2.11, cu130) the cuDNN attention backward failed in bf16
    # ("mha_graph.execute(...).is_good()"); with cuDNN attention off, bf16 autocast uses flash attention.
    torch.backends.cuda.enable_cudnn_sdp(False)
    t_start = time.time()
    deadline = t_start + args.minutes * 60 - 45        # keep time to save
    run = args.out
    run.mkdir(parents=True, exist_ok=True)
    if args.stage == "export":
        export(run, args.weights or TOY_MODEL_DIR, use_ema=args.ema)
        return
    if args.stage == "probe" and args.precision == "auto":
        choice = probe_auto(args.batch or TrainConfig.batch)
        (run / "probe.txt").write_text(" ".join(map(str, choice)) + "\n")
        return
    if args.stage == "probe":
        probe(args.precision, args.batch or TrainConfig.batch)
        return
    cfg = TrainConfig(**_state(run).get("config", {}))
    auto_steps = args.steps == "auto"
    if args.steps is not None and not auto_steps:
        cfg.steps = int(args.steps)
    for key in ("n_images", "vae_steps", "batch", "seed", "lr", "two_character_every", "n_two_characters",
                "reference_frac", "two_panel_every"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.stage == "init":
        if args.vae_from is None:
            ap.error("--stage init needs --vae-from DIR (a trained AutoencoderKL folder)")
        init_from_vae(run, cfg, args.vae_from, args.transformer_from, args.at_step or 0)
        return
    dist_ = Dist()
    if dist_.world > 1 and args.stage != "transformer":
        ap.error("several processes (torchrun) train the transformer only: --stage transformer")
    images, prompts = _dataset(cfg, args.cache, (dist_.rank, dist_.world))  # before CUDA starts (forks)
    two_images = two_prompts = None
    if cfg.two_character_every and args.stage in ("transformer", "all", "render"):
        two_images, two_prompts = _dataset(cfg, args.cache, (dist_.rank, dist_.world), two_characters=True)
    if dist_.main:
        _log(run, f"data set of {len(images)} images per process ready in {time.time() - t_start:.0f} s"
             + (f" (and {len(two_images)} two-character images)" if two_images is not None else ""))
    if args.stage == "render":
        return
    device = dist_.start()
    if args.stage in ("vae", "all") and not _state(run).get("vae_done"):
        vae_deadline = deadline if args.stage == "vae" else min(deadline, time.time() + 240)
        train_vae(run, cfg, images, device, vae_deadline)
    if args.stage in ("transformer", "all"):
        if args.rewarm and dist_.main:
            state = _state(run)
            state.setdefault("resumes", []).append({"from_step": state.get("transformer_step", 0),
                                                    "to_steps": cfg.steps, "rewarm": args.rewarm})
            _save_state(run, state)
        dist_.barrier()
        train_transformer(run, cfg, images, prompts, device, deadline, args.precision, auto_steps,
                          rewarm=args.rewarm, extra_minutes=args.extra_minutes, compile=args.compile, dist_=dist_,
                          two_images=two_images, two_prompts=two_prompts)
    if dist_.main:
        _log(run, f"done in {time.time() - t_start:.0f} s")
    dist_.stop()


if __name__ == "__main__":
    main()
