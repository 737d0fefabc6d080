"""The toy model's losses and schedules: the VAE's reconstruction + KL, rectified flow matching as FLUX trains
(``x_t = (1 - s) x_0 + s n``, the model predicts ``n - x_0``; ``s`` logit-normal, shifted by the pipeline's
``mu``), and the learning rate by step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .networks import SCHEDULER_CONFIG

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
