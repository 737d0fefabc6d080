"""characonsist: the same character across many images, without training, on FLUX.1 with diffusers.

The heavy parts (torch, diffusers) load on first use, so ``import characonsist`` and the CLI's ``--help``
and input checks stay fast.
"""

from __future__ import annotations

import importlib

from ._compat import mute_known_noise
from .story import StoryImage

mute_known_noise()

__version__ = "0.1.0"

_LAZY = {
    "CharaConsistPipeline": "characonsist.pipeline",
    "ChromaStoryPipeline": "characonsist.pipeline",
    "Flux2KleinStoryPipeline": "characonsist.pipeline",
    "StoryPipelineOutput": "characonsist.pipeline",
    "METHODS": "characonsist.methods",
    "get_method": "characonsist.methods",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'characonsist' has no attribute {name!r}")


__all__ = ["METHODS", "CharaConsistPipeline", "ChromaStoryPipeline", "Flux2KleinStoryPipeline", "StoryImage", "StoryPipelineOutput", "get_method", "__version__"]
