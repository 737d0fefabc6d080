"""The training data of the toy model: the seeded rendered data set (one identity drawn several times, or two
characters side by side), its prompts, the two-panel and two-character batches, the cleaner reference panel's
noise and which kind of batch a step trains on (``step_kind``)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import torch

from ...story import StoryImage
from .. import world
from .config import TrainConfig

# ------------------------------------------------------------------------------------------------ data

def all_prompts() -> list[str]:
    """Every prompt of the toy world (the three caption fields joined by spaces, as ``StoryImage.prompt``)."""

    return [StoryImage.parse(world.caption(s, k, a)).prompt
            for s in world.SCENES for k in world.KINDS for a in world.ACTIONS]


def _render_chunk(args: tuple[int, int, int, int, int, bool]) -> tuple[np.ndarray, list[str]]:
    """Render ``n`` examples from the chunk's own seeded generator (independent of the worker count): random
    identities, each drawn ``per_identity`` times in a random scene and action, one after the other; with
    ``two_characters``, ``world.sample_two_example`` images (size x 2 size) from the generator ``[seed, chunk, 2]``."""

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
