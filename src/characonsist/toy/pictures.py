"""The toy bench with a picture as the identity (``characonsist bench toy --identity-picture KIND``).

Each story's identity is a render of the renderer's own character (its true attributes known), in the identity's
scene and action; the frames are generated in their own scenes and actions from the pipeline's identity row,
which follows the picture (``characonsist.inversion``). Consistency is then measured against the truth, not
against a generated identity. Picture kinds:

- ``render``: a seeded render at the model's size, as in training;
- ``offgrid``: the same character rendered at 11/8 of the size and a window of the model's size cut from it, the
  character's centre moved to a random x in [0.3, 0.7] of the window: 1.375 times the trained heights
  (small 0.47, big 0.80 of the image) and off the three trained positions, a picture the model was not
  trained on;
- ``degraded``: the render through ``readout.degrade`` (shift, blur, down/up-sampling, colour gain, noise; strength 1).

Per story (``score_picture``): frames whose four attributes all equal the truth, per attribute, the reconstructed
identity's readout against the truth, and the reconstruction's PSNR against the picture.
"""

from __future__ import annotations

import numpy as np

from . import world

PICTURE_KINDS = ("render", "offgrid", "degraded")
_TAG = 15          # the picture's draws are seeded (story seed, _TAG, ...): no other draw of the bench uses it
OFFGRID_SCALE = 11 / 8


def story_picture(scene: str, kind: str, action: str, seed: int, picture: str = "render",
                  size: int = 128) -> tuple[np.ndarray, world.Character]:
    """The identity's picture for a story (uint8 (size, size, 3)) and the character drawn in it (the truth)."""
    if picture not in PICTURE_KINDS:
        raise ValueError(f"picture kind {picture!r}; valid: {', '.join(PICTURE_KINDS)}")
    rng = np.random.default_rng([seed, _TAG])
    character = world.sample_character(rng, kind=kind)
    layout = np.random.default_rng([seed, _TAG, list(world.SCENES).index(scene)])
    if picture == "offgrid":
        big = int(round(size * OFFGRID_SCALE))
        image = world.render(scene, character, action, size=big, rng=layout)
        cx, _, _ = world.action_geometry(action, big)
        want = rng.uniform(0.3, 0.7) * size
        left = int(np.clip(round(cx - want), 0, big - size))
        top = big - size                         # keep the feet line: the ground stays at the bottom
        return image[top:top + size, left:left + size].copy(), character
    image = world.render(scene, character, action, size=size, rng=layout)
    if picture == "degraded":
        from .readout import degrade

        image = degrade(image, np.random.default_rng([seed, _TAG, 99]), strength=1.0)
    return image, character


def score_picture(truth: dict[str, str], reads: list[dict[str, str]], psnr: float | None) -> dict:
    """Counts of one story against the picture's true attributes (``reads``: identity first)."""
    frames = reads[1:]
    return {
        "truth_hits": sum(all(r[a] == truth[a] for a in world.ATTRIBUTES) for r in frames),
        "truth_attribute_hits": {a: sum(r[a] == truth[a] for r in frames) for a in world.ATTRIBUTES},
        "reconstruction_truth": {a: reads[0][a] == truth[a] for a in world.ATTRIBUTES},
        "psnr": psnr,
        "truth": dict(truth),
    }


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def aggregate_pictures(stories: list[dict]) -> dict:
    """Method-level figures of :func:`score_picture` records (stories without ``truth_hits`` are skipped)."""
    ok = [s for s in stories if "truth_hits" in s]
    frames = sum(s["frames"] for s in ok)
    psnrs = [s["psnr"] for s in ok if s.get("psnr") is not None and np.isfinite(s["psnr"])]
    frame_named = sum(s.get("frame_adherence_hits", 0) for s in ok)
    frame_fields = sum(s.get("frame_adherence_fields", 0) for s in ok)
    return {
        "stories": len(ok),
        "truth_consistency": _ratio(sum(s["truth_hits"] for s in ok), frames),
        "truth_attribute_agreement": {a: _ratio(sum(s["truth_attribute_hits"][a] for s in ok), frames)
                                      for a in world.ATTRIBUTES},
        "reconstruction_truth": _ratio(sum(all(s["reconstruction_truth"].values()) for s in ok), len(ok)),
        "reconstruction_truth_attributes": {a: _ratio(sum(s["reconstruction_truth"][a] for s in ok), len(ok))
                                            for a in world.ATTRIBUTES},
        "reconstruction_psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
        "frame_adherence": _ratio(frame_named, frame_fields),
    }


def _db(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def format_picture_table(result: dict) -> str:
    """The picture table: agreement of the frames with the picture's true attributes, frames' adherence, and the
    reconstructed identity (PSNR, its readout against the truth)."""
    rows = {n: m["metrics"]["picture"] for n, m in result["methods"].items() if "picture" in m["metrics"]}
    if not rows:
        return ""
    w = max([len("vs the picture"), *map(len, rows)])
    attrs = list(world.ATTRIBUTES)
    head = (f"{'vs the picture':<{w}}  {'all 4':>6}  " + "  ".join(f"{a:>15}" for a in attrs)
            + f"  {'adhere':>6}  {'PSNR dB':>7}  {'recon all 4':>11}")
    lines = [head, "-" * len(head)]

    def pct(x: float) -> str:
        return "   -" if x != x else f"{100 * x:5.1f}"

    for name, p in rows.items():
        lines.append(f"{name:<{w}}  {pct(p['truth_consistency']):>6}  "
                     + "  ".join(f"{pct(p['truth_attribute_agreement'][a]):>15}" for a in attrs)
                     + f"  {pct(p['frame_adherence']):>6}  {_db(p['reconstruction_psnr']):>7}  "
                     f"{pct(p['reconstruction_truth']):>11}")
    settings = result.get("settings", {})
    lines.append(f"(percent; identity from a picture ({settings.get('identity_picture')}, inversion "
                 f"{settings.get('inversion')} where a row names none): frames whose unnamed attributes all equal the picture's true ones, "
                 "and per attribute;\n adhere = named fields of the frames read back as captioned; PSNR = the output "
                 "identity against the picture; recon all 4 = the output identity read back as the truth)")
    return "\n".join(lines)
