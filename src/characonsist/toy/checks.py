"""Is the toy model an instrument? The checks it must pass before any method figure on it counts.

The toy model stands in for FLUX.1 in the one place where consistency can be measured exactly, so it must have
the properties of FLUX.1 that consistency methods rely on, each measured without any consistency method
(docs/TOY_WORLD.md, "The checks"):

1. ``realism``: every named field of vanilla samples reads back (adherence); for one prompt the identity
   attributes vary with the seed (no value of any attribute in more than half of the seeds).
2. ``schedule``: the sampler's sigma at every fraction of the run equals FLUX.1-dev's at 1024x1024 (within
   0.02), so step options written for FLUX fall at the same noise levels; ``commit_times`` says from which step
   on the plain model's x0 prediction shows each identity attribute's final value.
3. ``correspondence``: for two renders of one character in other scenes, sizes and positions, nearest-neighbour
   matching of the single blocks' attention outputs at the mask step (CharaConsist's point matching, without
   its threshold) lands on the same body part (the renderer's part map) for most of the character's tokens.
4. ``in_context``: the model draws one character twice in a two-panel image with the same identity in both
   panels, while two seeds of one prompt agree no more than chance.

Besides them, on request (``--two-characters``, no bar): ``two_characters``, how well two characters of different
kinds in one image (``world.render_two``) read back, and whether their identities leak into each other.

    python -m characonsist.toy.checks --device cuda --json out/toy_checks.json     # all of them
    python -m characonsist.toy.checks --only correspondence,in_context --pairs 60 --panels 48   # a CPU look
    python -m characonsist.toy.checks --only adherence --two-characters 96 --device cuda   # two characters too
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..story import StoryImage
from . import readout, world

NAMED = ("scene", "kind", "position", "size")
ATTRS = tuple(world.ATTRIBUTES)
BARS = {"adherence": 0.99, "max_share": 0.5, "sigma_diff": 0.02, "correspondence": 0.8, "in_context": 0.9}
DIVERSITY_CAPTIONS = (
    "a sunny beach#a cat#big in the middle",
    "a green forest#a robot#small on the left",
    "a grey city#a bird#big on the right",
    "a starry night#a cat#small on the right",
)
OFFICIAL_STEPS = {"share_start": 1, "mask_step": 10, "merge_decay": 11, "merge_end": 31, "share_end": 41}
FLUX_STEPS = 50
TOKEN_PX = 8          # one image token of the toy model covers 8x8 pixels (VAE /4, FLUX's 2x2 packing)


# ------------------------------------------------------------------------------------------------ sampling

def _uint8(images) -> list[np.ndarray]:
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]


def generate(pipe, defaults: dict, prompts: list[str], seeds: list[int], batch: int = 16,
             height: int | None = None, width: int | None = None, steps: int | None = None) -> list[np.ndarray]:
    """Vanilla samples (uint8 HxWx3), one per (prompt, seed), ``batch`` at a time."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompt=prompts[i:i + batch], generator=gens,
                   num_inference_steps=steps or defaults["num_inference_steps"],
                   height=height or defaults["height"], width=width or defaults["width"],
                   guidance_scale=defaults["guidance_scale"], max_sequence_length=defaults["max_sequence_length"],
                   output_type="np").images
        out += _uint8(res)
    return out


def _prompt(caption: str) -> str:
    return StoryImage.parse(caption).prompt


# ------------------------------------------------------------------------------------------------ 1. realism

def adherence(pipe, defaults: dict, n: int = 200, batch: int = 16, seed: int = 1234) -> dict:
    """Vanilla samples of ``n`` random captions: the share whose named fields all read back as captioned."""
    rng = np.random.default_rng(seed)
    truth = [(str(rng.choice(list(world.SCENES))), str(rng.choice(list(world.KINDS))),
              str(rng.choice(list(world.ACTIONS)))) for _ in range(n)]
    images = generate(pipe, defaults, [_prompt(world.caption(*t)) for t in truth], [seed + i for i in range(n)],
                      batch)
    hits = collections.Counter()
    all_ok = 0
    for (scene, kind, action), r in zip(truth, readout.read_batch(images), strict=True):
        size, position = action.split("-")
        ok = {"scene": r["scene"] == scene, "kind": r["kind"] == kind, "position": r["position"] == position,
              "size": r["size"] == size}
        hits.update(f for f in NAMED if ok[f])
        all_ok += all(ok.values())
    return {"n": n, "all_named_correct": all_ok / n, **{f: hits[f] / n for f in NAMED}}


def diversity(pipe, defaults: dict, seeds: int = 64, batch: int = 16) -> dict:
    """For each of ``DIVERSITY_CAPTIONS`` over ``seeds`` seeds: the share of each attribute's commonest value."""
    out = {}
    for cap in DIVERSITY_CAPTIONS:
        reads = readout.read_batch(generate(pipe, defaults, [_prompt(cap)] * seeds, list(range(seeds)), batch))
        row = {}
        for attr in ATTRS:
            value, count = collections.Counter(r[attr] for r in reads).most_common(1)[0]
            row[attr] = {"top": value, "share": count / seeds, "distinct": len({r[attr] for r in reads})}
        out[cap] = row
    out["max_share"] = max(row[a]["share"] for row in out.values() for a in ATTRS)
    return out


# ------------------------------------------------------------------------------------------------ 2. schedule

def sigmas_of(scheduler_config: dict, num_steps: int, image_seq_len: int) -> np.ndarray:
    """The sigmas ``FluxPipeline`` samples with (``num_steps + 1`` values, the last 0), for this many tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    c = sched.config
    mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched.sigmas.double().numpy()


def schedule(pipe, defaults: dict) -> dict:
    """The toy sampler's sigma at each of its steps against FLUX.1-dev's (50 steps, 1024x1024) at the same
    fraction of the run (FLUX's sigmas interpolated linearly between its steps), and at the official steps of
    CharaConsist, rescaled as the methods rescale them (``round(v * N / 50)``)."""
    from .training.networks import FLUX_DEV_SCHEDULER_CONFIG

    n = defaults["num_inference_steps"]
    tokens = (defaults["height"] // TOKEN_PX) * (defaults["width"] // TOKEN_PX)
    toy = sigmas_of(dict(pipe.scheduler.config), n, tokens)
    flux = sigmas_of(FLUX_DEV_SCHEDULER_CONFIG, FLUX_STEPS, 4096)

    def flux_at(fraction: float) -> float:
        return float(np.interp(fraction * FLUX_STEPS, np.arange(FLUX_STEPS + 1), flux))

    rows = [{"step": k, "fraction": k / n, "toy": float(toy[k]), "flux_dev_1024": flux_at(k / n)} for k in range(n)]
    official = {}
    for name, v in OFFICIAL_STEPS.items():
        k = min(int(round(v * n / FLUX_STEPS)), n - 1)
        official[name] = {"flux_step": v, "toy_step": k, "flux_sigma": float(flux[v]), "toy_sigma": float(toy[k])}
    return {"steps": n, "image_tokens": tokens, "rows": rows,
            "max_abs_diff": max(abs(r["toy"] - r["flux_dev_1024"]) for r in rows), "official": official}


@torch.no_grad()
def _decode(pipe, packed: torch.Tensor, height: int, width: int) -> list[np.ndarray]:
    lat = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    img = pipe.vae.decode(lat.to(pipe.vae.dtype)).sample
    return _uint8((img.float() / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())


def commit_times(pipe, defaults: dict, n: int = 64, batch: int = 16, seed: int = 4321) -> dict:
    """From which step on does the plain model show each identity attribute's final value?

    At every step the transformer's prediction ``v`` gives the x0 estimate ``x_t - sigma v`` (rectified flow);
    it is decoded and read. An attribute's commit step is the first step from which every later estimate reads
    the value of the final image. Returned as the share of images committed by each step, per attribute.
    """
    rng = np.random.default_rng(seed)
    captions = [world.caption(str(rng.choice(list(world.SCENES))), str(rng.choice(list(world.KINDS))),
                              str(rng.choice(list(world.ACTIONS)))) for _ in range(n)]
    steps, h, w = defaults["num_inference_steps"], defaults["height"], defaults["width"]
    commit = {a: [] for a in ATTRS}
    for i in range(0, n, batch):
        estimates: list[torch.Tensor] = []

        def hook(module, args, kwargs, output, estimates=estimates):
            sigma = kwargs["timestep"].float().view(-1, 1, 1)
            estimates.append((kwargs["hidden_states"].float() - sigma * output[0].float()).cpu())

        handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
        try:
            finals = generate(pipe, defaults, [_prompt(c) for c in captions[i:i + batch]],
                              [seed + j for j in range(i, min(i + batch, n))], batch)
        finally:
            handle.remove()
        final_reads = readout.read_batch(finals)
        per_step = [readout.read_batch(_decode(pipe, x.to(pipe.device, pipe.transformer.dtype), h, w))
                    for x in estimates]
        for j, final in enumerate(final_reads):
            for a in ATTRS:
                k = steps
                while k > 0 and per_step[k - 1][j][a] == final[a]:
                    k -= 1
                commit[a].append(k)
    table = {a: [float(np.mean([c <= k for c in commit[a]])) for k in range(steps)] for a in ATTRS}
    return {"n": n, "steps": steps, "committed_by_step": table,
            "median_step": {a: float(np.median(commit[a])) for a in ATTRS}, "commit_steps": commit}


# ------------------------------------------------------------------------------------------------ 3. correspondence

def token_parts(parts: np.ndarray, token_px: int = TOKEN_PX) -> np.ndarray:
    """Per image token (row-major, as FLUX packs them): the body part (``world.PARTS`` index) covering most of
    its pixels when the character covers at least half of them, else 0 (scene)."""
    h, w = parts.shape
    blocks = parts.reshape(h // token_px, token_px, w // token_px, token_px).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(-1, token_px * token_px)
    counts = np.stack([(blocks == k).sum(1) for k in range(len(world.PARTS))], 1)
    char = counts[:, 1:].sum(1) * 2 >= token_px * token_px
    label = counts[:, 1:].argmax(1) + 1
    return np.where(char, label, 0)


class _Recorder:
    """An attention processor that keeps the image tokens' attention outputs of the block it wraps."""

    def __init__(self, inner, store: list, text_len: int):
        self.inner, self.store, self.text_len = inner, store, text_len

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        self.store.append(out[:, self.text_len:].float())
        return out


def _encode(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """Packed, scaled VAE latents (B, tokens, 64) of uint8 images, as the transformer sees them."""
    from .training.data import to_pixels

    x = to_pixels(np.stack(images), pipe.device).to(pipe.vae.dtype)
    lat = pipe.vae.encode(x).latent_dist.mean
    lat = (lat - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    b, c, h, w = lat.shape
    return pipe._pack_latents(lat, b, c, h, w)


@torch.no_grad()
def single_block_similarity(pipe, defaults: dict, images: list[np.ndarray], prompts: list[str], sigma: float,
                            seed: int) -> list[torch.Tensor]:
    """Images noised to ``sigma`` with one shared noise (the official one seed for every image), one forward:
    the cosine similarity of each image's tokens to the first image's, per single block, averaged over the
    blocks (``characonsist.match``, Sec. 3.1 of the paper). Returns one (N, N) matrix per image after the first."""
    tr = pipe.transformer
    x0 = _encode(pipe, images)
    noise = torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    xt = (1 - sigma) * x0 + sigma * noise
    embeds, pooled, txt_ids = pipe.encode_prompt(prompts, prompt_2=None, device=pipe.device,
                                                 max_sequence_length=defaults["max_sequence_length"])
    h = w = int(math.isqrt(x0.shape[1]))
    img_ids = pipe._prepare_latent_image_ids(len(images), h, w, pipe.device, x0.dtype)
    store: list[torch.Tensor] = []
    blocks = tr.single_transformer_blocks
    saved = [b.attn.processor for b in blocks]
    for b, p in zip(blocks, saved, strict=True):
        b.attn.set_processor(_Recorder(p, store, embeds.shape[1]))
    try:
        tr(hidden_states=xt.to(tr.dtype), timestep=torch.full((len(images),), sigma, device=pipe.device,
                                                             dtype=tr.dtype),
           guidance=None, pooled_projections=pooled.to(tr.dtype), encoder_hidden_states=embeds.to(tr.dtype),
           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    finally:
        for b, p in zip(blocks, saved, strict=True):
            b.attn.set_processor(p)
    sims = []
    for k in range(1, len(images)):
        per_layer = [F.normalize(o[k], dim=-1) @ F.normalize(o[0], dim=-1).T for o in store]
        sims.append(torch.stack(per_layer).mean(0).cpu())
    return sims


def _pair_scores(sim: torch.Tensor, parts_q: np.ndarray, parts_r: np.ndarray, threshold: float) -> dict:
    """Nearest neighbour of every character token of the query image among all tokens of the reference."""
    q = np.flatnonzero(parts_q)
    best, arg = sim[q].max(dim=1)
    hit = parts_r[arg.numpy()]
    prior_all = np.bincount(parts_r, minlength=len(world.PARTS)) / len(parts_r)
    prior_char = np.bincount(parts_r[parts_r > 0], minlength=len(world.PARTS)) / max(1, int((parts_r > 0).sum()))
    right = hit == parts_q[q]
    per_part = {world.PARTS[k]: [int(right[parts_q[q] == k].sum()), int((parts_q[q] == k).sum())]
                for k in range(1, len(world.PARTS))}
    return {"tokens": int(len(q)), "right_part": int(right.sum()), "to_scene": int((hit == 0).sum()),
            "above_threshold": int((best > threshold).sum()), "per_part": per_part,
            "chance_all": float(sum(prior_all[p] for p in parts_q[q])),
            "chance_character": float(sum(prior_char[p] for p in parts_q[q]))}


def correspondence(pipe, defaults: dict, pairs: int = 240, seed: int = 777, threshold: float = 0.5,
                   batch: int = 16) -> dict:
    """Point matching between two renders of one character (other scene, action, jitter and layout): the share
    of the character's tokens whose nearest neighbour (over all the other image's tokens, as the official
    argmax) is a token of the same body part. Every pair is scored both ways and at the noise level of the mask
    step (official step 10 of 50, rescaled), with one noise for both images (the official shared seed).

    Alongside: ``chance_all``, the expected score of a match drawn uniformly over the other image's tokens, and
    ``chance_character``, over its character tokens only; ``to_scene``, the share matched into the scene; and
    ``above_threshold``, the share whose best similarity passes CharaConsist's ``sim_threshold`` (0.5)."""
    rng = np.random.default_rng(seed)
    n = defaults["num_inference_steps"]
    k = min(int(round(OFFICIAL_STEPS["mask_step"] * n / FLUX_STEPS)), n - 1)
    tokens = (defaults["height"] // TOKEN_PX) * (defaults["width"] // TOKEN_PX)
    sigma = float(sigmas_of(dict(pipe.scheduler.config), n, tokens)[k])
    scenes, kinds, actions = list(world.SCENES), list(world.KINDS), list(world.ACTIONS)
    jobs = []
    for i in range(pairs):
        ch = world.sample_character(rng, kinds[i % len(kinds)])
        same = i % 4 == 3                                   # a quarter of the pairs keep the scene
        sa = str(rng.choice(scenes))
        sb = sa if same else str(rng.choice([s for s in scenes if s != sa]))
        aa = str(rng.choice(actions))
        ab = str(rng.choice([a for a in actions if a != aa]))
        ia, _, pa = world.render(sa, ch, aa, rng=rng, return_mask=True, return_parts=True)
        ib, _, pb = world.render(sb, ch, ab, rng=rng, return_mask=True, return_parts=True)
        jobs.append((ch.kind, sa, sb, aa, ab, ia, ib, token_parts(pa), token_parts(pb)))
    rows = []
    for j0 in range(0, len(jobs), batch):
        for kind, sa, sb, aa, ab, ia, ib, ta, tb in jobs[j0:j0 + batch]:
            prompts = [_prompt(world.caption(sa, kind, aa)), _prompt(world.caption(sb, kind, ab))]
            (sim,) = single_block_similarity(pipe, defaults, [ia, ib], prompts, sigma, seed + len(rows))
            # sim: (tokens of b, tokens of a); both directions
            ab_scores = _pair_scores(sim, tb, ta, threshold)
            ba_scores = _pair_scores(sim.T, ta, tb, threshold)
            both = {key: ab_scores[key] + ba_scores[key] for key in ab_scores if key != "per_part"}
            both["per_part"] = {p: [ab_scores["per_part"][p][0] + ba_scores["per_part"][p][0],
                                    ab_scores["per_part"][p][1] + ba_scores["per_part"][p][1]]
                                for p in ab_scores["per_part"]}
            rows.append({"kind": kind, "scenes": [sa, sb], "actions": [aa, ab], "same_scene": sa == sb, **both})

    def agg(sel) -> dict:
        t = sum(r["tokens"] for r in sel)
        if not t:
            return {}
        parts = {p: [sum(r["per_part"][p][0] for r in sel), sum(r["per_part"][p][1] for r in sel)]
                 for p in world.PARTS[1:]}
        return {"pairs": len(sel), "tokens": t, "right_part": sum(r["right_part"] for r in sel) / t,
                "by_part": {p: (right / n if n else None) for p, (right, n) in parts.items()},
                "to_scene": sum(r["to_scene"] for r in sel) / t,
                "above_threshold": sum(r["above_threshold"] for r in sel) / t,
                "chance_all": sum(r["chance_all"] for r in sel) / t,
                "chance_character": sum(r["chance_character"] for r in sel) / t}

    other = [r for r in rows if not r["same_scene"]]
    by_scene = {f"{a}/{b}": agg([r for r in other if sorted(r["scenes"]) == [a, b]])
                for i, a in enumerate(scenes) for b in scenes[i + 1:]}
    return {"sigma": sigma, "step": k, "pairs": pairs, "other_scene": agg(other),
            "same_scene": agg([r for r in rows if r["same_scene"]]),
            "by_kind": {kd: agg([r for r in other if r["kind"] == kd]) for kd in kinds},
            "by_scene_pair": by_scene, "rows": rows}


# ------------------------------------------------------------------------------------------------ 4. in-context identity

def read_panels(image: np.ndarray) -> tuple[dict, dict]:
    """Readouts of the two panels of a two-panel image (side by side when wider than tall, else stacked)."""
    return readout.read_pairs([image])[0]


def _agree(a: dict, b: dict) -> bool:
    return all(a[x] == b[x] for x in ATTRS)


def chance_per_attribute(reads: list[dict]) -> dict[str, float]:
    """Per attribute, the agreement two independent draws would have, from its marginal frequencies."""
    return {a: float(((np.array(list(collections.Counter(r[a] for r in reads).values()), float) / len(reads))
                      ** 2).sum()) for a in ATTRS}


def chance_agreement(reads: list[dict]) -> float:
    """The all-four agreement two independent draws would have, from the attributes' marginal frequencies."""
    return math.prod(chance_per_attribute(reads).values())


def in_context(pipe, defaults: dict, n: int = 200, seed: int = 99, batch: int = 16) -> dict:
    """Two-panel images (``train.two_panel_prompt`` of two captions of one kind, in other scenes and actions;
    half side by side, half stacked): the share whose panels read the same four identity attributes, against
    two single images of the same two captions from two seeds (which must agree no more than chance)."""
    from .training.data import two_panel_prompt

    rng = np.random.default_rng(seed)
    scenes, actions = list(world.SCENES), list(world.ACTIONS)
    caps = []
    for i in range(n):
        kind = list(world.KINDS)[i % len(world.KINDS)]
        sa = str(rng.choice(scenes))
        sb = str(rng.choice([s for s in scenes if s != sa]))
        aa = str(rng.choice(actions))
        ab = str(rng.choice([a for a in actions if a != aa]))
        caps.append((world.caption(sa, kind, aa), world.caption(sb, kind, ab)))
    h, w = defaults["height"], defaults["width"]
    reads = []
    for vertical in (False, True):
        sel = [(i, c) for i, c in enumerate(caps) if (i % 2 == 1) == vertical]
        images = generate(pipe, defaults, [two_panel_prompt(_prompt(a), _prompt(b)) for _, (a, b) in sel],
                          [seed + i for i, _ in sel], batch, height=2 * h if vertical else h,
                          width=w if vertical else 2 * w)
        for (i, (a, b)), img in zip(sel, images, strict=True):
            ra, rb = read_panels(img)
            truth = {tuple(world.parse_caption(a)), tuple(world.parse_caption(b))}
            got = {(r["scene"], r["kind"], r["action"]) for r in (ra, rb)}
            reads.append({"index": i, "vertical": vertical, "panels": [ra, rb], "agree": _agree(ra, rb),
                          "named_correct": got == truth})
    singles_a = readout.read_batch(generate(pipe, defaults, [_prompt(a) for a, _ in caps],
                                            [seed + 10_000 + i for i in range(n)], batch))
    singles_b = readout.read_batch(generate(pipe, defaults, [_prompt(b) for _, b in caps],
                                            [seed + 20_000 + i for i in range(n)], batch))
    per_attr = {a: float(np.mean([r["panels"][0][a] == r["panels"][1][a] for r in reads])) for a in ATTRS}
    return {"n": n, "agree_all_four": float(np.mean([r["agree"] for r in reads])), "agree_per_attribute": per_attr,
            "agree_side_by_side": float(np.mean([r["agree"] for r in reads if not r["vertical"]])),
            "agree_stacked": float(np.mean([r["agree"] for r in reads if r["vertical"]])),
            "panels_named_correct": float(np.mean([r["named_correct"] for r in reads])),
            "two_seeds_agree": float(np.mean([_agree(a, b) for a, b in zip(singles_a, singles_b, strict=True)])),
            "two_seeds_per_attribute": {a: float(np.mean([x[a] == y[a] for x, y in zip(singles_a, singles_b, strict=True)]))
                                        for a in ATTRS},
            "chance": chance_agreement(singles_a + singles_b), "rows": reads}


def _other_scene_cases(rng: np.random.Generator, n: int):
    """``n`` random characters (kinds in turn), each with two different scenes and two different actions:
    ``(character, scene_a, scene_b, action_a, action_b)``, drawn one case after the other from ``rng``."""
    scenes, actions = list(world.SCENES), list(world.ACTIONS)
    for i in range(n):
        ch = world.sample_character(rng, list(world.KINDS)[i % len(world.KINDS)])
        sa = str(rng.choice(scenes))
        sb = str(rng.choice([x for x in scenes if x != sa]))
        aa = str(rng.choice(actions))
        ab = str(rng.choice([x for x in actions if x != aa]))
        yield ch, sa, sb, aa, ab


class _ReferenceHold:
    """Puts the left panel of packed two-panel latents back on its true trajectory at ``sigma``:
    ``(1 - sigma) x0 + sigma n`` with the reference's latents ``x0`` and its fixed noise ``n`` (inpainting)."""

    def __init__(self, pipe, ref: torch.Tensor, noise: torch.Tensor, height: int, width: int):
        self.pipe, self.ref, self.noise, self.height, self.width = pipe, ref, noise, height, width

    def __call__(self, packed: torch.Tensor, sigma: float) -> torch.Tensor:
        z = self.pipe._unpack_latents(packed, self.height, 2 * self.width, self.pipe.vae_scale_factor).clone()
        z[..., :self.ref.shape[-1]] = (1 - sigma) * self.ref + sigma * self.noise
        return self.pipe._pack_latents(z, *z.shape)


@torch.no_grad()
def copy_given(pipe, defaults: dict, n: int = 96, seed: int = 31337, batch: int = 16) -> dict:
    """Can the model copy a given character? (no bar; the curve to follow while training.)

    A two-panel image whose left panel is a render of a known character, held on its true trajectory (the
    render's latents re-noised to the sampler's sigma after every step, as in inpainting), and whose right
    panel is generated from noise, with the two-panel prompt of both captions (other scene and action). Scored:
    the share of right panels whose four unnamed attributes equal the render's (``all_four``, per attribute),
    and whose named fields are the right caption's. Check 4 has both panels generated jointly; this isolates
    reading an appearance that is already there, which is what a frame does with a picture as the identity.
    """
    from .training.data import two_panel_prompt

    rng = np.random.default_rng(seed)
    h, w = defaults["height"], defaults["width"]
    cases = [(*case, world.render(case[1], case[0], case[3], rng=rng)) for case in _other_scene_cases(rng, n)]
    hits, rows = [], []
    for j in range(0, n, batch):
        part = cases[j:j + batch]
        b = len(part)
        ref = _encode(pipe, [c[5] for c in part])                          # (b, tokens, 64) packed
        lat_h, lat_w = 2 * (h // pipe.vae_scale_factor // 2), 2 * (w // pipe.vae_scale_factor // 2)
        gen = torch.Generator().manual_seed(seed + j)
        noise = torch.randn((b, 16, lat_h, 2 * lat_w), generator=gen).to(pipe.device, ref.dtype)
        ref_lat = pipe._unpack_latents(ref, h, w, pipe.vae_scale_factor)   # (b, 16, lat_h, lat_w)

        hold = _ReferenceHold(pipe, ref_lat, noise[..., :ref_lat.shape[-1]], h, w)
        start = hold(pipe._pack_latents(noise, b, 16, lat_h, 2 * lat_w), 1.0)

        def cb(p, i, t, kw, hold=hold):
            return {"latents": hold(kw["latents"], float(p.scheduler.sigmas[i + 1]))}

        prompts = [two_panel_prompt(_prompt(world.caption(sa, c.kind, aa)), _prompt(world.caption(sb, c.kind, ab)))
                   for c, sa, sb, aa, ab, _ in part]
        out = pipe(prompt=prompts, latents=start, num_inference_steps=defaults["num_inference_steps"], height=h,
                   width=2 * w, guidance_scale=defaults["guidance_scale"],
                   max_sequence_length=defaults["max_sequence_length"], output_type="np",
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images
        for (c, _, sb, _, ab, _), img in zip(part, _uint8(out), strict=True):
            _, right = read_panels(img)
            truth = c.attributes()
            ok = {a: right[a] == truth[a] for a in ATTRS}
            hits.append(all(ok.values()))
            rows.append({"truth": truth, "right": {k: right[k] for k in (*ATTRS, "scene", "kind", "action")},
                         "ok": ok, "named_correct": (right["scene"], right["kind"], right["action"]) == (sb, c.kind, ab)})
    return {"n": n, "all_four": float(np.mean(hits)),
            "per_attribute": {a: float(np.mean([r["ok"][a] for r in rows])) for a in ATTRS},
            "named_correct": float(np.mean([r["named_correct"] for r in rows])), "rows": rows}


class _AttentionProbe:
    """A processor for a single block that runs the stock attention and keeps, per head, the attention
    probabilities (after RoPE, softmax over every key) of the image queries over the image keys."""

    def __init__(self, inner, store: list, text_len: int):
        self.inner, self.store, self.text_len = inner, store, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from ..backbones.flux1 import project as _project
        from ..rope import apply_rope

        q, k, _ = _project(attn, hidden_states, None)
        q, k = apply_rope(q, image_rotary_emb), apply_rope(k, image_rotary_emb)
        logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        t = self.text_len
        self.store.append(logits.softmax(-1)[:, :, t:, t:].cpu())       # (B, H, image queries, image keys)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@torch.no_grad()
def panel_attention(pipe, defaults: dict, n: int = 24, seed: int = 4040, sigmas: tuple[float, ...] | None = None) -> dict:
    """Where the second instance of a character looks (no bar; a diagnosis: docs/TOY_WORLD.md, "Training round 4").

    Two renders of one character (other scenes and actions) side by side, noised with one noise to ``sigma``
    (by default the mask step's, official step 10 of 50 rescaled, and 0.5), the two-panel prompt, one forward.
    For every single block and head: of the attention of one panel's character tokens, the share that goes to
    the other panel's character tokens (``to_other_char``), against the share those tokens would get from
    uniform attention over every key (``uniform``; text keys included); and ``right_part``, how often the
    query's most attended token of the other panel is on the same body part (the renderer's part map). Both
    directions are pooled. A head that carries appearance from one instance to the other has a ratio well above
    1 and a high ``right_part``.
    """
    from .training.data import two_panel_prompt

    rng = np.random.default_rng(seed)
    n_steps = defaults["num_inference_steps"]
    h, w = defaults["height"], defaults["width"]
    if sigmas is None:
        k_step = min(int(round(OFFICIAL_STEPS["mask_step"] * n_steps / FLUX_STEPS)), n_steps - 1)
        tokens = (h // TOKEN_PX) * (w // TOKEN_PX)
        sigmas = (float(sigmas_of(dict(pipe.scheduler.config), n_steps, tokens)[k_step]), 0.5)
    tr = pipe.transformer
    blocks = tr.single_transformer_blocks
    gh, gw = h // TOKEN_PX, w // TOKEN_PX
    out = {}
    for sigma in sigmas:
        acc = None
        for i, (ch, sa, sb, aa, ab) in enumerate(_other_scene_cases(rng, n)):
            ia, _, pa = world.render(sa, ch, aa, rng=rng, return_mask=True, return_parts=True)
            ib, _, pb = world.render(sb, ch, ab, rng=rng, return_mask=True, return_parts=True)
            parts = np.concatenate([token_parts(pa).reshape(gh, gw), token_parts(pb).reshape(gh, gw)], 1).ravel()
            panel = np.tile(np.arange(2 * gw) >= gw, gh)                        # token in the right panel
            x0 = _encode(pipe, [np.concatenate([ia, ib], 1)])
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + i)).to(x0)
            xt = (1 - sigma) * x0 + sigma * noise
            prompt = two_panel_prompt(_prompt(world.caption(sa, ch.kind, aa)), _prompt(world.caption(sb, ch.kind, ab)))
            embeds, pooled, txt_ids = pipe.encode_prompt([prompt], prompt_2=None, device=pipe.device,
                                                         max_sequence_length=defaults["max_sequence_length"])
            img_ids = pipe._prepare_latent_image_ids(1, gh, 2 * gw, pipe.device, x0.dtype)
            store: list[torch.Tensor] = []
            saved = [b.attn.processor for b in blocks]
            for b, p in zip(blocks, saved, strict=True):
                b.attn.set_processor(_AttentionProbe(p, store, embeds.shape[1]))
            try:
                tr(hidden_states=xt.to(tr.dtype), timestep=torch.full((1,), sigma, device=pipe.device, dtype=tr.dtype),
                   guidance=None, pooled_projections=pooled.to(tr.dtype), encoder_hidden_states=embeds.to(tr.dtype),
                   txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
            finally:
                for b, p in zip(blocks, saved, strict=True):
                    b.attn.set_processor(p)
            probs = torch.stack([s[0] for s in store])                          # (blocks, H, Nimg, Nimg)
            total_keys = embeds.shape[1] + len(parts)
            sums = []
            for side in (False, True):                                          # queries in the left, then right
                q = np.flatnonzero((parts > 0) & (panel == side))
                other = np.flatnonzero(panel != side)
                other_char = np.flatnonzero((parts > 0) & (panel != side))
                pq = probs[:, :, q]                                             # (blocks, H, |q|, Nimg)
                mass = pq[..., other_char].sum(-1).sum(-1)                      # summed over the queries
                best = other[pq[..., other].argmax(-1).numpy()]                 # (blocks, H, |q|)
                right = (parts[best] == parts[q][None, None]).sum(-1)
                sums.append((mass, torch.as_tensor(right, dtype=torch.float64), len(q),
                             len(other_char) / total_keys * len(q)))
            row = [sum(x[j] for x in sums) for j in range(4)]
            acc = row if acc is None else [a + r for a, r in zip(acc, row, strict=True)]
        mass, right, nq, uniform = acc
        to_other = (mass / nq).double()
        out[f"{sigma:.3f}"] = {
            "to_other_char": to_other.tolist(), "uniform": uniform / nq, "right_part": (right / nq).tolist(),
            "best_ratio": float(to_other.max() / (uniform / nq)),
            "best_head": [int(x) for x in np.unravel_index(int(to_other.argmax()), tuple(to_other.shape))],
            "mean_ratio": float(to_other.mean() / (uniform / nq)), "queries": int(nq)}
    return {"n": n, "sigmas": [float(s) for s in sigmas], "by_sigma": out}


# ------------------------------------------------------------------------------------------------ two characters

TWO_ADHERENCE = ("all_named", "scene", "kinds", "kinds_in_order", "actions", "bound")


def two_character_row(truth: tuple, reads: tuple[dict, dict]) -> dict:
    """One two-character image's (left, right) readout against its truth (scene, kinds, actions): the adherence
    flags of :data:`TWO_ADHERENCE` (see :func:`two_characters`) and ``same``, per attribute, whether the two
    characters read the same value."""
    scene, kinds, actions = truth
    got_kinds = tuple(r["kind"] for r in reads)
    got_actions = tuple(r["action"] for r in reads)
    ok = {"scene": all(r["scene"] == scene for r in reads),
          "kinds": sorted(got_kinds) == sorted(kinds), "kinds_in_order": got_kinds == tuple(kinds),
          "actions": sorted(got_actions) == sorted(actions),
          "bound": sorted(zip(got_kinds, got_actions, strict=True)) == sorted(zip(kinds, actions, strict=True))}
    ok["all_named"] = ok["scene"] and ok["bound"]
    return {**ok, "same": {a: reads[0][a] == reads[1][a] for a in ATTRS}}


def score_two_characters(truths: list, images: list[np.ndarray]) -> dict:
    """Read two-character images half by half (``readout.read_pairs``) and score them against their truths
    (scene, kinds, actions), the i-th character in the i-th half; see :func:`two_characters`."""
    pairs, conf = readout.read_pairs(images, confidence=True)
    rows = []
    for (scene, kinds, actions), reads, cf in zip(truths, pairs, conf, strict=True):
        rows.append({"caption": world.two_caption(scene, kinds, actions), "reads": list(reads),
                     **two_character_row((scene, kinds, actions), reads),
                     "unsure": [min(c.values()) < 0.9 for c in cf]})
    chars = [r for row in rows for r in row["reads"]]
    return {"n": len(rows),
            "adherence": {k: float(np.mean([r[k] for r in rows]))
                          for k in TWO_ADHERENCE},
            "same_attribute": {a: float(np.mean([r["same"][a] for r in rows])) for a in ATTRS},
            "same_all_four": float(np.mean([all(r["same"].values()) for r in rows])),
            "chance_attribute": chance_per_attribute(chars), "chance_all_four": chance_agreement(chars),
            "unsure": float(np.mean([u for r in rows for u in r["unsure"]])), "rows": rows}


def two_characters(pipe, defaults: dict, n: int = 200, seed: int = 55, batch: int = 16) -> dict:
    """Two characters of different kinds in one image (``world.two_caption`` prompts, vanilla samples at the
    model's height and twice its width, each half read on its own): do both characters' named fields read back,
    and do their unnamed attributes leak from one to the other? No bar; a measure for
    multi-character stories.

    Adherence, per image: ``scene`` (both halves), ``kinds`` (the halves' kinds are the caption's two, in either
    order), ``kinds_in_order`` (the first-named on the left), ``actions`` (the halves' actions are the caption's
    two, either way round), ``bound`` (each half's kind and action are one caption character's: the pairing too),
    and ``all_named`` (scene and bound). The toy text encoders give the model a bag of words: it cannot know which
    kind is named first or which action goes with which kind, so ``kinds_in_order`` and ``bound`` given
    ``kinds`` and ``actions`` have a ceiling of chance unless the text encoder changes.

    Leak: the share of images whose two characters read the same value of each attribute (and of all four), against
    the chance agreement from the attributes' frequencies over all characters read: the renders draw the two
    identities independently, so agreement above chance is one character's identity copied onto the other.
    ``unsure``: the share of characters whose least sure field has a softmax probability under 0.9."""
    rng = np.random.default_rng(seed)
    truths = [world.sample_two_fields(rng) for _ in range(n)]
    images = generate(pipe, defaults, [_prompt(world.two_caption(*t)) for t in truths],
                      [seed + i for i in range(n)], batch, width=2 * defaults["width"])
    return {**score_two_characters(truths, images), "width": 2 * defaults["width"], "height": defaults["height"]}


# ------------------------------------------------------------------------------------------------ report

def verdicts(result: dict) -> dict[str, bool]:
    """Each check's pass/fail against its bar (``BARS``), for the parts that ran."""
    out = {}
    if "adherence" in result:
        out["adherence"] = result["adherence"]["all_named_correct"] >= BARS["adherence"]
    if "diversity" in result:
        out["diversity"] = result["diversity"]["max_share"] <= BARS["max_share"]
    if "schedule" in result:
        out["schedule"] = result["schedule"]["max_abs_diff"] <= BARS["sigma_diff"]
    if "correspondence" in result and result["correspondence"]["other_scene"]:
        out["correspondence"] = result["correspondence"]["other_scene"]["right_part"] >= BARS["correspondence"]
    if "in_context" in result:
        ic = result["in_context"]
        out["in_context"] = ic["agree_all_four"] >= BARS["in_context"] and ic["two_seeds_agree"] <= 2 * ic["chance"] + 0.02
    return out


def format_report(result: dict) -> str:
    pct = lambda x: f"{100 * x:5.1f}%"   # noqa: E731
    lines = []
    if "adherence" in result:
        a = result["adherence"]
        lines.append(f"1. adherence: {pct(a['all_named_correct'])} of {a['n']} vanilla samples with every named field "
                     f"right ({', '.join(f'{f} {pct(a[f])}' for f in NAMED)}); bar >= {pct(BARS['adherence'])}")
    if "diversity" in result:
        d = result["diversity"]
        lines.append(f"   diversity: most common value's share at most {d['max_share']:.2f} (bar <= 0.5)")
        for cap in DIVERSITY_CAPTIONS:
            lines.append(f"     {cap}: " + ", ".join(f"{a} {d[cap][a]['share']:.2f}" for a in ATTRS))
    if "schedule" in result:
        s = result["schedule"]
        lines.append(f"2. schedule: max |sigma_toy - sigma_FLUX.1-dev@1024| = {s['max_abs_diff']:.4f} over "
                     f"{s['steps']} steps (bar <= 0.02); official steps: " + ", ".join(
                         f"{k} {v['flux_step']}->{v['toy_step']} (sigma {v['flux_sigma']:.3f} vs {v['toy_sigma']:.3f})"
                         for k, v in s["official"].items()))
    if "commit_times" in result:
        c = result["commit_times"]
        lines.append(f"   commit times ({c['n']} vanilla images): share of images whose x0 estimate shows the final "
                     "value from this step on")
        lines.append("     step        " + "".join(f"{k:>5}" for k in range(c["steps"])))
        for a in ATTRS:
            lines.append(f"     {a:<12}" + "".join(f"{100 * v:5.0f}" for v in c["committed_by_step"][a]))
    if "correspondence" in result:
        c = result["correspondence"]
        lines.append(f"3. correspondence at step {c['step']} (sigma {c['sigma']:.3f}), {c['pairs']} pairs, both ways:")
        for label in ("other_scene", "same_scene"):
            r = c[label]
            if r:
                lines.append(f"     {label:<12} right part {pct(r['right_part'])} of {r['tokens']} tokens "
                             f"(chance {pct(r['chance_all'])}, among character tokens {pct(r['chance_character'])});"
                             f" into the scene {pct(r['to_scene'])}; best sim > 0.5: {pct(r['above_threshold'])}")
        lines.append("     by kind (other scene): " + ", ".join(f"{k} {pct(v['right_part'])}"
                                                                  for k, v in c["by_kind"].items() if v))
        if c["other_scene"]:
            lines.append("     by body part (other scene): " + ", ".join(
                f"{p} {pct(v)}" for p, v in c["other_scene"]["by_part"].items() if v is not None))
        lines.append("     by scene pair: " + ", ".join(f"{k} {pct(v['right_part'])}"
                                                       for k, v in c["by_scene_pair"].items() if v))
    if "in_context" in result:
        c = result["in_context"]
        lines.append(f"4. in-context: {pct(c['agree_all_four'])} of {c['n']} two-panel images agree on all four "
                     f"(side by side {pct(c['agree_side_by_side'])}, stacked {pct(c['agree_stacked'])}; "
                     + ", ".join(f"{a} {pct(v)}" for a, v in c["agree_per_attribute"].items())
                     + f"); panels' named fields {pct(c['panels_named_correct'])}; two seeds of one prompt "
                     f"{pct(c['two_seeds_agree'])} (chance {pct(c['chance'])})")
    if "panel_attention" in result:
        c = result["panel_attention"]
        for sg, r in c["by_sigma"].items():
            blk, head = r["best_head"]
            lines.append(f"panel attention (no bar) at sigma {sg}, {c['n']} two-panel renders: character tokens give the "
                         f"other panel's character {r['mean_ratio']:.2f}x uniform on average over blocks and heads, "
                         f"{r['best_ratio']:.2f}x in the best (single block {blk}, head {head}: "
                         f"{pct(r['to_other_char'][blk][head])} of its attention, right part "
                         f"{pct(r['right_part'][blk][head])})")
    if "copy" in result:
        c = result["copy"]
        lines.append(f"copy (no bar): given a render on the left, {pct(c['all_four'])} of {c['n']} right panels take "
                     "all four of its attributes (" + ", ".join(f"{a} {pct(v)}" for a, v in c["per_attribute"].items())
                     + f"); right panels' named fields {pct(c['named_correct'])}")
    if "two_characters" in result:
        c = result["two_characters"]
        a = c["adherence"]
        lines.append(f"two characters ({c['n']} images of {c['width']}x{c['height']}, no bar): every named field "
                     f"{pct(a['all_named'])} (scene {pct(a['scene'])}, kinds {pct(a['kinds'])}, in order "
                     f"{pct(a['kinds_in_order'])}, actions {pct(a['actions'])}, bound to their kinds "
                     f"{pct(a['bound'])}); unsure {pct(c['unsure'])}")
        lines.append(f"   leak: both characters read the same all four {pct(c['same_all_four'])} (chance "
                     f"{pct(c['chance_all_four'])}); " + ", ".join(
                         f"{x} {pct(c['same_attribute'][x])} ({pct(c['chance_attribute'][x])})" for x in ATTRS))
    v = verdicts(result)
    if v:
        lines.append("verdict: " + ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in v.items()))
    return "\n".join(lines)


PARTS_OF_RUN = ("adherence", "diversity", "schedule", "commit_times", "correspondence", "in_context")
EXTRA_PARTS = ("two_characters", "copy", "panel_attention")      # measured on request only (no bar)


def main(argv: list[str] | None = None) -> int:
    from .model import TOY_MODEL_DIR, load_toy_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(TOY_MODEL_DIR))
    ap.add_argument("--only", default=",".join(PARTS_OF_RUN),
                    help="comma list of: " + ", ".join(PARTS_OF_RUN + EXTRA_PARTS))
    ap.add_argument("--n", type=int, default=200, help="captions for adherence")
    ap.add_argument("--seeds", type=int, default=64, help="seeds per diversity prompt")
    ap.add_argument("--commit-n", type=int, default=64, help="images for the commit times")
    ap.add_argument("--pairs", type=int, default=240, help="render pairs for correspondence")
    ap.add_argument("--panels", type=int, default=200, help="two-panel images for in-context identity")
    ap.add_argument("--two-characters", type=int, nargs="?", const=200, default=None, metavar="N",
                    help="also the two-character measure, on N images (default 200)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS_OF_RUN + EXTRA_PARTS)
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join(PARTS_OF_RUN + EXTRA_PARTS)}")
    if args.two_characters is not None and "two_characters" not in parts:
        parts.append("two_characters")
    pipe, defaults = load_toy_pipeline(device=args.device, path=args.model_dir)
    result: dict = {"model_dir": args.model_dir, "device": args.device, "defaults": defaults, "seconds": {}}
    runs = {"adherence": lambda: adherence(pipe, defaults, args.n, args.batch),
            "diversity": lambda: diversity(pipe, defaults, args.seeds, args.batch),
            "schedule": lambda: schedule(pipe, defaults),
            "commit_times": lambda: commit_times(pipe, defaults, args.commit_n, args.batch),
            "correspondence": lambda: correspondence(pipe, defaults, args.pairs, batch=args.batch),
            "in_context": lambda: in_context(pipe, defaults, args.panels, batch=args.batch),
            "two_characters": lambda: two_characters(pipe, defaults, args.two_characters or 200, batch=args.batch),
            "copy": lambda: copy_given(pipe, defaults, args.panels, batch=args.batch),
            "panel_attention": lambda: panel_attention(pipe, defaults, min(args.pairs, 48))}
    for part in parts:
        t = time.perf_counter()
        result[part] = runs[part]()
        result["seconds"][part] = time.perf_counter() - t
        print(format_report({part: result[part]}).split("\nverdict")[0], flush=True)
    result["verdicts"] = verdicts(result)
    print("verdict: " + ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in result["verdicts"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
