"""Live previews: small pictures of every image of the lockstep batch while it denoises.

What is previewed is the step's **x0 estimate**, not the noisy latents: ``callback_on_step_end`` can ask for
``"x0"`` (the engine computes ``latents - sigma_next * velocity``, the rectified flow's straight line to sigma 0,
from the model output it has anyway). Early steps' latents are mostly noise; their x0 already shows the layout and
colours, which is what a person watching wants to see. (``previews`` also takes plain latents: a callback that
only asks for ``"latents"`` gets noisy pictures.)

Two decoders:

- ``"linear"`` (default, cheap): a per-pixel linear map from the VAE's latent channels to RGB with a bias, fitted
  once per loaded VAE by least squares on the VAE's own encodings of a few synthetic images (flat colours,
  gradients, colour blocks, smooth noise) at a small size (``fit_latent_rgb``). No hard-coded factors: it works for
  FLUX's VAE and for the toy model's. The result, one pixel per latent cell, is resized to ``size`` px on the
  long side. Cost: a matrix product and a resize.
- ``"exact"``: a real VAE decode of x0 at full size, then resized (as the final image is made: for small models,
  e.g. the toy model; on full FLUX it costs a decode per preview).
"""

from __future__ import annotations

import base64
import io
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MODES = ("linear", "exact")
FIT_SIZE = 64          # px of the synthetic images the linear map is fitted on
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vae -> LatentRGB, once per loaded model


@dataclass(frozen=True)
class LatentRGB:
    """RGB in [-1, 1] = latent channels @ ``weight`` + ``bias``; latents as the transformer sees them (after the
    VAE's shift and scale). ``r2``: how much of the fitting images' pixel variance the map explains."""

    weight: torch.Tensor   # (C, 3) float32
    bias: torch.Tensor     # (3,) float32
    r2: float

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, h, w) RGB in [-1, 1] (not clamped)."""
        x = latents.detach().to("cpu", torch.float32)
        return torch.einsum("bchw,cd->bdhw", x, self.weight) + self.bias[None, :, None, None]


def synthetic_images(size: int = FIT_SIZE) -> torch.Tensor:
    """The fitting set, (N, 3, size, size) in [-1, 1], always the same: 12 flat colours (black, white, greys,
    primaries, secondaries, two skin-like tones), horizontal and vertical gradients of each channel, four images of
    four colour blocks, 24 random flat colours and 6 smooth random colour fields (a fixed seed)."""
    flats = [(0, 0, 0), (1, 1, 1), (.5, .5, .5), (.25, .25, .25), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0),
             (0, 1, 1), (1, 0, 1), (.9, .7, .55), (.45, .3, .2)]
    out = [torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, size, size) for c in flats]
    ramp = torch.linspace(0, 1, size)
    for c in range(3):
        for horizontal in (True, False):
            img = torch.full((3, size, size), 0.3)
            img[c] = ramp[None, :].expand(size, size) if horizontal else ramp[:, None].expand(size, size)
            out.append(img)
    half = size // 2
    rng = np.random.default_rng(0)
    for _ in range(4):
        img = torch.empty(3, size, size)
        for ys in (slice(0, half), slice(half, size)):
            for xs in (slice(0, half), slice(half, size)):
                img[:, ys, xs] = torch.tensor(rng.random(3), dtype=torch.float32)[:, None, None]
        out.append(img)
    for _ in range(24):
        out.append(torch.tensor(rng.random(3), dtype=torch.float32)[:, None, None].expand(3, size, size))
    for _ in range(6):
        coarse = torch.tensor(rng.random((1, 3, 4, 4)), dtype=torch.float32)
        out.append(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                                   align_corners=False)[0].clamp(0, 1))
    return torch.stack(out) * 2 - 1


def _vae_device(pipe, vae):
    if pipe is not None and hasattr(pipe, "_vae_device"):
        return pipe._vae_device()
    params = next(vae.parameters(), None)
    return params.device if params is not None and params.device.type != "meta" else torch.device("cpu")


@torch.no_grad()
def fit_latent_rgb(vae, size: int = FIT_SIZE, device=None) -> LatentRGB:
    """Fit the linear latent -> RGB map of ``vae`` (an ``AutoencoderKL``): encode ``synthetic_images(size)`` (the
    posterior's mode, then the pipeline's ``(z - shift_factor) * scaling_factor``), average-pool each image to
    the latent grid, and solve least squares for RGB on [channels, 1] in float64. Deterministic for a VAE."""
    images = synthetic_images(size)
    params = next(vae.parameters(), None)
    dtype = params.dtype if params is not None else torch.float32
    device = device if device is not None else _vae_device(None, vae)
    latents = []
    for chunk in images.split(8):
        z = vae.encode(chunk.to(device, dtype)).latent_dist.mode()
        latents.append(z.to("cpu", torch.float64))
    z = torch.cat(latents)
    shift = vae.config.get("shift_factor") or 0.0
    scale = vae.config.get("scaling_factor") or 1.0
    z = (z - shift) * scale
    rgb = torch.nn.functional.adaptive_avg_pool2d(images.double(), z.shape[-2:])
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(a, y, driver="gelsd").solution
    residual = y - a @ solution
    r2 = 1 - float(residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return LatentRGB(solution[:-1].float().contiguous(), solution[-1].float().contiguous(), r2)


def latent_rgb(pipe) -> LatentRGB:
    """The pipeline's linear map, fitted on first use and kept while its VAE lives."""
    vae = pipe.vae
    found = _FITTED.get(vae)
    if found is None:
        found = _FITTED[vae] = fit_latent_rgb(vae, device=_vae_device(pipe, vae))
    return found


def _long_side(height: int, width: int, size: int) -> tuple[int, int]:
    scale = min(size, max(height, width)) / max(height, width)   # never larger than the image
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def previews(pipe, latents: torch.Tensor, height: int, width: int, mode: str = "linear", size: int = 128) -> list:
    """PIL previews (``size`` px on the long side, at most the image's) of packed latents (B, tokens, C*4) of images ``height`` x
    ``width`` (e.g. a callback's ``x0`` and ``pipe.step_batch``'s size). ``mode``: ``"linear"`` or ``"exact"``."""

    if mode not in MODES:
        raise ValueError(f"preview mode {mode!r}; valid: {', '.join(MODES)}")
    lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    if mode == "exact":
        vae = pipe.vae
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        rgb = vae.decode(lat.to(_vae_device(pipe, vae), vae.dtype), return_dict=False)[0]
    else:
        rgb = latent_rgb(pipe)(lat)
    h, w = _long_side(height, width, size)
    rgb = torch.nn.functional.interpolate(rgb.float().cpu(), size=(h, w), mode="bilinear", antialias=True,
                                          align_corners=False)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def data_url(image, quality: int = 80) -> str:
    """A small JPEG of ``image`` as a ``data:`` URL (what the web UI sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["MODES", "LatentRGB", "data_url", "fit_latent_rgb", "latent_rgb", "previews", "synthetic_images"]
