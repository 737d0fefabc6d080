"""What decides the trained toy model: ``TrainConfig`` (the shipped one was made with its defaults) and the
generation defaults shipped beside the weights (``DEFAULTS``). The recipe is ``characonsist.toy.train``."""

from __future__ import annotations

from dataclasses import dataclass

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
