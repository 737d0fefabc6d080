"""``characonsist bench toy``: consistency methods on toy-world stories, scored by the readout.

For each method, every story (identity + frames) is generated in one pipeline call, every image is read back
(:mod:`characonsist.toy.readout`), and the metrics below are computed (docs/TOY_WORLD.md defines them):

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

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._compat import dtype_kwarg
from ..seeds import DEFAULT_SEED
from . import world
from .pictures import PICTURE_KINDS, aggregate_pictures, format_picture_table, score_picture, story_picture
from .suite import MODES, ToyStory, heldout_suite, load_stories, make_suite, reduced_suite

# ablations of CharaConsist: name -> (registry name, options); the option names are the engine's contract
ALIASES: dict[str, tuple[str, dict]] = {
    "characonsist-no-tracking": ("characonsist", {"point_tracking": False}),
    "characonsist-no-merge": ("characonsist", {"use_token_merge": False}),
    "characonsist-no-mask": ("characonsist", {"use_mask": False}),
}
ORACLE = "oracle"            # pseudo-method: the renderer draws the truth (the readout's ceiling)
# --methods all: every registry method and every CharaConsist ablation (the GPU run)
ALL_METHODS = ("vanilla", "characonsist", "characonsist-no-tracking", "characonsist-no-merge", "characonsist-no-mask",
               "consistory", "storysync", "storydiffusion")
ORACLE_TOKEN_PX = 8          # the oracle's mask grid: one token per 8x8 pixels, the toy model's (VAE 4x, 2x2 patches)
ADHERENCE_FIELDS = ("scene", "kind", "position", "size")
BG_TOLERANCE = 32            # per-channel colour difference (0-255) under which a background pixel "agrees"
BOX_MARGIN = 0.05            # of the image size, around the nominal character box (covers the renderer's jitter)


# ---------------------------------------------------------------- methods

def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def expand_methods(text: str) -> list[str]:
    """``--methods`` -> method specs; ``all`` stands for :data:`ALL_METHODS` (and may be combined with others)."""
    out: list[str] = []
    for m in (m.strip() for m in text.split(",")):
        for spec in (ALL_METHODS if m == "all" else (m,) if m else ()):
            if spec not in out:
                out.append(spec)
    return out


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name+option=value+...`` (or an ablation alias) -> (registry name, options). A method's own
    option is read as ``--option`` reads it (``methods.base.parse_option``: ``point_tracking=off`` is False); other
    names (the bench's ``seeding`` and ``inversion``) as before."""
    from ..methods import method_class
    from ..methods.base import option_types, parse_option

    name, *opts = spec.strip().split("+")
    base, options = ALIASES.get(name, (name, {}))
    options = dict(options)
    try:
        config = None if base == ORACLE else method_class(base).Config
    except ValueError:   # an unknown method: the pipeline names the valid ones
        config = None
    typed = option_types(config) if config is not None else {}
    for opt in opts:
        key, sep, val = opt.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"method {spec!r}: option {opt!r} is not key=value (e.g. characonsist+share_bg=false)")
        if key in typed:   # the method's own option, read as --option reads it
            options[key] = parse_option(config, key, val)
        else:              # the bench's seeding / inversion, or a name the method's check will refuse
            options[key] = _value(val.strip())
    return base, options


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
    for (scene, kind, action), r in zip(truth, reads):
        size, position = action.split("-")
        for f, v in zip(ADHERENCE_FIELDS, (scene, kind, position, size)):
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
        for (scene, _, action), r, image, mask in zip(truth, reads, images, masks):
            if mask is None:
                per_image.append(None)
                continue
            region = character_region([action, r["action"]], image.shape[0])
            chars = character_pixels(image, [scene, r["scene"]], region)
            per_image.append(mask_scores(mask, chars, region))
        out["mask_scores"] = per_image
    return out


def save_strip(image_dir, spec: str, name: str, images: list, axis: int = 1) -> None:
    """A story's images side by side (``axis=1``; stacked: 0) as ``IMAGE_DIR/<spec>/<name>.png``."""
    from PIL import Image

    folder = Path(image_dir) / spec.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(images, axis=axis)).save(folder / f"{name}.png")


def check_prompt_lengths(pipe, stories, max_sequence_length: int) -> None:
    """Every story image's prompt fits the text encoder (``pipe.token_spans``), checked before any generation;
    one ``ValueError`` with every problem."""
    if pipe is None or not hasattr(pipe, "token_spans"):
        return
    problems = set()
    for story in stories:
        for im in story.images:
            try:
                pipe.token_spans(im, max_sequence_length)
            except ValueError as e:
                problems.add(str(e))
    if problems:
        raise ValueError("\n".join(sorted(problems)))


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


# ---------------------------------------------------------------- running

def _oracle_images(story: ToyStory, seed: int, size: int, character: world.Character | None = None
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The truth: one sampled identity (or ``character``) drawn into every image; a scene keeps its layout within
    a story. Also the true character masks pooled to the toy model's token grid (:func:`pool_mask`)."""
    rng = np.random.default_rng(seed)
    truth = story.truth
    ch = character if character is not None else world.sample_character(rng, kind=truth[0][1])
    images, masks = [], []
    for scene, _, action in truth:
        layout = np.random.default_rng([seed, list(world.SCENES).index(scene)])
        img, mask = world.render(scene, ch, action, size=size, rng=layout, return_mask=True)
        images.append(img)
        masks.append(pool_mask(mask))
    return images, masks


def _mask_text(mask) -> list[str] | None:
    """A token mask for the JSON: one string of 0/1 per row."""
    return None if mask is None else ["".join("1" if v else "0" for v in row) for row in np.asarray(mask, bool)]


SEEDING_CHOICES = ("official", "shared", "per_image")


def method_seeding(name: str, seeding: str = "official") -> str | None:
    """The noise convention a method runs with: its official one (``Method.seeding``: "shared" for CharaConsist
    and vanilla, "per_image" for the peers) or the one forced by ``seeding``; None for the oracle."""
    if seeding not in SEEDING_CHOICES:
        raise ValueError(f"seeding={seeding!r}; valid: {', '.join(SEEDING_CHOICES)}")
    if name == ORACLE:
        return None
    if seeding != "official":
        return seeding
    from ..methods import method_class
    return method_class(name).seeding


def run_bench(pipe, stories: list[ToyStory], methods: list[str], seed: int = DEFAULT_SEED, height: int = 128,
              width: int = 128, num_inference_steps: int = 20, max_sequence_length: int = 32,
              log=None, readout_net=None, image_dir: str | Path | None = None, seeding: str = "official",
              identity_picture: str | None = None, inversion: str | None = None, on_method=None,
              **gen_kwargs) -> dict:
    """Run ``methods`` on ``stories`` with ``pipe`` (a ``CharaConsistPipeline``) and score them.

    Story ``i`` is generated from seed ``seed + story.seed``, spread over its images by each method's official
    convention (``seeding="official"``; ``seeds.story_seeds``): CharaConsist and vanilla give every image that
    seed (identity and frames start from the same noise), ConsiStory, StorySync and StoryDiffusion give each image
    its own noise (the identity keeps the story's seed). ``seeding="shared"`` / ``"per_image"`` forces one convention
    on every method. Each method's convention is recorded (``methods[spec]["seeding"]``, ``settings["seeding"]``)
    with every story's seeds. ``gen_kwargs`` go to the pipeline call (e.g. ``guidance_scale``).
    With ``image_dir``, each story is saved as one strip ``image_dir/<method>/<story>.png`` (identity first).

    ``identity_picture`` (``toy.pictures.PICTURE_KINDS``): every story's identity is a render of a known character
    (``pictures.story_picture``), followed by ``inversion`` (a spec's own ``+inversion=...`` wins), and each method
    also gets ``metrics["picture"]``: the frames against the picture's true attributes, the reconstruction's PSNR and
    readout (``pictures.aggregate_pictures``); the oracle draws the picture's character. The strips then start with
    the picture.
    Returns ``{"settings": ..., "methods": {spec: {"method", "options", "seeding", "metrics", "stories"}}}``;
    ``on_method(result)``, if given, is called with the result so far after each method (the command line writes
    it to ``--json``, so a run cut short keeps the methods it finished).
    """
    from ..seeds import story_seeds
    from .readout import read_batch

    conventions = {}
    for spec in methods:   # a spec's own "+seeding=..." overrides the run's convention (e.g. vanilla+seeding=per_image)
        name, options = parse_method(spec)
        conventions[spec] = method_seeding(name, options.get("seeding", seeding))
    settings = {"seed": seed, "height": height, "width": width, "num_inference_steps": num_inference_steps,
                "max_sequence_length": max_sequence_length, "stories": len(stories), "seeding": conventions,
                **gen_kwargs}
    if identity_picture is not None:
        if identity_picture not in PICTURE_KINDS:
            raise ValueError(f"identity picture {identity_picture!r}; valid: {', '.join(PICTURE_KINDS)}")
        from ..inversion import parse_inversion

        settings.update(identity_picture=identity_picture, inversion=parse_inversion(inversion).spec())
        for spec in methods:
            spec_inv = parse_method(spec)[1].get("inversion")
            if spec_inv is not None:
                parse_inversion(str(spec_inv))
    result: dict = {"settings": settings, "methods": {}}
    check_prompt_lengths(pipe, stories, max_sequence_length)
    for spec in methods:
        name, options = parse_method(spec)
        options.pop("seeding", None)
        spec_inversion = options.pop("inversion", inversion)
        if identity_picture is not None and name != ORACLE:
            options.update(inversion=None if spec_inversion is None else str(spec_inversion))
        records = []
        t_method = time.perf_counter()
        for n, story in enumerate(stories):
            s = seed + story.seed
            seeds = story_seeds(s, len(story.images), conventions[spec]) if conventions[spec] else [s]
            picture = character = psnr = None
            if identity_picture is not None:
                picture, character = story_picture(*story.truth[0], s, identity_picture, height)
            t0 = time.perf_counter()
            try:
                if name == ORACLE:
                    images, masks = _oracle_images(story, s, height, character)
                else:
                    extra = {"identity_image": picture} if picture is not None else {}
                    out = pipe(identity=story.identity, frames=list(story.frames), method=name, seed=seeds,
                               num_inference_steps=num_inference_steps, height=height, width=width,
                               max_sequence_length=max_sequence_length, output_type="np", **gen_kwargs, **options,
                               **extra)
                    images = [to_uint8(im) for im in (out.identity, *out.frames)]
                    masks = [None if m is None else np.asarray(m, bool) for m in (out.masks or [])]
                    if out.picture is not None:
                        psnr = out.picture["psnr"]
                if picture is not None and name == ORACLE:   # the truth: the picture itself is the identity
                    images[0] = picture
            except Exception as e:  # a failing story is reported, the others still count
                records.append({"name": story.name, "mode": story.mode, "error": f"{type(e).__name__}: {e}"})
                if log:
                    log(f"[{spec}] {story.name}: FAILED {type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - t0
            if image_dir is not None:
                save_strip(image_dir, spec, story.name, [picture, *images] if picture is not None else images)
            reads, conf = read_batch(images, readout_net, confidence=True)
            rec = score_story(story.truth, reads, images, story.mode, masks if any(
                m is not None for m in masks) else None)
            rec.update(name=story.name, mode=story.mode, seconds=seconds, seed=s, seeds=seeds, reads=reads,
                       prompts=[im.spec() for im in story.images],
                       confidence=[min(c.values()) for c in conf])
            if "mask_scores" in rec:
                rec["masks"] = [_mask_text(m) for m in masks]
            if character is not None:
                rec.update(score_picture(character.attributes(), reads, psnr))
                named = [r[f] == v for (scene, kind, action), r in zip(story.truth[1:], reads[1:])
                         for f, v in zip(ADHERENCE_FIELDS, (scene, kind, *action.split("-")[::-1]))]
                rec.update(frame_adherence_hits=int(sum(named)), frame_adherence_fields=len(named))
            records.append(rec)
            if log:
                fg = [x["fg"] for x in rec.get("mask_scores", []) if x is not None]
                log(f"[{spec}] {n + 1}/{len(stories)} {story.name}: identity {rec['identity_hits']}/{rec['frames']}"
                    + (f", picture {rec['truth_hits']}/{rec['frames']}" if "truth_hits" in rec else "")
                    + (f", mask fg {100 * np.mean(fg):.0f}%" if fg else "") + f" in {seconds:.1f}s")
        metrics = aggregate(records)
        if identity_picture is not None:
            metrics["picture"] = aggregate_pictures(records)
        metrics["wall_seconds"] = time.perf_counter() - t_method    # generation, readout and scoring
        result["methods"][spec] = {"method": name, "options": options, "seeding": conventions[spec], "metrics": metrics,
                                   "stories": records}
        if log:
            log(f"[{spec}] done in {metrics['wall_seconds']:.1f}s")
        if on_method is not None:
            on_method(result)
    return result


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


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``characonsist bench toy``."""
    parser.add_argument("--methods", default="vanilla,characonsist",
                        help="comma-separated: registry names, ablations (characonsist-no-tracking, "
                             "characonsist-no-merge, characonsist-no-mask), name+option=value (values as --option "
                             "reads them; +seeding=shared|per_image: that method's noise convention), 'oracle' "
                             "(the renderer's truth: the readout's ceiling), or 'all' (" + ",".join(ALL_METHODS) + ") "
                             "(default: %(default)s)")
    parser.add_argument("--stories", default=None,
                        help="story file in the toy vocabulary (docs/TOY_WORLD.md) instead of the fixed suite")
    parser.add_argument("--reduced", action="store_true",
                        help="the CPU subset of the suite (one story per mode and kind: 9 stories)")
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out suite: 60 other stories and noises, nothing tuned on them")
    parser.add_argument("--two-characters", action="store_true",
                        help="stories with two characters of different kinds in every image (128x256, at the model's "
                             "height and twice its width): the two-character suite (36 stories) or --stories with "
                             "two-character lines; scored per character, with the leak between them "
                             "(docs/TOY_WORLD.md)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N stories")
    parser.add_argument("--json", default=None, help="write every metric and per-story readout here (a file there that "
                        "the bench did not write is refused unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="with --json: replace the file even if it is not a bench report")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="save each story as a strip DIR/<method>/<story>.png (identity first)")
    parser.add_argument("--model", default="toy",
                        help="'toy' (shipped toy model), 'tiny' (random tiny FLUX, plumbing only) or a diffusers folder "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the model and the readout run there (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS when set, else every core this process "
                             "may use)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's weights and compute type (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed; story i uses seed + i (default: %(default)s)")
    parser.add_argument("--seeding", default="official", choices=SEEDING_CHOICES,
                        help="how a story's seed reaches its images: each method's official convention (CharaConsist, "
                             "vanilla: the same noise for every image; the peers: one noise per image), or one "
                             "convention for every method (default: %(default)s)")
    parser.add_argument("--identity-picture", default=None, choices=PICTURE_KINDS,
                        help="the identity is a picture of a known character (render: as trained; offgrid: another "
                             "size and position; degraded: the readout's degradations); the frames are scored against "
                             "its true attributes (docs/TOY_WORLD.md)")
    parser.add_argument("--inversion", default=None, metavar="MODE[:KEY=VALUE...]",
                        help="how the identity follows its picture (characonsist.inversion: renoise, euler, fireflow, "
                             "rf; e.g. euler:follow=start); a method spec's own +inversion=... wins (default: the "
                             "library's)")
    parser.add_argument("--quiet", action="store_true", help="no per-story progress lines")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="split the stories over N GPUs of this host, one process each, results merged into one "
                             "JSON (starts `accelerate launch --multi_gpu --num_processes N -m characonsist bench toy "
                             "...`; needs --device cuda)")


def is_report(path: str | Path) -> bool:
    """Whether ``path`` holds a report this bench wrote (a JSON object with its ``settings`` and ``methods``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("methods"), dict) and \
        isinstance(data.get("settings"), dict) and "suite" in data["settings"]


def argument_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the options before any story is read or the model loads (one line each)."""
    from ..inputs import MAX_STEPS, int_problem

    problems = []
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit {args.limit}: give the number of stories to run, at least 1 (leave it out for all)")
    if args.steps is not None:
        problem = int_problem("--steps", args.steps, 1, MAX_STEPS)
        if problem:
            problems.append(problem)
    if args.json:
        path = Path(args.json)
        if path.is_symlink() or path.is_dir() or (path.exists() and not path.is_file()):
            problems.append(f"--json {args.json}: not a plain file; give a file path")
        elif path.exists() and not getattr(args, "force", False) and not is_report(path):
            problems.append(f"--json {args.json}: the file exists and is not a report of this bench; choose another "
                            "path, or add --force to replace it")
    return problems


def write_report(path: str | Path, result: dict) -> None:
    """The report as JSON, written atomically (a temporary beside it, renamed over it)."""
    from ..app.folder import write_file

    write_file(path, json.dumps(_plain(result), indent=1).encode())


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32"):
    """(CharaConsistPipeline, defaults) for ``toy``, ``tiny`` or a diffusers folder."""
    import torch

    from ..pipeline import CharaConsistPipeline

    torch_dtype = getattr(torch, dtype)
    defaults = {"height": 128, "width": 128, "num_inference_steps": 20, "max_sequence_length": 32}
    if model == "toy":
        from .model import load_toy_pipeline
        flux, d = load_toy_pipeline(device=device, dtype=torch_dtype)
        defaults.update(d)
    elif model == "tiny":
        from ..testing import tiny_flux_pipeline
        flux = tiny_flux_pipeline(dtype=torch_dtype).to(device)
        defaults.update(num_inference_steps=2, max_sequence_length=64)  # its T5 vocabulary spells toy words out
    else:
        from diffusers import FluxPipeline
        flux = FluxPipeline.from_pretrained(model, **dtype_kwarg(torch_dtype)).to(device)
    pipe = CharaConsistPipeline.from_pipe(flux)
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a positive number (the usual way to cap a job's threads), else None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run the bench, or None when it can (checked before anything loads)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device!r}: {e}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available to this PyTorch ({torch.__version__})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return f"--device {device}: MPS is not available"
    elif dev.type != "cpu":
        return f"--device {device}: use cpu, cuda, cuda:N or mps"
    return None


def device_name(device: str) -> str:
    """A human name of ``device`` for the JSON (the GPU's model, or the CPU and its thread count)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{torch.get_num_threads()} torch threads on {cpu_cores()} cores"
    return str(dev)


def readout_on(device: str):
    """The shipped readout on ``device`` (:func:`device_readout`), or None on the CPU, where ``read_batch`` uses
    its cached CPU copy."""
    import torch

    from .readout import load_readout

    if torch.device(device).type == "cpu":
        return None
    return device_readout(load_readout(), device)


def device_readout(net, device: str):
    """A copy of readout ``net`` on ``device`` that takes the CPU batches ``readout.read_batch`` builds and returns
    its logits on the CPU (``net`` itself stays where it is)."""
    import copy

    import torch

    class DeviceReadout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(net).to(device).eval()

        def forward(self, x):
            return {f: v.float().cpu() for f, v in self.net(x.to(device)).items()}

    return DeviceReadout().eval()


def _plain(x):
    """JSON-safe copy: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if x != x else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def run(args: argparse.Namespace) -> int:
    """``characonsist bench toy``: print the tables, optionally write JSON; 0 on success."""
    import torch

    t_start = time.perf_counter()
    methods = expand_methods(args.methods)
    if not methods:
        print("bench toy: --methods is empty", file=sys.stderr)
        return 2
    problem = check_device(args.device)
    if problem:
        print(f"bench toy: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"bench toy: --threads {args.threads}: needs at least 1", file=sys.stderr)
        return 2
    problems = argument_problems(args)
    if problems:
        for problem in problems:
            print(f"bench toy: {problem}", file=sys.stderr)
        return 2
    from ..app import parallel

    procs = parallel.join()   # several processes (accelerate launch / torchrun): each runs a share of the stories
    if procs is not None:
        dev = torch.device(args.device)
        if dev.type == "cuda" and dev.index is not None:
            print(f"bench toy: --device {args.device} with {procs.size} processes: give --device cuda (each process "
                  "takes its own GPU)", file=sys.stderr)
            return 2
        if dev.type == "cuda":
            args.run_device = procs.device()    # this process's GPU; the JSON keeps --device as given
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or omp_threads() or max(cpu_cores() // (procs.size if procs else 1), 1))
    try:
        return _run(args, methods, t_start, procs)
    finally:
        torch.set_num_threads(threads)     # a caller in the same process (tests) keeps its own setting


def _device(args: argparse.Namespace) -> str:
    """Where this process runs: ``--device``, or its own GPU when it is one of several processes."""
    return getattr(args, "run_device", None) or args.device


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


def _two_suite(args: argparse.Namespace) -> tuple[list, str]:
    """The stories of ``--two-characters``: its suite, or ``--stories`` with two-character lines."""
    from .suite import load_two_stories, two_character_suite

    for flag, value in (("--reduced", args.reduced), ("--heldout", args.heldout),
                        ("--identity-picture", getattr(args, "identity_picture", None)),
                        ("--inversion", getattr(args, "inversion", None))):
        if value:
            raise ValueError(f"{flag} is not available with --two-characters (one suite; --limit N runs its first N "
                             "stories)")
    if args.stories:
        return load_two_stories(args.stories), str(args.stories)
    return two_character_suite(), "two-characters"


def _two_size_problem(model: str, defaults: dict, pipe) -> str | None:
    """Why ``model`` cannot draw the two-character stories (its height x twice its width, one character per
    square half), or None."""
    h, w = defaults["height"], defaults["width"]
    if h != w:
        return (f"--two-characters: model {model!r} has a default size of {h}x{w} (height x width); two-character "
                "images are two square halves side by side, so the model's own size must be square")
    if pipe is not None and hasattr(pipe, "input_limits"):
        limits = pipe.input_limits()
        if limits.max_side is not None and 2 * w > limits.max_side:
            return (f"--two-characters: model {model!r} takes at most {limits.max_side} px per side (twice its native "
                    f"{limits.native}), but the two-character images are {h}x{2 * w}")
    return None


def _run(args: argparse.Namespace, methods: list[str], t_start: float, procs=None) -> int:
    import torch

    try:
        for m in methods:
            parse_method(m)
        if getattr(args, "two_characters", False):
            stories, suite = _two_suite(args)
        elif args.stories:
            stories = load_stories(args.stories)
            suite = str(args.stories)
        else:
            if args.reduced and args.heldout:
                raise ValueError("--reduced and --heldout name two suites; pick one")
            stories = reduced_suite() if args.reduced else heldout_suite() if args.heldout else make_suite()
            suite = "reduced" if args.reduced else "heldout" if args.heldout else "full"
    except ValueError as e:  # StoryError is a ValueError
        print(f"bench toy: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        stories = stories[:args.limit]
    n_stories = len(stories)
    if procs is not None:
        stories = procs.share(stories)    # contiguous slices, merged back in order by process 0
    pipe = None
    defaults = {"height": 128, "width": 128, "num_inference_steps": 20, "max_sequence_length": 32}
    if any(parse_method(m)[0] != ORACLE for m in methods):
        pipe, defaults = load_pipeline(args.model, _device(args), args.dtype)
    two = getattr(args, "two_characters", False)
    if two:
        problem = _two_size_problem(args.model, defaults, pipe)
        if problem:
            print(f"bench toy: {problem}", file=sys.stderr)
            return 2
    gen = {k: defaults[k] for k in ("height", "width", "num_inference_steps", "max_sequence_length")}
    if args.steps is not None:
        gen["num_inference_steps"] = args.steps
    if "guidance_scale" in defaults:
        gen["guidance_scale"] = defaults["guidance_scale"]
    tag = "" if procs is None else f"(process {procs.rank}) "
    log = None if args.quiet else (lambda msg: print(tag + msg, file=sys.stderr, flush=True))
    if procs is not None:
        procs.barrier()      # every process has its model: the run's time starts together
    load_seconds = time.perf_counter() - t_start
    t0 = time.perf_counter()
    try:
        if two:
            from .bench_two import run_two_bench

            gen.pop("width")
            result = run_two_bench(pipe, stories, methods, seed=args.seed, log=log, image_dir=args.images,
                                   readout_net=readout_on(_device(args)), seeding=args.seeding, **gen)
        else:
            keep = None
            if args.json and procs is None:      # each finished method is on disk before the next one starts

                def keep(partial: dict) -> None:
                    if not Path(args.json).exists() or is_report(args.json):
                        partial["settings"].update(suite=suite, model=args.model, device=args.device,
                                                   partial=f"{len(partial['methods'])} of {len(methods)} methods")
                        write_report(args.json, partial)

            result = run_bench(pipe, stories, methods, seed=args.seed, log=log, image_dir=args.images,
                               readout_net=readout_on(_device(args)), seeding=args.seeding,
                               identity_picture=getattr(args, "identity_picture", None),
                               inversion=getattr(args, "inversion", None), on_method=keep, **gen)
            result["settings"].pop("partial", None)
    except ValueError as e:
        result = {"error": str(e)}
    if procs is not None:
        parts = procs.gather(result)
        if not procs.main:
            return 0      # process 0 prints and writes the merged result
        errors = sorted({p["error"] for p in parts if "error" in p})
        if errors:
            result = {"error": "\n".join(errors)}
        elif two:
            from .bench_two import merge_two_results
            result = merge_two_results(parts)
        else:
            result = merge_results(parts)
    if "error" in result:
        print(f"bench toy: {result['error']}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t_start
    result["settings"].update(suite=suite, model=args.model, device=args.device, device_name=device_name(_device(args)),
                              dtype=args.dtype, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                              processes=procs.size if procs else 1,
                              load_seconds=load_seconds, run_seconds=time.perf_counter() - t0, total_seconds=total)
    model = f"model {args.model}, {gen['num_inference_steps']} steps" if pipe is not None else "no model"
    where = f"{args.device} ({result['settings']['device_name']})" if procs is None else \
        f"{procs.size} processes on {'cpu' if args.device == 'cpu' else 'cuda'} ({result['settings']['device_name']}, each)"
    print(f"toy bench: {n_stories} stories ({suite}), {model}, {where}")
    if two:
        from .bench_two import format_two_tables
        print(format_two_tables(result))
    else:
        print(format_tables(result))
    if result["settings"].get("identity_picture"):
        print()
        print(format_picture_table(result))
    print("seeding: " + ", ".join(f"{n} {m.get('seeding') or '-'}" for n, m in result["methods"].items()))
    per = ", ".join(f"{n} {m['metrics']['wall_seconds']:.0f}s" for n, m in result["methods"].items())
    print(f"total {total:.0f}s wall: loading {load_seconds:.0f}s, {per}")
    if args.json:
        if Path(args.json).exists() and not getattr(args, "force", False) and not is_report(args.json):
            print(f"bench toy: --json {args.json}: the file appeared while the bench ran and is not a report of this "
                  "bench; not replaced (the tables above are the results)", file=sys.stderr)
            return 2
        write_report(args.json, result)
        print(f"wrote {args.json}")
    failed = sum(m["metrics"]["failed"] for m in result["methods"].values())
    if failed:
        print(f"bench toy: {failed} story runs failed (see the log above / the JSON)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m characonsist.toy.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
