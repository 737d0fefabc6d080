"""Backbones: what differs between FLUX-family models, one small adapter each (docs/ARCHITECTURE.md).

An adapter (``Backbone``) owns the token layout (prompt encoding, text spans, latents and their positions,
decoding), the schedule, the transformer call (with classifier-free guidance where the model uses it) and the
attention processors that hand every layer's q, k, v to the method. The engine and the methods see only
``engine.AttnCall`` and ``engine.Slot``: no method knows which backbone it runs on.

The backbone is found from the transformer's class (``backbone_of``): FLUX.1 (``FluxTransformer2DModel``),
Chroma (``ChromaTransformer2DModel``), FLUX.2 [klein] (``Flux2Transformer2DModel``).
"""

from __future__ import annotations

from .base import Backbone, TextBatch
from .chroma import Chroma
from .flux1 import Flux1
from .klein import Klein

BACKBONES: dict[str, Backbone] = {b.transformer_class: b for b in (Flux1(), Chroma(), Klein())}


def backbone_named(transformer_class: str) -> Backbone | None:
    """The adapter of a transformer class name (``model_index.json``'s ``transformer`` entry), or None."""
    return BACKBONES.get(transformer_class)


def backbone_of(model) -> Backbone:
    """The adapter of a pipeline or transformer, from the transformer's class (a subclass counts)."""
    transformer = getattr(model, "transformer", model)
    for cls in type(transformer).__mro__:
        if cls.__name__ in BACKBONES:
            return BACKBONES[cls.__name__]
    raise ValueError(f"{type(transformer).__name__} is not a supported transformer; supported: "
                     f"{', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "Backbone", "TextBatch", "backbone_named", "backbone_of"]
