"""Shims over the diffusers versions the package supports (pyproject: >=0.35,<0.43)."""

from __future__ import annotations

import logging


class _DropTorchaoEnumNotice(logging.Filter):
    """torch >= 2.13 logs a deprecation notice for each of torchao's enums that torchao registers with pytree, at
    torchao's import, which diffusers does on every pipeline load when torchao is installed: lines that say nothing
    to a user of this tool. Only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in str(record.msg)


class _DropTorchaoSafeGlobalsNotice(logging.Filter):
    """diffusers 0.42 warns at import, when torchao (0.16 and newer) lacks the tensor classes it registers for
    unpickling torchao-serialized checkpoints, that loading such checkpoints may fail. This tool quantizes on load
    (``characonsist.memory``) and never unpickles one; only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unable to import `torchao` Tensor objects" not in str(record.msg)


class _DropTorchaoCudaLibraryNotice(logging.Filter):
    """torchao's wheels carry CUDA kernels (``_C_cutlass_*.so``) that cannot load where there is no CUDA; torchao
    logs each failure at its import. On a machine without a CUDA device only those notices are dropped (with one,
    a failure to load them is worth seeing and stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if not (text.startswith("Failed to load") and "torchao" in text and "_C" in text):
            return True
        import torch

        return torch.cuda.is_available()


_FILTERS = {"torch.utils._pytree": _DropTorchaoEnumNotice,
            "diffusers.quantizers.torchao.torchao_quantizer": _DropTorchaoSafeGlobalsNotice,
            "torchao": _DropTorchaoCudaLibraryNotice}


def mute_known_noise() -> None:
    """Install the filters above on their loggers once (idempotent)."""
    for name, kind in _FILTERS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in log.filters):
            log.addFilter(kind())


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


def dtype_keyword(kwargs: dict) -> dict:
    """``kwargs`` with ``torch_dtype=`` (the name every diffusers release reads, and the README's) under the name the
    installed diffusers wants (``dtype_kwarg``), so 0.42's deprecation warning is not raised for it."""
    if "torch_dtype" in kwargs and "dtype" not in kwargs:
        kwargs = dict(kwargs)
        kwargs.update(dtype_kwarg(kwargs.pop("torch_dtype")))
    return kwargs
