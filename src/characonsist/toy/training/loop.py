"""The training stages of the toy model: the VAE, the transformer (resumable, one or several processes, an EMA
of the weights), a start from a trained VAE or transformer, the probe of a precision and batch, and the
export of the shipped float16 folder. Each stage keeps its state and log in the run folder."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..._compat import dtype_kwarg
from .config import DEFAULTS, TrainConfig
from .data import reference_noise, step_kind, to_pixels, two_character_batch, two_panel_batch, two_panel_prompt
from .losses import flow_loss, lr_at, pipeline_mu, sample_sigmas, vae_loss
from .networks import (
    TRANSFORMER_CONFIG,
    _round_fp16,
    build_pipeline,
    load_run_pipeline,
    save_run_pipeline,
    save_transformer,
)

# ------------------------------------------------------------------------------------------------ stages

def _log(run: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(run / "train.log", "a") as f:
        f.write(line + "\n")


def _state(run: Path) -> dict:
    p = run / "state.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(run: Path, state: dict) -> None:
    tmp = run / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(run / "state.json")


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device, batch: int = 512) -> torch.Tensor:
    """Posterior means of uint8 images (N, H, W, 3), float16 on ``device``."""
    out = []
    for i in range(0, len(images), batch):
        x = to_pixels(images[i:i + batch], device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out.append(vae.encode(x).latent_dist.mean.to(torch.float16))
    return torch.cat(out)


def train_vae(run: Path, cfg: TrainConfig, images: np.ndarray, device, deadline: float) -> None:
    """Stage 1: the VAE, its latent statistics, and the saved starting pipeline."""
    pipe = build_pipeline(cfg.seed)
    vae = pipe.vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    pool = torch.as_tensor(images).to(device)
    t0, step = time.time(), 0
    for step in range(cfg.vae_steps):
        if time.time() > deadline:
            _log(run, f"vae: out of time at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * (1 - step / cfg.vae_steps))
        idx = torch.randint(0, len(pool), (cfg.vae_batch,), generator=gen, device=device)
        x = to_pixels(pool[idx])
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss, recon, kl = vae_loss(vae, x, cfg.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            _log(run, f"vae step {step} recon {recon.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    _round_fp16(vae)
    lat = encode_images(vae, images[:4096], device).float()
    shift, std = lat.mean().item(), lat.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    with torch.no_grad():
        x = to_pixels(images[:256], device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        err = (rec - x).abs().mean().item() * 127.5
    _log(run, f"vae done: {step + 1} steps, shift {shift:.4f}, scale {1 / std:.4f}, "
              f"mean abs error {err:.2f}/255 ({time.time() - t0:.0f} s)")
    pipe.vae = vae.cpu()
    save_run_pipeline(pipe, run)
    state = _state(run)
    state.update(vae_done=True, vae_steps=step + 1, vae_error_255=err, config=asdict(cfg), transformer_step=0)
    _save_state(run, state)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence embeddings and CLIP pooled embeddings, exactly as ``FluxPipeline.encode_prompt`` makes them."""
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return embeds.float(), pooled.float()


def _save_ema(ema: dict[str, torch.Tensor], path: Path) -> None:
    """The EMA weights in float16 (what ships is float16; the run folder must travel between GPU calls)."""
    from safetensors.torch import save_file

    save_file({n: t.to(torch.float16).contiguous().cpu() for n, t in ema.items()}, str(path))


def _load_ema(named: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = load_file(str(path)) if path.exists() else {}
    return {n: (saved[n].to(p.device, torch.float32) if n in saved else p.detach().float().clone())
            for n, p in named.items()}


def ema_decay(k: int, decay: float) -> float:
    """EMA decay after ``k`` updates: ``min(decay, (1 + k) / (10 + k))`` (short memory at the start)."""
    return min(decay, (1.0 + k) / (10.0 + k))


class Dist:
    """This process's place in a data-parallel run (``torchrun``; one process, rank 0 of 1, otherwise)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self) -> torch.device:
        """Join the process group (after the data set is rendered: the renderer forks) and pick the device."""
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{self.local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if cuda else "gloo")
        return device

    def max(self, value: float, device) -> float:
        """The largest ``value`` over the processes (every process calls it at the same step)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def train_transformer(run: Path, cfg: TrainConfig, images: np.ndarray, prompts: list[str], device,
                      deadline: float, precision: str = "bf16", auto_steps: bool = False,
                      save_every: int = 1000, rewarm: int = 0, extra_minutes: float = 0.0,
                      compile: bool = False, dist_: Dist | None = None, two_images: np.ndarray | None = None,
                      two_prompts: list[str] | None = None) -> None:
    """Stage 2: flow matching of the transformer on the fixed data set's latents (resumes).

    Every ``two_panel_every``-th step trains on two-panel images (``two_panel_batch``: one identity drawn twice,
    side by side or one above the other, ``batch // 2`` of them so the step has as many tokens), the other steps
    on single images, or, with ``two_character_every`` and the two-character data set (``two_images``,
    ``two_prompts``), every so many of them on two-character images (``two_character_batch``, ``batch // 2``;
    ``step_kind`` says which). Each step's noise levels use the resolution shift of its token count, as the
    pipeline samples them.

    The run keeps the float32 weights and an exponential moving average of them (``ema_decay``, saved in
    float16 as ``ema.safetensors``; the EMA is what ``export`` ships). Adam's moments are not kept (the run
    folder must travel between GPU calls under a size limit): after a resume they rebuild while ``rewarm``
    ramps the learning rate up again.

    Data parallel (``torchrun --nproc_per_node N``): each process holds its own part of the data set, draws
    ``cfg.batch`` images a step from it, and the gradients are averaged (``DistributedDataParallel``), so a step
    sees ``N * cfg.batch`` images; the first process logs and saves.

    With ``auto_steps`` the schedule's length is fixed after 200 steps from the measured speed so that it ends
    by ``deadline`` plus ``extra_minutes`` of training in later calls (logged and stored in the run's config:
    rerun with ``--steps N`` to reproduce).
    """
    dist_ = dist_ or Dist()
    log = (lambda msg: _log(run, msg)) if dist_.main else (lambda msg: None)
    state = _state(run)
    step = int(state.get("transformer_step", 0))
    if step >= cfg.steps:
        log(f"transformer: already at step {step}")
        return
    pipe = load_run_pipeline(run, device)
    vae, transformer = pipe.vae, pipe.transformer.train()
    t0 = time.time()
    latents = encode_images(vae, images, device)
    lat_shift, lat_scale = vae.config.shift_factor, vae.config.scaling_factor
    uniq = sorted(set(prompts))
    index = {p: i for i, p in enumerate(uniq)}
    prompt_idx = torch.tensor([index[p] for p in prompts], device=device)
    embeds, pooled = encode_prompts(pipe, uniq, cfg.max_sequence_length, device)
    if cfg.two_panel_every:       # every ordered pair of prompts: (first, second) -> first * len(uniq) + second
        pair_embeds, pair_pooled = encode_prompts(
            pipe, [two_panel_prompt(a, b) for a in uniq for b in uniq], cfg.max_sequence_length, device)
    if cfg.two_character_every:
        if two_images is None or two_prompts is None or not len(two_images):
            raise ValueError("two_character_every is set but no two-character data set was given (two_images, "
                             "two_prompts: render_dataset(..., two_characters=True))")
        two_latents = encode_images(vae, two_images, device)
        two_uniq = sorted(set(two_prompts))
        two_index = {p: i for i, p in enumerate(two_uniq)}
        two_prompt_idx = torch.tensor([two_index[p] for p in two_prompts], device=device)
        two_embeds, two_pooled = encode_prompts(pipe, two_uniq, cfg.max_sequence_length, device)
        log(f"transformer: {len(two_latents)} two-character latents per process, {len(two_uniq)} prompts")
    log(f"transformer: {len(latents)} latents per process x {dist_.world}, {len(uniq)} prompts encoded "
        f"({time.time() - t0:.0f} s)")
    named = dict(transformer.named_parameters())
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = _load_ema(named, run / "ema.safetensors")
    ema_list = [ema[n] for n in named]
    ema_updates = int(state.get("ema_updates", 0))
    if step > 0:
        log(f"transformer: resumed at step {step} (EMA of {ema_updates} updates)")
    forward = transformer
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(transformer, device_ids=[device] if device.type == "cuda" else None)
    if compile:   # static shapes: single and two-panel steps get a graph each (on the lent GPU, torch 2.11, the
        # automatic dynamic recompile of the second shape failed in Inductor)
        forward = torch.compile(forward, dynamic=False)
    size_tokens = (cfg.size // 8) ** 2
    mu_single, mu_pair = pipeline_mu(size_tokens), pipeline_mu(2 * size_tokens)
    losses, t1, start = {"single": [], "pair": [], "two": []}, time.time(), step
    use_bf16 = precision == "bf16" and device.type == "cuda"

    def save() -> None:
        if dist_.main:
            save_transformer(transformer, run / "pipeline" / "transformer")
            _save_ema(ema, run / "ema.safetensors")
            state = _state(run)
            state.update(transformer_step=step, ema_updates=ema_updates, config=asdict(cfg), precision=precision,
                         processes=dist_.world)
            state["transformer_seconds"] = state.get("transformer_seconds_done", 0.0) + time.time() - t1
            _save_state(run, state)
        dist_.barrier()

    def batch(step: int, gen: torch.Generator):
        """(x0, embeds, pooled, sigmas, kind, levels, weights) of this step (single, two-panel or two-character
        images; ``levels``/``weights`` per latent pixel for two-panel steps with references, else None)."""
        kind = step_kind(step, cfg)
        if kind == "two":
            n = max(1, cfg.batch // 2)
            lat, idx = two_character_batch(two_latents, n, gen)
            sig = sample_sigmas(n, mu_pair, cfg.uniform_frac, gen, device)
            return lat, two_embeds[two_prompt_idx[idx]], two_pooled[two_prompt_idx[idx]], sig, "two", None, None
        if kind == "pair":
            n = max(1, cfg.batch // 2)
            vertical = bool((step // cfg.two_panel_every) % 2)
            lat, a, b = two_panel_batch(latents, cfg.per_identity, n, gen, vertical=vertical)
            pair = prompt_idx[a] * len(uniq) + prompt_idx[b]
            sig = sample_sigmas(n, mu_pair, cfg.uniform_frac, gen, device)
            levels = weights = None
            if cfg.reference_frac:
                levels, weights = reference_noise(sig, tuple(lat.shape), vertical, cfg.reference_frac, gen)
            return lat, pair_embeds[pair], pair_pooled[pair], sig, "pair", levels, weights
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen, device=device)
        sig = sample_sigmas(cfg.batch, mu_single, cfg.uniform_frac, gen, device)
        return latents[idx], embeds[prompt_idx[idx]], pooled[prompt_idx[idx]], sig, "single", None, None

    rate_t = None
    stop = False
    while step < cfg.steps and not stop:
        if step == start + 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate_t = time.time()     # the rate excludes compilation and warm-up
        if auto_steps and step == start + 220:
            rate = 200 / (time.time() - rate_t)
            left = deadline - time.time() + 60.0 * extra_minutes
            cfg.steps = int(dist_.max(step + int(rate * left * 0.97) // 100 * 100 if dist_.main else 0, device))
            log(f"transformer: {rate:.1f} steps/s -> schedule of {cfg.steps} steps")
        gen = torch.Generator(device).manual_seed((cfg.seed * 1_000_003 + step) * 64 + dist_.rank)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * (min(1.0, (step - start + 1) / rewarm) if rewarm else 1.0)
        lat, emb, pool, sig, kind, levels, weights = batch(step, gen)
        x0 = (lat.float() - lat_shift) * lat_scale
        noise = torch.randn(x0.shape, generator=gen, device=device)
        try:
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                loss = flow_loss(forward, x0, noise, sig, emb, pool, levels, weights)
        except Exception as exc:   # torch.compile failing on its first call: train eagerly instead
            if not compile or step > start + 1:
                raise
            log(f"transformer: torch.compile failed ({type(exc).__name__}: {exc}); training eagerly")
            forward = forward._orig_mod if hasattr(forward, "_orig_mod") else forward
            compile = False
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                loss = flow_loss(forward, x0, noise, sig, emb, pool, levels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, [p.detach() for p in params], 1.0 - ema_decay(ema_updates, cfg.ema))
        ema_updates += 1
        if step % 50 in (0, 1):
            losses[kind].append(loss.item())
        step += 1
        if step % 20 == 0:
            stop = dist_.max(time.time() > deadline, device) > 0
        if step % 500 == 0:
            rate = (step - start) / (time.time() - t1)
            recent = {k: np.mean(v[-10:]) if v else float("nan") for k, v in losses.items()}
            two = f" two-character {recent['two']:.4f}" if cfg.two_character_every else ""
            log(f"transformer step {step}/{cfg.steps} loss single {recent['single']:.4f} two-panel "
                f"{recent['pair']:.4f}{two} lr {lr_at(step, cfg):.2e} ({rate:.1f} steps/s)")
        if step % save_every == 0:
            save()
    log(f"transformer: stopped at step {step}/{cfg.steps} after {time.time() - t1:.0f} s of training")
    transformer.eval()
    save()
    if dist_.main:
        state = _state(run)
        state["transformer_seconds_done"] = state["transformer_seconds"]
        _save_state(run, state)


def probe(precision: str, batch: int) -> None:
    """Fwd/bwd/step of the full-size transformer on random inputs, then its speed (a GPU smoke test)."""
    from diffusers import FluxTransformer2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**TRANSFORMER_CONFIG).to(device).train()
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    x0 = torch.randn(batch, 16, 32, 32, device=device)
    emb, pooled = torch.randn(batch, 32, 64, device=device), torch.randn(batch, 64, device=device)
    t0 = time.time()
    for i in range(13):
        if i == 3:
            torch.cuda.synchronize() if device.type == "cuda" else None
            t0 = time.time()
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda"):
            loss = flow_loss(tr, x0, torch.randn_like(x0), torch.rand(batch, device=device), emb, pooled)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    print(f"probe {precision} batch {batch}: loss {loss.item():.3f}, {10 / (time.time() - t0):.1f} steps/s", flush=True)


def export(run: Path, weights: Path, use_ema: bool = True) -> None:
    """Stage 3: the shipped float16 folder (``FluxPipeline.save_pretrained``) and its defaults file; the
    transformer's weights are the run's EMA (``ema.safetensors``) unless ``use_ema`` is False or there is
    none."""
    from safetensors.torch import load_file

    pipe = load_run_pipeline(run)
    ema_path = run / "ema.safetensors"
    if use_ema and ema_path.exists():
        missing, unexpected = pipe.transformer.load_state_dict(load_file(str(ema_path)), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{ema_path}: does not match the transformer (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    pipe.to(torch.float16)
    pipe.save_pretrained(weights, safe_serialization=True)
    cfg = _state(run).get("config", {})
    defaults = dict(DEFAULTS, max_sequence_length=cfg.get("max_sequence_length", DEFAULTS["max_sequence_length"]))
    (weights / "characonsist_defaults.json").write_text(json.dumps(defaults, indent=1) + "\n")


def init_from_vae(run: Path, cfg: TrainConfig, vae_dir: Path, transformer_dir: Path | None = None,
                  at_step: int = 0) -> None:
    """Stage ``init`` (any machine): a fresh pipeline of this recipe around an already trained VAE (e.g. the
    shipped one, ``--vae-from``), so that a new transformer/text-encoder recipe need not retrain the VAE. With
    ``transformer_dir`` (``--transformer-from``, e.g. the shipped folder's) the transformer starts from those
    weights instead of a fresh one (a new schedule of ``--steps`` continues a shipped model; the EMA starts there
    too). The text encoders are rebuilt from the seed, so they must be the ones the weights were trained with.
    ``at_step`` (with ``transformer_dir``): the weights are a run's EMA after that many steps of this schedule;
    the new run counts on from there (learning rate, data and noise draws of the later steps), with the EMA
    starting at those weights at its full decay."""
    if at_step and transformer_dir is None:
        raise ValueError("at_step needs transformer_dir (the weights to count on from)")
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    if _state(run).get("vae_done"):
        raise FileExistsError(f"{run} already has a pipeline; use a new --out folder")
    pipe = build_pipeline(cfg.seed)
    pipe.vae = AutoencoderKL.from_pretrained(str(vae_dir), **dtype_kwarg(torch.float32)).eval()
    if transformer_dir is not None:
        pipe.transformer = FluxTransformer2DModel.from_pretrained(str(transformer_dir), **dtype_kwarg(torch.float32))
    save_run_pipeline(pipe, run)
    state = _state(run)
    state.update(vae_done=True, vae_from=str(vae_dir), config=asdict(cfg), transformer_step=at_step,
                 ema_updates=at_step, transformer_from=str(transformer_dir) if transformer_dir else None)
    _save_state(run, state)
    _log(run, f"init: pipeline with the VAE of {vae_dir}"
              + (f", the transformer of {transformer_dir}" if transformer_dir else ""))
