"""A story request (what a front end asks for) and its validation: everything that can be checked before the
model loads is checked here, with the rules of ``characonsist.inputs`` and the method Configs, all at once.

    request = StoryRequest(stories=["examples/toy-story.yaml"], model="toy", out="results/toy")
    checked = validate_request(request)      # InputError (bad input) or FolderError (the output folder)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import (
    InputError,
    ModelLimits,
    excerpt,
    group_size_problems,
    image_problems,
    prompt_problems,
    seed_problem,
    setting_problems,
)
from ..memory import MemoryPlan
from ..seeds import DEFAULT_SEED
from ..storyfile import Story, StoryError, load_story
from .folder import OutputFolder, safe_name
from .model import (
    ModelRef,
    check_attention_backend,
    check_loras,
    check_memory,
    check_memory_device,
    check_quantize,
    limits_of,
    load_t5_tokenizer,
    plan_memory,
    resolve_dtype,
    resolve_model,
)

# How the command line names the request's fields, for its messages.
CLI_NAMES = {"height": "--height", "width": "--width", "num_inference_steps": "--steps",
             "guidance_scale": "--guidance", "max_sequence_length": "--max-sequence-length",
             "batch_size": "--batch-size", "seed": "--seed", "out": "--out"}


@dataclass
class StoryRequest:
    """Everything a story run needs; None = the model's default. Method ``options`` may be typed values or text
    (``"10"``, ``"false"``, as a command line or a web form gives them): text is read in the option's type."""

    stories: list            # story file paths (or parsed ``storyfile.Story`` objects)
    model: str
    out: str
    method: str = "characonsist"
    options: dict = field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = DEFAULT_SEED
    max_sequence_length: int | None = None
    batch_size: int | None = None
    memory: str = "none"
    gpu_ids: str | list[int] = "0"
    dtype: str = "auto"
    save_masks: bool = False
    overwrite: bool = False
    quantize: str = "none"            # weight format (characonsist.memory.QUANTIZATIONS) or "auto"
    vae_tiling: bool = False
    attention_backend: str | None = None   # diffusers' attention backend name, e.g. "flash", "_native_cudnn"
    compile: bool = False             # regional torch.compile of the transformer's blocks
    loras: list = field(default_factory=list)   # "SOURCE[:SCALE]" or {"source", "scale"}
    inversion: str | None = None   # how an identity picture is followed (``characonsist.inversion``); None: default


@dataclass
class CheckedRequest:
    """A request that passed every check possible before loading the model."""

    request: StoryRequest
    stories: list[Story]
    ref: ModelRef
    run: dict                 # the run's settings, recorded in the manifest and every PNG
    mode: str
    gpus: list[int]
    tokenizer: object | None  # the model's T5 tokenizer when it could be had without the weights
    limits: ModelLimits
    folder: OutputFolder
    names: dict = field(default_factory=dict)   # how the front end names the fields, for its messages
    plan: MemoryPlan | None = None   # what --memory auto / --quantize auto chose, and why
    notes: list[str] = field(default_factory=list)   # what was decided for the run (identity pictures' fitting)


def method_names() -> list[str]:
    from ..methods import METHODS

    return sorted(METHODS)


def method_options(method: str, options: dict) -> dict:
    """The options recorded for the run: share_bg and use_token_merge at their defaults (when the method has
    them), then the given ones in their types; the method's Config checks them (InputError lists every problem)."""
    from ..methods import method_class
    from ..methods.base import parse_option

    try:
        cls = method_class(method)
    except ValueError as e:
        raise InputError(str(e)) from None
    config = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    recorded = {k: config[k] for k in ("share_bg", "use_token_merge") if k in config}
    unknown = [k for k in options if k not in config]
    if unknown:
        raise InputError(f"method {method!r} has no option(s) {', '.join(map(excerpt, unknown))}; its options: "
                         f"{', '.join(config) or 'none'}")
    for key, value in options.items():
        recorded[key] = parse_option(cls.Config, key, value) if isinstance(value, str) else value
    built = cls(**recorded)   # the Config's __post_init__: types, ranges, vocabularies, step order
    return {k: getattr(built.config, k) for k in recorded}


def validate_request(request: StoryRequest, names: dict[str, str] | None = None) -> CheckedRequest:
    """Every check that needs no model weights (``names`` renames fields in messages, e.g. ``CLI_NAMES``).

    Raises InputError (StoryError for story files) with every problem found, or FolderError for the output
    folder. The same request always gets the same messages, whichever front end sent it."""
    names = names or {}
    if not isinstance(request.out, (str, Path)) or not str(request.out).strip():
        raise InputError(f"{names.get('out', 'out')}: give an output folder (it is created if missing)")
    methods = method_names()
    if request.method not in methods:
        raise InputError(f"unknown method {excerpt(request.method)}; valid: {', '.join(methods)}")
    options = method_options(request.method, dict(request.options or {}))
    mode, gpus = check_memory(request.memory, request.gpu_ids)
    quantize = check_quantize(request.quantize)
    loras = check_loras(request.loras)
    backend = check_attention_backend(request.attention_backend)
    dtype = resolve_dtype(request.dtype)
    stories = load_stories(request.stories)
    ref = resolve_model(request.model)
    run = resolve_run(request, ref, options, dtype, names)
    plan = None
    if "auto" in (mode, quantize):
        largest = max((len(g.images) for s in stories for g in s.groups), default=2)
        plan = plan_memory(mode, quantize, ref, run, gpus, min(largest, request.batch_size or largest))
        mode, quantize = plan.memory, plan.quantize
    check_memory_device(mode)
    run.update(quantize=quantize, memory=mode, vae_tiling=bool(request.vae_tiling), attention_backend=backend,
               compile=bool(request.compile), loras=loras)
    tokenizer = load_t5_tokenizer(ref)
    limits = limits_of(ref, tokenizer)
    problems = story_problems(stories, run, limits, tokenizer, ref, names)
    picture_issues, notes = picture_problems(stories, run)
    problems += picture_issues
    if problems:
        raise StoryError(problems)
    folder = OutputFolder(request.out)
    folder.check()
    return CheckedRequest(request, stories, ref, run, mode, gpus, tokenizer, limits, folder, names, plan, notes)


def load_stories(paths: list) -> list[Story]:
    """Every story (a file path, or a ``Story`` already parsed, e.g. by ``storyfile.parse_text`` from a web form),
    all problems at once; with several, their output folders must be distinct names inside the output folder."""
    if isinstance(paths, (str, Path, Story)):
        paths = [paths]
    if not paths:
        raise InputError("no story file given")
    problems, stories = [], []
    for path in paths:
        if isinstance(path, Story):
            stories.append(path)
            continue
        try:
            stories.append(load_story(path))
        except StoryError as e:
            problems += e.problems
    if len(paths) > 1:
        stems = [Path(s.path).stem for s in stories]
        for story, stem in zip(stories, stems, strict=True):
            why = safe_name(stem)
            if why:
                problems.append(f"{story.path}: the file's name (without its suffix) names its output folder, "
                                f"and {why}; rename the file")
        if len(set(stems)) != len(stems):
            problems.append("two story files have the same name; their output folders would collide")
    if problems:
        raise StoryError(problems)
    return stories


def resolve_run(request: StoryRequest, ref: ModelRef, options: dict, dtype: str, names: dict[str, str]) -> dict:
    """The full settings of this run: the request's, else the model's defaults (explicit values are checked,
    never replaced: ``--steps 0`` is an error, not the default)."""
    defaults = ref.defaults

    def pick(key, default_key=None):
        value = getattr(request, key)
        return defaults[default_key or key] if value is None else value

    run = {"model": ref.name, "dtype": dtype, "method": request.method, "method_options": options,
           "height": pick("height"), "width": pick("width"), "num_inference_steps": pick("num_inference_steps"),
           "guidance_scale": pick("guidance_scale"), "max_sequence_length": pick("max_sequence_length"),
           "seed": request.seed, "batch_size": request.batch_size, "save_masks": bool(request.save_masks)}
    problems = setting_problems(height=run["height"], width=run["width"],
                                num_inference_steps=run["num_inference_steps"],
                                guidance_scale=run["guidance_scale"], max_sequence_length=run["max_sequence_length"],
                                batch_size=run["batch_size"], limits=limits_of(ref), names=names)
    problem = seed_problem(names.get("seed", "seed"), run["seed"])
    if problem:
        problems.append(problem)
    if problems:
        raise InputError(problems)
    run["guidance_scale"] = float(run["guidance_scale"])
    if request.inversion is not None:
        from ..inversion import parse_inversion

        run["inversion"] = parse_inversion(request.inversion).spec()
    return run


def picture_problems(stories: list[Story], run: dict) -> tuple[list[str], list[str]]:
    """Every identity picture of the stories: that it exists and decodes (problems, with the group's place), and how
    it will be fitted to the identity's size (notes: scaled to cover, centre-cropped; ``characonsist.picture``)."""
    from ..picture import fit_size, load_picture

    problems, notes = [], []
    for story in stories:
        for group in story.groups:
            if group.picture is None:
                continue
            try:
                image = load_picture(group.picture, f"{group.where[0]}: picture")
            except InputError as e:
                problems += e.problems
                continue
            target = (group.identity.height or run["height"], group.identity.width or run["width"])
            fit = fit_size((image.height, image.width), target)
            notes.append(f"{group.where[0]}: identity picture {group.picture}: {fit.describe()}")
    if notes and "inversion" not in run:
        from ..inversion import InversionConfig

        run["inversion"] = InversionConfig().spec()
    return problems, notes


def story_problems(stories: list[Story], run: dict, limits: ModelLimits, tokenizer, ref: ModelRef,
                   names: dict[str, str] | None = None) -> list[str]:
    """The run's sizes and every image's problems with their places: sizes the model cannot take, words it does
    not know, prompts too long, groups without frames, groups too large for one run (the group size rule)."""
    problems = setting_problems(height=run["height"], width=run["width"], limits=limits, names=names)
    model = "the toy model" if ref.kind == "toy" else f"model {ref.name}"
    images, places = [], []
    for story in stories:
        for group in story.groups:
            if not group.frames:
                if story.format == "text":
                    problems.append(f"{group.where[0]}: this group has an identity image and no frames (a blank "
                                    "line or a new scene ends a group); put its frames after it, without a blank line")
                else:
                    problems.append(f"{group.where[0]}: this scene has one image, which is its identity (the "
                                    "'identity', else the first frame); give it at least one more frame")
            problems += image_problems(group.images, group.where, limits)
            sizes = [(image.height or run["height"], image.width or run["width"]) for image in group.images]
            if all(isinstance(h, int) and isinstance(w, int) for h, w in sizes):
                problems += [f"{group.where[0]}: {p}" for p in group_size_problems(sizes, run.get("batch_size"), names)]
            images += group.images
            places += group.where
    if tokenizer is not None:
        problems += prompt_problems(images, places, tokenizer, run["max_sequence_length"], limits.vocabulary, model)
    return problems
