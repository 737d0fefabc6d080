"""The shipped toy model: a FLUX-architecture pipeline trained on the toy world (``--model toy``).

The folder is a plain ``FluxPipeline.save_pretrained`` layout (float16 safetensors) with a
``characonsist_defaults.json`` beside it; ``characonsist.toy.train`` is the seeded recipe that makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._compat import dtype_kwarg, import_flux

TOY_MODEL_DIR = Path(__file__).resolve().parent / "weights"
DEFAULTS_FILE = "characonsist_defaults.json"


def load_toy_defaults(path: str | Path = TOY_MODEL_DIR) -> dict:
    """Height, width, steps, guidance and ``max_sequence_length`` the toy model was trained and tuned for."""
    return json.loads((_check_dir(Path(path)) / DEFAULTS_FILE).read_text())


def _check_dir(path: Path) -> Path:
    if not (path / "model_index.json").is_file() or not (path / DEFAULTS_FILE).is_file():
        raise FileNotFoundError(
            f"toy model weights are missing in {path} (need model_index.json and {DEFAULTS_FILE}). They ship with "
            "the package; in a source checkout, rebuild them with "
            "`python -m characonsist.toy.train --out RUN --stage all` on a GPU, then "
            "`python -m characonsist.toy.train --out RUN --stage export`.")
    return path


def load_toy_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      path: str | Path = TOY_MODEL_DIR):
    """``(FluxPipeline, defaults)`` of the toy model, on ``device`` in ``dtype``, with the progress bar off.

    Pass ``defaults`` to the pipeline call (``pipe(prompt, **defaults)``): in particular
    ``max_sequence_length`` is short (the model was trained with that padding), not FLUX's 512.
    """

    FluxPipeline = import_flux()
    path = _check_dir(Path(path))
    pipe = FluxPipeline.from_pretrained(path, **dtype_kwarg(dtype))
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), load_toy_defaults(path)
