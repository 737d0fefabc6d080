"""The toy world's readout: a small CNN, trained on renders, that reads every field back from an image.

It reads the scene, the kind, the position and size (the action is ``size-position``) and the four identity
attributes. It is trained on clean renders and on renders degraded the way a small VAE and a few diffusion
steps degrade them (:func:`degrade_batch`: small shifts, blur, 2x down/up-sampling, colour gain and offset,
noise), so it also reads generated images. Train (seeded) and measure::

    python -m characonsist.toy.readout train        # CPU defaults: 2500 steps of 48, a 6000-render pool
    python -m characonsist.toy.readout train --steps 4000 --batch 128 --pool 24000 --workers 14 --device cuda
    python -m characonsist.toy.readout eval --n 2000 --strength 1 1.5 2

The shipped weights (float16, ``readout_weights/readout.pt``, under 1 MB, loaded on first use) come from the
second command (4 minutes on one H100); docs/TOY_WORLD.md has the measured accuracy.
"""

from __future__ import annotations

import argparse
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import world

HEADS: dict[str, tuple[str, ...]] = {f: v for f, v in world.FIELDS.items() if f != "action"}
WEIGHTS = Path(__file__).parent / "readout_weights" / "readout.pt"
SIZE = 128


class ReadoutNet(nn.Module):
    """Four stride-2 conv layers (128 -> 8) and a linear layer per field over the flattened 8x8 map."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = (3, width, width, 2 * width, 2 * width)
        layers = []
        for i in range(4):
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(chans[i], chans[i + 1], k, stride=2, padding=k // 2),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.squeeze = nn.Conv2d(chans[-1], 32, 1)  # keeps the 8x8 layout (position) at a small flat size
        self.hidden = nn.Linear(32 * 8 * 8, 192)
        self.heads = nn.ModuleDict({f: nn.Linear(192, len(v)) for f, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: float (N, 3, 128, 128) in [0, 1]; returns logits per field."""
        h = F.relu(self.squeeze(self.features(x - 0.5)))
        h = F.relu(self.hidden(h.flatten(1)))
        return {f: head(h) for f, head in self.heads.items()}


# ---------------------------------------------------------------- degradation

def degrade_batch(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Degrade float images (N, 3, H, W) in [0, 1] like a small VAE + sampler: shift <= 3 px, blur sigma <= 1.5,
    2x down/up-sampling (p = 0.3), per-channel gain 0.9-1.1 and offset +-0.05, noise sigma <= 0.04."""
    n, c, h, w = x.shape

    dev = x.device  # random draws come from the CPU generator, the arithmetic runs where x is

    def u(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen)).to(dev)

    pad = 3
    xp = F.pad(x, (pad,) * 4, mode="replicate")
    dx = torch.randint(-pad, pad + 1, (n,), generator=gen) if strength > 0 else torch.zeros(n, dtype=torch.long)
    dy = torch.randint(-pad, pad + 1, (n,), generator=gen) if strength > 0 else torch.zeros(n, dtype=torch.long)
    x = torch.stack([xp[i, :, pad + dy[i]:pad + dy[i] + h, pad + dx[i]:pad + dx[i] + w] for i in range(n)])

    sigma = u(0.05, 1.5 * strength + 0.05)
    r = 4
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=dev)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)          # (n*c, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=n * c)
    x = y.reshape(n, c, h, w)

    resample = (torch.rand(n, generator=gen) < 0.3 * strength).to(dev)
    if resample.any():
        small = F.avg_pool2d(x[resample], 2)
        x[resample] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)

    gain = u(1 - 0.1 * strength, 1 + 0.1 * strength, n, c, 1, 1)
    offset = u(-0.05 * strength, 0.05 * strength, n, c, 1, 1)
    x = x * gain + offset
    noise = u(0, 0.04 * strength)[:, None, None, None]
    x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x.clamp(0, 1)


def degrade(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """One uint8 image through :func:`degrade_batch` (seeded from ``rng``)."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x = degrade_batch(_to_tensor([image]), gen, strength)
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------- reading

def _to_tensor(images, resize: bool = True) -> torch.Tensor:
    """uint8 HxWx3 arrays or PIL images -> float (N, 3, 128, 128) in [0, 1] (without ``resize``: at their own
    size, which must be one size)."""
    out = []
    for im in images:
        if not isinstance(im, np.ndarray):
            im = np.asarray(im.convert("RGB"))
        if im.dtype != np.uint8:  # float images in [0, 1] (diffusers output_type="np")
            im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        if resize and im.shape[:2] != (SIZE, SIZE):
            im = np.asarray(Image.fromarray(im[..., :3]).resize((SIZE, SIZE), Image.BILINEAR))
        out.append(torch.from_numpy(np.array(im[..., :3])))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


_NET: ReadoutNet | None = None


def load_readout(path: str | Path | None = None) -> ReadoutNet:
    """The readout network (the shipped weights unless ``path``), in eval mode, float32."""
    global _NET
    if path is None and _NET is not None:
        return _NET
    p = Path(path) if path is not None else WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"no readout weights at {p}; train them: python -m characonsist.toy.readout train")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    net = ReadoutNet(ckpt["width"])
    net.load_state_dict({k: v.float() for k, v in ckpt["state"].items()})
    net.eval()
    if path is None:
        _NET = net
    return net


@torch.no_grad()
def read_batch(images, net: ReadoutNet | None = None, batch: int = 64, confidence: bool = False):
    """Read every field of each image (uint8 HxWx3 arrays, float arrays in [0, 1], or PIL images).

    With ``confidence`` also return, per image, a dict of the softmax probability of each field's answer
    (``action``: the product of size and position); low values flag images unlike any render.
    """
    net = net or load_readout()
    images = list(images)
    out, conf = [], []
    for i in range(0, len(images), batch):
        logits = net(_to_tensor(images[i:i + batch]))
        probs = {f: lg.softmax(1).max(1) for f, lg in logits.items()}
        for j in range(len(probs["scene"][0])):
            d = {f: HEADS[f][int(probs[f][1][j])] for f in HEADS}
            d["action"] = f"{d['size']}-{d['position']}"
            out.append({f: d[f] for f in world.FIELDS})
            c = {f: float(probs[f][0][j]) for f in HEADS}
            c["action"] = c["size"] * c["position"]
            conf.append({f: c[f] for f in world.FIELDS})
    return (out, conf) if confidence else out


def read(image) -> dict[str, str]:
    """Every field of one image: scene, kind, action, position, size and the identity attributes."""
    return read_batch([image])[0]


def split_pair(image) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of a two-panel or two-character image (uint8 or float array, or PIL image): left and right
    when it is wider than tall, else top and bottom."""
    im = np.asarray(image.convert("RGB")) if not isinstance(image, np.ndarray) else image
    h, w = im.shape[:2]
    return (im[:, : w // 2], im[:, w // 2:]) if w > h else (im[: h // 2], im[h // 2:])


def read_pairs(images, net: ReadoutNet | None = None, batch: int = 64, confidence: bool = False):
    """Read both halves of each two-panel or two-character image (``split_pair``; e.g. ``world.render_two``'s
    256x128 images: each half a 128x128 view of one character): a list of (first, second) field dicts, and with
    ``confidence`` a list of (first, second) confidence dicts as well (see ``read_batch``)."""
    halves = [h for im in images for h in split_pair(im)]
    res = read_batch(halves, net, batch, confidence)
    reads, conf = res if confidence else (res, None)
    pairs = list(zip(reads[0::2], reads[1::2], strict=True))
    return (pairs, list(zip(conf[0::2], conf[1::2], strict=True))) if confidence else pairs


# ---------------------------------------------------------------- data, training, accuracy

def _render_chunk(args: tuple) -> tuple[list[np.ndarray], list]:
    seed, chunk, n, two_characters = args
    if two_characters:      # labels are (left, right) pairs
        rng = np.random.default_rng([seed, chunk, 2])
        out = [world.sample_two_example(rng, size=SIZE) for _ in range(n)]
    else:
        rng = np.random.default_rng([seed, chunk])
        out = [world.sample_example(rng, size=SIZE) for _ in range(n)]
    return [o[0] for o in out], [o[1] for o in out]


def render_set(n: int, seed: int, workers: int = 1, two_characters: bool = False) -> tuple[np.ndarray, list]:
    """``n`` random renders (uint8 N x 128 x 128 x 3) and their labels; deterministic for ``seed`` (chunks of
    500, chunk ``i`` drawn from ``default_rng([seed, i])``, whatever the number of worker processes). With
    ``two_characters``: ``world.sample_two_example`` images (N x 128 x 256 x 3, chunk ``i`` drawn from
    ``default_rng([seed, i, 2])``) and (left, right) labels."""
    jobs = [(seed, i, min(500, n - 500 * i), two_characters) for i in range((n + 499) // 500)]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    imgs = [im for p in parts for im in p[0]]
    labels = [lab for p in parts for lab in p[1]]
    return np.stack(imgs), labels


@torch.no_grad()
def vae_roundtrip(images: np.ndarray, vae, batch: int = 64) -> list[np.ndarray]:
    """Encode and decode uint8 images (N, H, W, 3) with a diffusers ``AutoencoderKL`` (posterior mean)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out += list(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return out


def measure_accuracy(n: int = 1000, seed: int = 12345, degrade: bool = False,
                     net: ReadoutNet | None = None, strength: float = 1.0, vae=None,
                     two_characters: bool = False) -> dict[str, float]:
    """Per-field accuracy on ``n`` held-out renders (training uses other seeds); ``degrade`` applies
    :func:`degrade_batch` at ``strength``; ``vae`` (an ``AutoencoderKL``) round-trips the renders through it
    first. Also ``all_identity``: the four identity attributes all right.

    With ``two_characters``, ``n`` two-character renders (``world.render_two``; degraded and round-tripped whole)
    read half by half (``read_pairs``): the fields are over the 2n characters, and ``both_named`` /
    ``both_all`` are the shares of images whose two characters read every named field / every field right."""
    imgs, labels = render_set(n, seed, two_characters=two_characters)
    if vae is not None:
        imgs = np.stack(vae_roundtrip(imgs, vae))
    if degrade:
        gen = torch.Generator().manual_seed(seed)
        x = torch.cat([degrade_batch(_to_tensor(imgs[i:i + 256], resize=False), gen, strength)
                       for i in range(0, n, 256)])
        imgs = list((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    if two_characters:
        pairs = read_pairs(imgs, net)
        pred, labels = [r for p in pairs for r in p], [t for p in labels for t in p]
    else:
        pred = read_batch(imgs, net)
    right = [{f: p[f] == t[f] for f in world.FIELDS} for p, t in zip(pred, labels, strict=True)]
    acc = {f: float(np.mean([r[f] for r in right])) for f in world.FIELDS}
    acc["all_identity"] = float(np.mean([all(r[a] for a in world.ATTRIBUTES) for r in right]))
    if two_characters:
        named = [all(r[f] for f in world.NAMED_FIELDS) for r in right]
        every = [all(r.values()) for r in right]
        acc["both_named"] = float(np.mean([a and b for a, b in zip(named[0::2], named[1::2], strict=True)]))
        acc["both_all"] = float(np.mean([a and b for a, b in zip(every[0::2], every[1::2], strict=True)]))
    return acc


def train(out: str | Path = WEIGHTS, steps: int = 2500, batch: int = 48, pool: int = 6000, seed: int = 0,
          width: int = 32, log_every: int = 250, device: str = "cpu", workers: int = 1) -> ReadoutNet:
    """Train the readout: ``pool`` renders (seed ``seed``), each batch 30% clean and 70% degraded; AdamW with
    a cosine schedule. Held-out evaluation uses other seeds (:func:`measure_accuracy`)."""
    torch.manual_seed(seed)
    t0 = time.time()
    imgs, labels = render_set(pool, seed, workers)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()          # uint8
    y_all = {f: torch.tensor([HEADS[f].index(lab[f]) for lab in labels]).to(device) for f in HEADS}
    print(f"rendered {pool} images in {time.time() - t0:.0f}s", flush=True)
    net = ReadoutNet(width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1 if steps >= 50 else 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, pool, (batch,), generator=gen)
        x = x_all[idx].to(device).float() / 255
        k = int(batch * 0.7)
        x[:k] = degrade_batch(x[:k], gen)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[f], y_all[f][idx]) for f in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    net.eval().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save({"width": width, "state": state, "fields": HEADS, "seed": seed, "steps": steps}, out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {time.time() - t0:.0f}s", flush=True)
    return net


def _report(acc: dict[str, float]) -> str:
    return "  ".join(f"{f}={a * 100:.1f}" for f, a in acc.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m characonsist.toy.readout", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the readout (seeded) and save its weights")
    t.add_argument("--out", default=str(WEIGHTS))
    t.add_argument("--steps", type=int, default=2500)
    t.add_argument("--pool", type=int, default=6000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=48)
    t.add_argument("--device", default="cpu")
    t.add_argument("--workers", type=int, default=1, help="processes that render the training pool")
    e = sub.add_parser("eval", help="per-field accuracy on held-out renders, clean and degraded")
    e.add_argument("--weights", default=None)
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--strength", type=float, nargs="+", default=[1.0],
                   help="degradation strengths to measure (1 = the training distribution)")
    e.add_argument("--vae", action="store_true", help="also through the shipped toy model's VAE (encode + decode)")
    e.add_argument("--two-characters", action="store_true",
                   help="two-character renders (world.render_two), read half by half")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "train":
        net = train(args.out, steps=args.steps, batch=args.batch, pool=args.pool, seed=args.seed,
                    device=args.device, workers=args.workers)
        print("clean   ", _report(measure_accuracy(500, 12345, net=net)))
        return 0
    net = load_readout(args.weights)
    for st in (0.0, *args.strength):
        t0 = time.time()
        acc = measure_accuracy(args.n, args.seed, degrade=st > 0, net=net, strength=st,
                               two_characters=args.two_characters)
        name = f"degraded x{st:g}" if st > 0 else "clean"
        print(f"{name:13s} n={args.n} seed={args.seed} ({time.time() - t0:.0f}s):", _report(acc), flush=True)
    if args.vae:
        from .model import load_toy_pipeline
        vae = load_toy_pipeline()[0].vae
        acc = measure_accuracy(args.n, args.seed, net=net, vae=vae, two_characters=args.two_characters)
        print(f"{'toy VAE':13s} n={args.n} seed={args.seed}:", _report(acc), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
