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
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._compat import dtype_kwarg

DEFAULTS = {"height": 128, "width": 128, "num_inference_steps": 20, "guidance_scale": 0.0,
            "max_sequence_length": 32}


@dataclass
class TrainConfig:
    """Everything that decides the trained model (the shipped one was made with these defaults)."""

    seed: int = 0
    size: int = 128
    n_images: int = 96_000           # fixed rendered data set: n_images / per_identity random identities, each
    per_identity: int = 4            # drawn this many times (random scene and action each time)
    render_chunk: int = 500          # images per rendering job (a multiple of per_identity)
    max_sequence_length: int = 32
    # VAE
    vae_steps: int = 2500
    vae_batch: int = 64
    vae_lr: float = 4e-4
    kl_weight: float = 1e-4          # on the per-element mean KL: keeps the latents smooth and near unit scale
    # transformer
    steps: int = 4300                # what fitted one 9-minute GPU call at 10.9 steps/s (fp32/TF32, H100)
    batch: int = 256
    lr: float = 4e-4
    warmup: int = 300
    decay_frac: float = 0.25         # linear decay to zero over the last quarter of the steps
    ema: float = 0.999               # EMA decay of the shipped weights (``ema_decay``)
    uniform_frac: float = 0.1        # share of timesteps drawn uniformly (covers s near 0 and 1)
    two_panel_every: int = 2         # every k-th step trains on two-panel images (0: never); see two_panel_batch
    two_character_every: int = 0     # every k-th other step trains on two-character images (0: never, the shipped
    n_two_characters: int = 24_000   # recipe); a data set of this many world.render_two images; see step_kind
    reference_frac: float = 0.0      # share of two-panel images whose one panel is a cleaner reference (v4; 0: v3's
                                     # recipe, both panels equally noised); see reference_noise


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128), layers_per_block=1,
    latent_channels=16, norm_num_groups=16, sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
)
# v3: 4 double + 8 single blocks, FLUX.1's 1:2 proportion (19 + 38); 9.7 M parameters, 19.5 MB in float16
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=32,
    num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
CLIP_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu")
# num_layers=0: the T5 stand-in is context free (each token's embedding, RMS-normed), so a word's token carries
# that word only and the image tokens must look it up where they need it (see ``build_pipeline``).
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=0, num_heads=4, relative_attention_num_buckets=16,
                 dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# FLUX.1-dev's resolution shift, mapped to the toy's sizes: its 1024 px images have 4096 tokens and mu = 1.15,
# 512 px 1024 tokens and mu = 0.5; the toy's 128 px (256 tokens) is its "1024 px" and 64 px (64 tokens) its
# "512 px", so the toy's sigma at every fraction of the run is FLUX.1-dev's at 1024x1024 (v2 used FLUX's own
# token counts, mu = 0.5 at 128 px: far less of the run at high noise than FLUX.1-dev).
SCHEDULER_CONFIG = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=64, max_image_seq_len=256)
# the scheduler of FLUX.1-dev (its scheduler_config.json), the reference of the schedule check
FLUX_DEV_SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                 base_image_seq_len=256, max_image_seq_len=4096)


# ------------------------------------------------------------------------------------------------ data

def all_prompts() -> list[str]:
    """Every prompt of the toy world (the three caption fields joined by spaces, as ``StoryImage.prompt``)."""
    from ..story import StoryImage
    from . import world

    return [StoryImage.parse(world.caption(s, k, a)).prompt
            for s in world.SCENES for k in world.KINDS for a in world.ACTIONS]


def _render_chunk(args: tuple[int, int, int, int, int, bool]) -> tuple[np.ndarray, list[str]]:
    """Render ``n`` examples from the chunk's own seeded generator (independent of the worker count): random
    identities, each drawn ``per_identity`` times in a random scene and action, one after the other; with
    ``two_characters``, ``world.sample_two_example`` images (size x 2 size) from the generator ``[seed, chunk, 2]``."""
    from ..story import StoryImage
    from . import world

    seed, chunk, n, size, per_identity, two_characters = args
    if two_characters:
        rng = np.random.default_rng([seed, chunk, 2])
        images, prompts = np.empty((n, size, 2 * size, 3), np.uint8), []
        for i in range(n):
            images[i], _, cap = world.sample_two_example(rng, size)
            prompts.append(StoryImage.parse(cap).prompt)
        return images, prompts
    rng = np.random.default_rng([seed, chunk])
    images, prompts = np.empty((n, size, size, 3), np.uint8), []
    ch = None
    for i in range(n):
        if i % per_identity == 0:
            ch = world.sample_character(rng)
        scene, action = str(rng.choice(list(world.SCENES))), str(rng.choice(list(world.ACTIONS)))
        images[i] = world.render(scene, ch, action, size=size, rng=rng)
        prompts.append(StoryImage.parse(world.caption(scene, ch.kind, action)).prompt)
    return images, prompts


def render_dataset(n: int, seed: int, size: int = 128, chunk: int = 500, workers: int | None = None,
                   per_identity: int = 1, shard: tuple[int, int] = (0, 1),
                   two_characters: bool = False) -> tuple[np.ndarray, list[str]]:
    """``n`` seeded examples: uint8 images (n, size, size, 3) and their prompts. Call before CUDA starts.

    Images ``k * per_identity ... (k + 1) * per_identity - 1`` show one character (``chunk`` must be a multiple
    of ``per_identity``). ``shard = (rank, world)`` renders only the chunks ``c`` with ``c % world == rank``: the
    data set is the same for every number of processes, each process holds its own part of it. With
    ``two_characters``: two-character images (n, size, 2 size, 3) of ``world.sample_two_example`` (independent
    identities; ``per_identity`` is not used) and their prompts (``world.two_caption``'s fields joined).
    """
    if chunk % per_identity and not two_characters:
        raise ValueError(f"chunk {chunk} must be a multiple of per_identity {per_identity}")
    rank, world_size = shard
    jobs = [(seed, c, min(chunk, n - c * chunk), size, per_identity, two_characters)
            for c in range(math.ceil(n / chunk)) if c % world_size == rank]
    if not jobs:
        raise ValueError(f"{n} images in chunks of {chunk} leave nothing for process {rank} of {world_size}")
    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 1) // world_size))
    if workers <= 1:
        parts = [_render_chunk(j) for j in jobs]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs, chunksize=1)
    return np.concatenate([p[0] for p in parts]), [q for p in parts for q in p[1]]


def two_panel_prompt(first: str, second: str) -> str:
    """The prompt of a two-panel image: both panels' prompts, one after the other.

    The toy T5 is context free and FLUX gives every text token the same position, so the model reads the words
    as a bag: it knows both scenes and both actions but not which panel holds which, and learns to place them
    either way. What it must learn is that both panels show the same character (its identity is never named).
    """
    return f"{first} {second}"


def two_panel_batch(latents: torch.Tensor, per_identity: int, n: int, generator: torch.Generator,
                    vertical: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` two-panel training images: latents (n, C, h, 2w) (or (n, C, 2h, w) with ``vertical``) of two
    different draws of one identity side by side, and the indices of the left/top and right/bottom draws.

    Two-panel images are how the toy model learns what large models learn from character sheets and comics:
    to draw one character again elsewhere, carrying its appearance through attention from the other instance
    (in another scene, size and position) to the corresponding body part. This is the ability extended
    attention methods borrow. The VAE is convolutional, so side-by-side latents decode to side-by-side images.
    """
    device = latents.device
    n_ids = len(latents) // per_identity
    ident = torch.randint(0, n_ids, (n,), generator=generator, device=device)
    first = torch.randint(0, per_identity, (n,), generator=generator, device=device)
    other = (first + torch.randint(1, per_identity, (n,), generator=generator, device=device)) % per_identity
    a, b = ident * per_identity + first, ident * per_identity + other
    return torch.cat([latents[a], latents[b]], dim=-2 if vertical else -1), a, b


def two_character_batch(latents: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` two-character training images: latents (n, C, h, 2w) drawn from the two-character data set's
    (``render_dataset(..., two_characters=True)``), and their indices (for their prompts).

    Unlike two-panel images these are rendered whole (one scene layout across both halves), so they are not put
    together from single latents. They show two characters of different kinds with independent identities: the
    model must keep each one's appearance to itself (the leak ``checks.two_characters`` measures), where two-panel
    images teach it to copy one identity."""
    idx = torch.randint(0, len(latents), (n,), generator=generator, device=latents.device)
    return latents[idx], idx


def reference_noise(sigmas: torch.Tensor, shape: tuple[int, int, int, int], vertical: bool, frac: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent-pixel noise levels and loss weights (each ``(n, 1, H, W)``) of a two-panel batch in which a share
    ``frac`` of the images has one panel (left/right or top/bottom, at random) as a **reference**: noised less,
    at ``sigma * r`` with ``r ~ U(0, 1)``, and left out of the loss. The other panel, and both panels of the
    other images, are at the image's ``sigma`` (the timestep the model is given) and weighted 1.

    Why: with both panels equally noised (v3's recipe), the other panel holds no more about the character's
    unnamed attributes than the panel itself, so copying lowers the loss little, and v3 barely copies (given a
    clean reference, 14.6% of its second panels took all four attributes; docs/TOY_WORLD.md). With a cleaner
    reference, the reference is the only good source of the target's identity, which is how in-context models
    learn to copy a subject from one view into another; CharaConsist's frames then read an identity through the
    same attention. The images without a reference keep joint generation (check 4's setting) in training.
    """
    n, _, h, w = shape
    device = sigmas.device
    level = sigmas.view(n, 1, 1, 1).expand(n, 1, h, w).clone()
    weight = torch.ones(n, 1, h, w, device=device)
    has_ref = torch.rand(n, generator=generator, device=device) < frac
    ratio = torch.rand(n, generator=generator, device=device)
    first = torch.rand(n, generator=generator, device=device) < 0.5      # the reference is the first panel
    half = torch.arange(h if vertical else w, device=device) < (h if vertical else w) // 2
    in_first = (half.view(1, 1, -1, 1) if vertical else half.view(1, 1, 1, -1)).expand(n, 1, h, w)
    is_ref = has_ref.view(n, 1, 1, 1) & (in_first == first.view(n, 1, 1, 1))
    level = torch.where(is_ref, level * ratio.view(n, 1, 1, 1), level)
    return level, torch.where(is_ref, torch.zeros_like(weight), weight)


def step_kind(step: int, cfg: TrainConfig) -> str:
    """What training step ``step`` trains on: ``"pair"`` (two-panel images) every ``two_panel_every``-th step
    (steps ``k - 1, 2k - 1, ...``), ``"two"`` (two-character images) every ``two_character_every``-th of the other
    steps, counted among them (the ``j``-th other step, from 0, when ``j % k == k - 1``), else ``"single"``. With
    two-panel images every 2nd step and two-character images every 2nd other step, a quarter of the steps are
    single images, a quarter two-character images and half two-panel images. ``two_character_every = 0`` leaves
    the shipped recipe's steps as they were."""
    p, k = cfg.two_panel_every, cfg.two_character_every
    if p and step % p == p - 1:
        return "pair"
    other = step - step // p if p else step          # how many non-pair steps come before this one
    return "two" if k and other % k == k - 1 else "single"


def to_pixels(images: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the VAE's input range)."""
    x = torch.as_tensor(images, device=device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------ model parts

def _round_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Round the weights to float16 values (kept in float32): what ships is what was used."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def build_pipeline(seed: int = 0, transformer_config: dict | None = None, vae_config: dict | None = None,
                   clip_config: dict | None = None, t5_config: dict | None = None, null_pooled: bool = True):
    """A fresh seeded ``FluxPipeline`` of the toy architecture (text encoders random and frozen).

    The prompt reaches the image through the joint attention only, as the masks of CharaConsist, ConsiStory
    and StorySync assume: T5 is context free (``T5_CONFIG``) and, with ``null_pooled``, CLIP's pooled output
    is zero for every prompt (its final layer norm is zeroed), so FLUX's pooled-text modulation carries no
    prompt. The first toy model (v1) had a 2-layer random T5 and an informative pooled vector: its text-image
    attention did not localise the character (masks ~all foreground, BENCHMARKS.md).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..tokenizers import make_clip_tokenizer, make_word_t5_tokenizer
    from . import world

    tok1 = make_clip_tokenizer(world.VOCAB_WORDS, model_max_length=77)
    tok2 = make_word_t5_tokenizer(world.VOCAB_WORDS)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok1), bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id,
        pad_token_id=tok1.pad_token_id, attention_dropout=0.0, **(clip_config or CLIP_CONFIG)))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
        decoder_start_token_id=tok2.pad_token_id, **(t5_config or T5_CONFIG)))
    vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
    transformer = FluxTransformer2DModel(**(transformer_config or TRANSFORMER_CONFIG))
    if null_pooled:
        with torch.no_grad():   # pooled output = final norm of the end token = 0 for every prompt
            norm = getattr(clip, "text_model", clip).final_layer_norm   # transformers 4 / 5 layouts
            norm.weight.zero_()
            norm.bias.zero_()
    for m in (clip, t5):
        _round_fp16(m.eval()).requires_grad_(False)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=tok1, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def load_run_pipeline(run: Path, device: str = "cpu"):
    """The run's pipeline, every part in float32 (the transformer's weights are the float32 masters)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(run / "pipeline"), **dtype_kwarg(torch.float32))
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval().requires_grad_(False)
    return pipe.to(device)


def _clear_weights(folder: Path) -> None:
    """Remove a model folder's weight files (a sharded save must not sit beside an older unsharded one)."""
    for f in folder.glob("diffusion_pytorch_model*.safetensors*"):
        f.unlink()


def save_transformer(transformer, folder: Path) -> None:
    """Save a copy of ``transformer``'s float32 weights in 15 MB shards, leaving the module where it is (moving a
    module that ``DistributedDataParallel`` wraps under it is not safe)."""
    from diffusers import FluxTransformer2DModel

    copy = FluxTransformer2DModel.from_config(transformer.config)
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in transformer.state_dict().items()})
    _clear_weights(folder)
    copy.save_pretrained(folder, safe_serialization=True, max_shard_size="15MB")


def save_run_pipeline(pipe, run: Path) -> None:
    """Save with the frozen parts in float16 (exact: their weights are float16 values) and the transformer in
    float32, in shards of at most 15 MB (files that come back from a GPU call must be under 16 MB)."""
    parts = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    for m in parts:
        m.to(torch.float16)
    _clear_weights(run / "pipeline" / "transformer")
    pipe.save_pretrained(run / "pipeline", safe_serialization=True, max_shard_size="15MB")
    for m in parts:
        m.to(torch.float32)


# ------------------------------------------------------------------------------------------------ losses

def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None) -> tuple:
    """L1 + MSE reconstruction of a posterior sample, plus ``kl_weight`` x the mean KL to N(0, 1)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator, device=x.device,
                                           dtype=post.mean.dtype)
    rec = vae.decode(z).sample
    recon = (rec.float() - x).abs().mean() + F.mse_loss(rec.float(), x)
    kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).mean()
    return recon + kl_weight * kl, recon.detach(), kl.detach()


def pipeline_mu(image_seq_len: int) -> float:
    """The ``mu`` the pipeline's scheduler uses for this many image tokens (FLUX's resolution shift)."""
    c = SCHEDULER_CONFIG
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return c["base_shift"] + m * (image_seq_len - c["base_image_seq_len"])


def sample_sigmas(n: int, mu: float, uniform_frac: float, generator: torch.Generator, device) -> torch.Tensor:
    """Training noise levels: logit-normal (some uniform), then FLUX's shift ``e^mu / (e^mu + 1/u - 1)``."""
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    uni = torch.rand(n, generator=generator, device=device)
    pick = torch.rand(n, generator=generator, device=device) < uniform_frac
    u = torch.where(pick, uni, u).clamp(1e-4, 1.0)
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def flow_loss(transformer, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor, levels: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified flow matching on scaled latents (B, C, h, w), packed and positioned like ``FluxPipeline``.

    ``levels`` and ``weights`` (B, 1, h, w), optional: a noise level and a loss weight per latent pixel (a
    reference panel, ``reference_noise``); the model's timestep stays ``sigmas``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    x0 = FluxPipeline._pack_latents(latents, b, c, h, w)
    n = FluxPipeline._pack_latents(noise, b, c, h, w)
    s = sigmas.view(b, 1, 1).to(x0.dtype)
    if levels is not None:      # a 2x2 patch never straddles two panels (panels are an even number of pixels)
        s = FluxPipeline._pack_latents(levels.to(x0.dtype), b, 1, h, w)[..., :1]
    xt = (1.0 - s) * x0 + s * n
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
    pred = transformer(hidden_states=xt, timestep=sigmas.to(x0.dtype), guidance=None, pooled_projections=pooled,
                       encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0]
    if weights is None:
        return F.mse_loss(pred.float(), (n - x0).float())
    wt = FluxPipeline._pack_latents(weights.float(), b, 1, h, w)[..., :1]
    return ((pred.float() - (n - x0).float()) ** 2 * wt).sum() / (wt.sum() * pred.shape[-1]).clamp_min(1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm up, hold, then decay linearly to zero over the last ``decay_frac`` of the steps."""
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step < decay_start:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))


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


def probe_auto(batch: int) -> tuple[str, int]:
    """The first (precision, batch) whose probe runs, each in its own process (a CUDA error is fatal)."""
    import subprocess
    import sys

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for precision, b in (("bf16", batch), ("fp32", batch), ("bf16", batch // 2), ("fp32", batch // 2)):
        res = subprocess.run([sys.executable, "-m", "characonsist.toy.train", "--out", "/tmp/probe", "--stage",
                              "probe", "--precision", precision, "--batch", str(b)], env=env,
                             capture_output=True, text=True)
        print("\n".join((res.stdout + res.stderr).strip().splitlines()[-12:]), flush=True)
        if res.returncode == 0:
            return precision, b
    raise RuntimeError("no probe ran: see the errors above")


def _dataset(cfg: TrainConfig, cache: Path | None, shard: tuple[int, int] = (0, 1),
             two_characters: bool = False) -> tuple[np.ndarray, list[str]]:
    """The seeded data set (this process's part of it), from ``cache`` when it holds it, else rendered; with
    ``two_characters``, the two-character data set (``cfg.n_two_characters`` images)."""
    key = (f"seed{cfg.seed}_two{cfg.n_two_characters}" if two_characters
           else f"seed{cfg.seed}_n{cfg.n_images}_k{cfg.per_identity}") + f"_s{cfg.size}_part{shard[0]}of{shard[1]}"
    if cache is not None and (cache / f"{key}.json").exists():
        return np.load(cache / f"{key}.npy"), json.loads((cache / f"{key}.json").read_text())
    images, prompts = render_dataset(cfg.n_two_characters if two_characters else cfg.n_images, cfg.seed, cfg.size,
                                     cfg.render_chunk, per_identity=cfg.per_identity, shard=shard,
                                     two_characters=two_characters)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / f"{key}.npy", images)
        (cache / f"{key}.json").write_text(json.dumps(prompts))
    return images, prompts


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
        from .model import TOY_MODEL_DIR
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
