"""The papers' metrics as functions of embeddings, pairs and masks (no model in here).

Definitions (CharaConsist, ICCV 2025, evaluation section; ConsiStory / 1Prompt1Story use the same CLIP-T,
CLIP-I and DreamSim):

* CLIP-T: cosine similarity between an image's CLIP image embedding and its prompt's CLIP text embedding.
* CLIP-I: cosine similarity between the CLIP image embeddings of two images of a group.
* CLIP-I-fg / CLIP-I-bg: CLIP-I between the images with the background (fg) or the foreground (bg) masked
  out; the paper segments with SAM. Background similarity is only meaningful between images of one scene, so
  CLIP-I-bg is computed only for pairs whose background text is the same (fixed-scene pairs).
* ID sim: cosine similarity of face embeddings (the paper: RetinaFace crops, FaceNet embeddings), for pairs
  where both images have a face.
* DINOv2: cosine similarity of DINOv2 image embeddings; DreamSim: 1 - cosine similarity of DreamSim
  embeddings (a distance: lower is more similar).

Pairs: ``identity`` compares the identity image with each frame (CharaConsist's setting: frames copy the
identity); ``all`` compares every two images of a group (the papers' "pairwise" similarity).
Aggregation: a group's score is the mean over its images (CLIP-T) or pairs (the rest); the overall score is the
mean over groups, so every story weighs the same whatever its length.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from PIL import Image

PAIR_MODES = ("identity", "all")
# key: (label, higher is better)
METRICS = {
    "clip_t": ("CLIP-T", True),
    "clip_i": ("CLIP-I", True),
    "clip_i_fg": ("CLIP-I-fg", True),
    "clip_i_bg": ("CLIP-I-bg", True),
    "dinov2": ("DINOv2", True),
    "dreamsim": ("DreamSim", False),
    "id_sim": ("ID sim", True),
}


def normalize(x) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a, b) -> float:
    """Cosine similarity of two vectors."""
    a, b = normalize(a), normalize(b)
    return float(np.clip(np.dot(a, b), -1.0, 1.0))


def pairs(n: int, mode: str = "identity") -> list[tuple[int, int]]:
    """Index pairs of a group of ``n`` images (image 0 is the identity)."""
    if mode == "identity":
        return [(0, k) for k in range(1, n)]
    if mode == "all":
        return list(combinations(range(n), 2))
    raise ValueError(f"pairs mode {mode!r}: expected one of {', '.join(PAIR_MODES)}")


def same_scene(a: str, b: str) -> bool:
    """Two images share a scene when their background texts are the same (the engine's share_bg rule)."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split()) and bool(a.strip())


def pair_similarity(embeddings, index_pairs, distance: bool = False) -> list[float | None]:
    """Cosine similarity (or 1 - cosine with ``distance``) of each pair; None where an embedding is None."""
    out = []
    for i, j in index_pairs:
        if embeddings[i] is None or embeddings[j] is None:
            out.append(None)
            continue
        s = cosine(embeddings[i], embeddings[j])
        out.append(1.0 - s if distance else s)
    return out


def mask_out(image, mask: np.ndarray, keep: str, fill: tuple[int, int, int]):
    """``image`` with the background (``keep="fg"``) or the foreground (``keep="bg"``) replaced by ``fill``."""

    if keep not in ("fg", "bg"):
        raise ValueError(f"keep={keep!r}: expected 'fg' or 'bg'")
    pixels = np.asarray(image.convert("RGB")).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} for an image of {pixels.shape[1]}x{pixels.shape[0]}")
    pixels[~mask if keep == "fg" else mask] = fill
    return Image.fromarray(pixels)


def mean(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summary(values) -> dict:
    """``{"mean", "n"}`` over the values that are not None."""
    kept = [v for v in values if v is not None]
    return {"mean": mean(kept), "n": len(kept)}
