"""Running the toy bench: method specs (``name+option=value``, ablation aliases, the oracle), each story generated
in one pipeline call with each method's seed convention, every image read back (:mod:`characonsist.toy.readout`)
and scored (:mod:`characonsist.toy.scoring`); the pipeline and the readout on a device. The command line is
:mod:`characonsist.toy.bench`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .._compat import dtype_kwarg
from ..seeds import DEFAULT_SEED, story_seeds
from . import world
from .pictures import PICTURE_KINDS, aggregate_pictures, score_picture, story_picture
from .scoring import ADHERENCE_FIELDS, aggregate, pool_mask, score_story, to_uint8
from .suite import ToyStory

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


def save_strip(image_dir, spec: str, name: str, images: list, axis: int = 1) -> None:
    """A story's images side by side (``axis=1``; stacked: 0) as ``IMAGE_DIR/<spec>/<name>.png``."""

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
                named = [r[f] == v for (scene, kind, action), r in zip(story.truth[1:], reads[1:], strict=True)
                         for f, v in zip(ADHERENCE_FIELDS, (scene, kind, *action.split("-")[::-1]), strict=True)]
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

    import torch

    class DeviceReadout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(net).to(device).eval()

        def forward(self, x):
            return {f: v.float().cpu() for f, v in self.net(x.to(device)).items()}

    return DeviceReadout().eval()
