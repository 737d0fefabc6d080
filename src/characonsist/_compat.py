"""Shims over the diffusers versions the package supports (pyproject: >=0.35,<0.43)."""

from __future__ import annotations


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers reads it (it deprecates ``torch_dtype`` and
    warns on every load), ``torch_dtype`` in the versions before it."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present with `dtype`)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def import_flux():
    """diffusers' ``FluxPipeline``, imported with transformers' import-time notices muted.

    Importing the FLUX pipeline module makes transformers report that its image processors fall back to PIL when
    torchvision is absent (this project never installs it: it would pull a CUDA build of torch). The notice is
    about image processors a text-to-image pipeline does not use; other transformers warnings stay on.
    """
    try:
        from transformers.utils import logging
    except ImportError:   # pragma: no cover - transformers is a dependency
        logging = None
    level = logging.get_verbosity() if logging is not None else None
    if logging is not None:
        logging.set_verbosity_error()
    try:
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux import pipeline_flux  # noqa: F401  (the module that triggers the notice)
    finally:
        if logging is not None:
            logging.set_verbosity(level)
    return FluxPipeline
