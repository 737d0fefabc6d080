"""Scoring of the toy bench: per-story counts read back from the images, the method-level metrics, the merge of
the results of several processes and the printed tables. Pure functions of numbers and pictures (no model).

The metrics (docs/TOY_WORLD.md defines them):

- identity consistency: fraction of frames whose four unnamed attributes all equal the identity image's
  (read from both), with the agreement per attribute and per story mode;
- prompt adherence: fraction of named fields (scene, kind, position, size) read back as the caption says,
  over all images, identity included;
- background consistency (``fixed`` stories): fraction of background pixels (outside both characters'
  boxes) whose colour stays within 32/255 of the identity's in every channel; and scene-readout agreement;
- position diversity: fraction of frame pairs of a story whose read actions differ (the prompts' own
  fraction is reported beside it);
- mask quality (methods that return foreground masks: CharaConsist, ConsiStory, StorySync): how much of the
  image the token mask marks as foreground, the fraction of it inside the character boxes, and its IoU with the
  character's pixels as segmented from the image's own colours (:func:`character_pixels`);
- seconds per story (one pipeline call, decoding included) and wall seconds per method.
"""

from __future__ import annotations

import itertools

import numpy as np

from . import world
from .suite import MODES

ORACLE_TOKEN_PX = 8          # the oracle's mask grid: one token per 8x8 pixels, the toy model's (VAE 4x, 2x2 patches)
ADHERENCE_FIELDS = ("scene", "kind", "position", "size")
BG_TOLERANCE = 32            # per-channel colour difference (0-255) under which a background pixel "agrees"
BOX_MARGIN = 0.05            # of the image size, around the nominal character box (covers the renderer's jitter)


# ---------------------------------------------------------------- metrics (pure functions)

def character_box(action: str, size: int = 128) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) that holds a character doing ``action`` (nominal geometry + margin)."""
    cx, feet, h = world.action_geometry(action, size)
    m = BOX_MARGIN * size
    x0, x1 = cx - 0.5 * h - m, cx + 0.5 * h + m
    y0, y1 = feet - 1.25 * h - m, feet + m
    return (max(int(x0), 0), max(int(y0), 0), min(int(np.ceil(x1)), size), min(int(np.ceil(y1)), size))


def background_mask(actions: list[str], size: int = 128) -> np.ndarray:
    """True where no character doing any of ``actions`` can be."""
    mask = np.ones((size, size), bool)
    for a in actions:
        x0, y0, x1, y1 = character_box(a, size)
        mask[y0:y1, x0:x1] = False
    return mask


def background_agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray, tol: int = BG_TOLERANCE) -> float:
    """Fraction of ``mask`` pixels where images ``a`` and ``b`` (uint8) differ by at most ``tol`` in every channel."""
    if not mask.any():
        return float("nan")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)
    return float((diff[mask] <= tol).mean())


def character_region(actions: list[str], size: int = 128) -> np.ndarray:
    """True inside the character box of any of ``actions`` (the complement of :func:`background_mask`)."""
    return ~background_mask(actions, size)


def character_pixels(image: np.ndarray, scenes: list[str], region: np.ndarray) -> np.ndarray:
    """The character's pixels in ``image`` (uint8), estimated from colour: inside ``region`` and nearer (RGB) to a
    colour a character is painted with (:data:`world.CHARACTER_COLORS`) than to any colour of ``scenes``.

    The renderer's palettes are far apart, so on renders this matches the true mask (``world.render(...,
    return_mask=True)``; tests/test_toy_bench.py measures it, clean and blurred; docs/TOY_WORLD.md gives the figures). On generated images it follows
    the character the model drew, wherever inside ``region`` it drew it.
    """
    ys, xs = np.nonzero(region)
    out = np.zeros(region.shape, bool)
    if not len(ys):
        return out
    x = image[ys, xs, :3].astype(np.float32)

    def nearest(colors: np.ndarray) -> np.ndarray:     # in chunks: large images stay within a few MB
        return np.concatenate([((x[i:i + 8192, None, :] - colors[None]) ** 2).sum(-1).min(-1)
                               for i in range(0, len(x), 8192)])

    scene = np.asarray([c for sc in dict.fromkeys(scenes) for c in world.SCENE_COLORS[sc]], np.float32)
    body, ink = np.asarray(list(world.BODY_COLORS.values()), np.float32), np.asarray([world.INK], np.float32)
    character = np.concatenate([np.asarray(world.CHARACTER_COLORS, np.float32), _blends(body, ink)])
    i, j = np.triu_indices(len(scene), 1)
    scene = np.concatenate([scene, _blends(scene[i], scene[j])])
    out[ys, xs] = nearest(character) < nearest(scene)
    return out


def _blends(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 1:3, 1:1 and 3:1 blends of colours ``a`` with ``b`` (broadcast): what the renderer's 2x supersampled box
    filter makes where two flat colours meet. The character palette gets its body/ink blends (a pattern's ink on
    the body must count as character), the scene palette every blend of two of its colours; other character
    blends are left out, because ink/white greys look like the city's walls once a decoder has shifted them."""
    return np.concatenate([w * a + (1 - w) * b for w in (0.25, 0.5, 0.75)]).reshape(-1, 3)


def upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A token-grid mask (rows, cols) as a pixel mask (height, width): each token covers its pixels."""
    mask = np.asarray(mask, bool)
    rows, cols = mask.shape
    return mask[(np.arange(height) * rows) // height][:, (np.arange(width) * cols) // width]


def pool_mask(mask: np.ndarray, token_px: int = ORACLE_TOKEN_PX) -> np.ndarray:
    """A pixel mask as a token-grid mask: a token is foreground when at least half its pixels are."""
    h, w = mask.shape
    return mask[:h - h % token_px, :w - w % token_px].reshape(
        h // token_px, token_px, w // token_px, token_px).mean(axis=(1, 3)) >= 0.5


def mask_scores(mask: np.ndarray, character: np.ndarray, region: np.ndarray) -> dict:
    """Quality of one token mask against the character's pixels (``character``) and the character boxes
    (``region``), all at pixel resolution after upsampling the mask: ``fg`` (share of the image marked
    foreground), ``in_box`` (share of the mask inside ``region``), ``iou`` (with ``character``) and ``covered``
    (share of ``character`` inside the mask). NaN where undefined (empty mask or no character pixels).
    ``iou_all_fg`` and ``in_box_all_fg`` are what a mask of all foreground would score on the same image: a mask
    that does not beat them says nothing about where the character is."""
    up = upsample_mask(mask, *character.shape)
    inter, union = float((up & character).sum()), float((up | character).sum())
    n_mask, n_char = float(up.sum()), float(character.sum())
    return {"fg": float(np.asarray(mask, bool).mean()), "in_box": _ratio(float((up & region).sum()), n_mask),
            "iou": _ratio(inter, union), "covered": _ratio(inter, n_char),
            "iou_all_fg": _ratio(n_char, float(character.size)), "in_box_all_fg": float(region.mean())}


def to_uint8(image) -> np.ndarray:
    """A pipeline image (PIL, float array in [0, 1] or uint8 array) as uint8 (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image[..., :3]


def score_story(truth: list[tuple[str, str, str]], reads: list[dict[str, str]],
                images: list[np.ndarray] | None = None, mode: str | None = None, masks: list | None = None) -> dict:
    """Counts and sums for one story (identity first in ``truth``, ``reads``, ``images`` and ``masks``, the
    method's token-grid foreground masks or ``None`` per image); see module doc."""
    ident, frames = reads[0], reads[1:]
    out: dict = {"frames": len(frames)}
    out["identity_hits"] = sum(all(r[a] == ident[a] for a in world.ATTRIBUTES) for r in frames)
    out["attribute_hits"] = {a: sum(r[a] == ident[a] for r in frames) for a in world.ATTRIBUTES}
    named = {f: 0 for f in ADHERENCE_FIELDS}
    for (scene, kind, action), r in zip(truth, reads, strict=True):
        size, position = action.split("-")
        for f, v in zip(ADHERENCE_FIELDS, (scene, kind, position, size), strict=True):
            named[f] += r[f] == v
    out["adherence_hits"] = named
    out["images"] = len(reads)
    pairs = list(itertools.combinations(range(1, len(reads)), 2))
    out["pairs"] = len(pairs)
    out["diverse_pairs"] = sum(reads[i]["action"] != reads[j]["action"] for i, j in pairs)
    out["prompted_diverse_pairs"] = sum(truth[i][2] != truth[j][2] for i, j in pairs)
    mode = mode or ("fixed" if all(t[0] == truth[0][0] for t in truth) else "other")
    if mode == "fixed" and frames:
        out["bg_scene_hits"] = sum(r["scene"] == ident["scene"] for r in frames)
        if images is not None:
            size = images[0].shape[0]
            agree = []
            for k in range(1, len(images)):
                acts = [truth[0][2], ident["action"], truth[k][2], reads[k]["action"]]
                agree.append(background_agreement(images[0], images[k], background_mask(acts, size)))
            out["bg_pixel"] = float(np.nanmean(agree)) if not np.all(np.isnan(agree)) else float("nan")
    if masks is not None and images is not None and any(m is not None for m in masks):
        per_image = []
        for (scene, _, action), r, image, mask in zip(truth, reads, images, masks, strict=True):
            if mask is None:
                per_image.append(None)
                continue
            region = character_region([action, r["action"]], image.shape[0])
            chars = character_pixels(image, [scene, r["scene"]], region)
            per_image.append(mask_scores(mask, chars, region))
        out["mask_scores"] = per_image
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def aggregate(stories: list[dict]) -> dict:
    """Method-level metrics from :func:`score_story` results (each with ``mode`` and ``seconds``)."""
    ok = [s for s in stories if "error" not in s]
    frames = sum(s["frames"] for s in ok)
    images = sum(s["images"] for s in ok)
    fixed = [s for s in ok if "bg_scene_hits" in s]
    bg_pix = [s["bg_pixel"] for s in fixed if "bg_pixel" in s and not np.isnan(s["bg_pixel"])]
    m = {
        "stories": len(stories), "failed": len(stories) - len(ok),
        "identity_consistency": _ratio(sum(s["identity_hits"] for s in ok), frames),
        "attribute_agreement": {a: _ratio(sum(s["attribute_hits"][a] for s in ok), frames)
                                for a in world.ATTRIBUTES},
        "prompt_adherence": _ratio(sum(sum(s["adherence_hits"].values()) for s in ok),
                                   images * len(ADHERENCE_FIELDS)),
        "adherence_per_field": {f: _ratio(sum(s["adherence_hits"][f] for s in ok), images)
                                for f in ADHERENCE_FIELDS},
        "background_consistency": float(np.mean(bg_pix)) if bg_pix else float("nan"),
        "background_scene_agreement": _ratio(sum(s["bg_scene_hits"] for s in fixed),
                                             sum(s["frames"] for s in fixed)),
        "position_diversity": _ratio(sum(s["diverse_pairs"] for s in ok), sum(s["pairs"] for s in ok)),
        "prompted_diversity": _ratio(sum(s["prompted_diverse_pairs"] for s in ok), sum(s["pairs"] for s in ok)),
        "seconds_per_story": float(np.mean([s["seconds"] for s in ok])) if ok else float("nan"),
        # images whose least sure field is under 0.9: the readout has seldom seen such an image
        "unsure_reads": _ratio(sum(sum(c < 0.9 for c in s.get("confidence", [])) for s in ok), images),
    }
    scores = [x for s in ok for x in s.get("mask_scores", []) if x is not None]
    m["masked_images"] = len(scores)
    for key in ("fg", "in_box", "iou", "covered", "iou_all_fg", "in_box_all_fg"):
        vals = [x[key] for x in scores if x[key] == x[key]]
        m[f"mask_{key}"] = float(np.mean(vals)) if vals else float("nan")
    m["identity_by_mode"] = {
        mode: _ratio(sum(s["identity_hits"] for s in ok if s["mode"] == mode),
                     sum(s["frames"] for s in ok if s["mode"] == mode)) for mode in MODES}
    return m


def _pct(x: float) -> str:
    return "   -" if x != x else f"{100 * x:5.1f}"


def format_tables(result: dict) -> str:
    """Two aligned tables: the headline metrics, then identity consistency by mode and by attribute."""
    names = list(result["methods"])
    w = max([len("method"), *map(len, names)])
    head = (f"{'method':<{w}}  {'identity':>8}  {'adhere':>6}  {'bg-pix':>6}  {'bg-scene':>8}  {'divers':>6}  "
            f"{'(prompt)':>8}  {'mask fg':>7}  {'in box':>6}  {'mask IoU':>8}  {'(all fg)':>8}  {'unsure':>6}  "
            f"{'s/story':>7}  "
            f"{'wall s':>7}  {'failed':>6}")
    lines = [head, "-" * len(head)]
    for n in names:
        m = result["methods"][n]["metrics"]
        wall = m.get("wall_seconds", float("nan"))
        lines.append(f"{n:<{w}}  {_pct(m['identity_consistency']):>8}  {_pct(m['prompt_adherence']):>6}  "
                     f"{_pct(m['background_consistency']):>6}  {_pct(m['background_scene_agreement']):>8}  "
                     f"{_pct(m['position_diversity']):>6}  {_pct(m['prompted_diversity']):>8}  "
                     f"{_pct(m.get('mask_fg', float('nan'))):>7}  {_pct(m.get('mask_in_box', float('nan'))):>6}  "
                     f"{_pct(m.get('mask_iou', float('nan'))):>8}  {_pct(m.get('mask_iou_all_fg', float('nan'))):>8}  "
                     f"{_pct(m['unsure_reads']):>6}  "
                     f"{m['seconds_per_story']:>7.2f}  {wall:>7.1f}  {m['failed']:>6}")
    cols = [*MODES, *world.ATTRIBUTES]
    head2 = f"{'identity by':<{w}}  " + "  ".join(f"{c:>15}" for c in cols)
    lines += ["", head2, "-" * len(head2)]
    for n in names:
        m = result["methods"][n]["metrics"]
        vals = [m["identity_by_mode"][c] for c in MODES] + [m["attribute_agreement"][a] for a in world.ATTRIBUTES]
        lines.append(f"{n:<{w}}  " + "  ".join(f"{_pct(v):>15}" for v in vals))
    lines.append("(percent; identity = frames whose unnamed attributes all match the identity image; bg-* on "
                 "fixed-background stories; unsure = images whose least sure readout field is under 0.9;\n"
                 " mask fg = share of the image the method's mask marks foreground, in box = share of the mask "
                 "inside the character boxes, mask IoU = with the character's pixels, (all fg) = the IoU an\n"
                 " all-foreground mask gets on the same images; - = no masks)")
    return "\n".join(lines)


def merge_results(parts: list[dict], aggregate_records=None) -> dict:
    """One result from those of processes that each ran a contiguous share of the stories (in rank order): the
    stories in the suite's order and the metrics computed over all of them, as one process would have them; a
    method's ``wall_seconds`` is the longest process's.
    ``aggregate_records`` computes a method's metrics from its records (default :func:`aggregate`)."""
    merged = {"settings": dict(parts[0]["settings"]), "methods": {}}
    merged["settings"]["stories"] = sum(p["settings"]["stories"] for p in parts)
    for spec, method in parts[0]["methods"].items():
        records = [r for p in parts for r in p["methods"][spec]["stories"]]
        metrics = (aggregate_records or aggregate)(records)
        metrics["wall_seconds"] = max(p["methods"][spec]["metrics"]["wall_seconds"] for p in parts)
        merged["methods"][spec] = {**method, "metrics": metrics, "stories": records}
    return merged
