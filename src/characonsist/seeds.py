"""The one seed rule: how one seed becomes the noise seeds of a group's images, and the default seed.

Every front end (the pipeline call, ``characonsist generate``, the web UI, a story file's header) and the toy benches
spread a seed with ``story_seeds`` and default to ``DEFAULT_SEED`` (CharaConsist's official seed), so the same
settings give the same images wherever they were typed.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SEED = 2025   # CharaConsist's official seed: the identity, its pre-runs and its frames
SEEDINGS = ("shared", "per_image")
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), independent of Python's hash randomization."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def story_seeds(seed: int, num_images: int, seeding: str, own: Sequence[int | None] | None = None) -> list[int]:
    """The noise seeds of a group's images (identity first) from one seed, by a seeding convention.

    ``"shared"``: every image starts from the same noise (CharaConsist's official convention: seed 2025 for the
    identity, its pre-runs and its frames). ``"per_image"``: every image its own noise, as ConsiStory
    (``create_latents`` draws one latent per prompt from one generator, ``same_latent=False``) and StoryDiffusion
    (one generator for the identity batch, continued by the frames) do; here the identity keeps ``seed`` and
    frame k gets ``mix_seed(seed, k)``, so the identity starts from the same noise under both conventions.
    ``own`` (one entry per image, None where unset): an image's own seed replaces the spread one.
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding={seeding!r}; valid: {', '.join(map(repr, SEEDINGS))}")
    if own is not None and len(own) != num_images:
        raise ValueError(f"own seeds: got {len(own)} for {num_images} images")
    if seeding == "shared":
        spread = [int(seed)] * num_images
    else:
        spread = [int(seed)] + [mix_seed(seed, k) for k in range(1, num_images)]
    if own is None:
        return spread
    return [s if o is None else int(o) for s, o in zip(spread, own, strict=True)]
