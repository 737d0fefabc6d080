"""A story request (what a front end asks for) and its validation: everything that can be checked before the
model loads is checked here, with the rules of ``characonsist.inputs`` and the method Configs, all at once.

    request = StoryRequest(stories=["examples/toy-story.yaml"], model="toy", out="results/toy")
    checked = validate_request(request)      # InputError (bad input) or FolderError (the output folder)
"""

from __future__ import annotations

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
from ..picture import fit_size, load_picture
from ..seeds import DEFAULT_SEED
from ..storyfile import Story, StoryError, load_story
from .folder import OutputFolder, safe_name
from .memory_plan import (
    check_attention_backend,
    check_loras,
    check_memory,
    check_memory_device,
    check_quantize,
    plan_memory,
)
from .model import ModelRef, limits_of, load_t5_tokenizer, resolve_dtype, resolve_model
from .settings import StorySettings, label, method_config


@dataclass
class StoryRequest:
    """Everything a story run needs, as a front end gives it; None = the model's default. ``method_options`` may be
    typed values or text (``"10"``, ``"false"``, as a command line or a web form gives them): text is read in the
    option's type. ``validate_request`` turns it into a ``StorySettings`` (the same field names)."""

    stories: list            # story file paths (or parsed ``storyfile.Story`` objects)
    model: str
    out: str
    method: str = "characonsist"
    method_options: dict = field(default_factory=dict)
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
    settings: StorySettings   # the run's settings: jobs, resume key, manifest, every PNG, the pipeline call
    tokenizer: object | None  # the model's T5 tokenizer when it could be had without the weights
    limits: ModelLimits
    folder: OutputFolder
    names: dict = field(default_factory=dict)   # how the front end names the fields, for its messages
    plan: MemoryPlan | None = None   # what memory / quantize "auto" chose, and why
    notes: list[str] = field(default_factory=list)   # what was decided for the run (identity pictures' fitting)


def method_names() -> list[str]:
    from ..methods import METHODS

    return sorted(METHODS)


def validate_request(request: StoryRequest, names: dict[str, str] | None = None) -> CheckedRequest:
    """Every check that needs no model weights; the one place a ``StorySettings`` is made from a front end's
    request (``names`` renames fields in messages, e.g. the command line's flags).

    Raises InputError (StoryError for story files) with every problem found, or FolderError for the output
    folder. The same request always gets the same messages, whichever front end sent it."""
    names = names or {}
    if not isinstance(request.out, (str, Path)) or not str(request.out).strip():
        raise InputError(f"{names.get('out', 'out')}: give an output folder (it is created if missing)")
    methods = method_names()
    if request.method not in methods:
        raise InputError(f"unknown method {excerpt(request.method)}; valid: {', '.join(methods)}")
    config, recorded = method_config(request.method, dict(request.method_options or {}))
    mode, gpus = check_memory(request.memory, request.gpu_ids, names)
    quantize = check_quantize(request.quantize, names)
    loras = check_loras(request.loras, names)
    backend = check_attention_backend(request.attention_backend, names)
    dtype = resolve_dtype(request.dtype, names)
    stories = load_stories(request.stories)
    ref = resolve_model(request.model, names)
    sizes = resolve_sizes(request, ref, names)
    plan = None
    if "auto" in (mode, quantize):
        largest = max((len(g.images) for s in stories for g in s.groups), default=2)
        plan = plan_memory(mode, quantize, ref, sizes["height"], sizes["width"], sizes["max_sequence_length"],
                           dtype, gpus, min(largest, request.batch_size or largest))
        mode, quantize = plan.memory, plan.quantize
    check_memory_device(mode, names)
    inversion = None
    if request.inversion is not None:
        from ..inversion import parse_inversion

        inversion = parse_inversion(request.inversion).spec()
    elif any(group.picture is not None for story in stories for group in story.groups):
        from ..inversion import InversionConfig

        inversion = InversionConfig().spec()
    settings = StorySettings(
        model=ref.name, dtype=dtype, method=request.method, method_config=config, **sizes, seed=request.seed,
        batch_size=request.batch_size, save_masks=bool(request.save_masks), inversion=inversion, quantize=quantize,
        memory=mode, vae_tiling=bool(request.vae_tiling), attention_backend=backend, compile=bool(request.compile),
        loras=loras, gpu_ids=tuple(gpus), recorded_options=recorded)
    tokenizer = load_t5_tokenizer(ref)
    limits = limits_of(ref, tokenizer)
    problems = story_problems(stories, settings, limits, tokenizer, ref, names)
    picture_issues, notes = picture_problems(stories, settings)
    problems += picture_issues
    if problems:
        raise StoryError(problems)
    folder = OutputFolder(request.out, flag=label(names, "out"))
    folder.check()
    return CheckedRequest(request, stories, ref, settings, tokenizer, limits, folder, names, plan, notes)


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


def resolve_sizes(request: StoryRequest, ref: ModelRef, names: dict[str, str]) -> dict:
    """The run's sizes, steps, guidance and prompt length: the request's, else the model's defaults (explicit values
    are checked, never replaced: ``num_inference_steps=0`` is an error, not the default); the seed is checked too."""
    defaults = ref.defaults
    keys = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")
    sizes = {k: defaults[k] if getattr(request, k) is None else getattr(request, k) for k in keys}
    problems = setting_problems(**sizes, batch_size=request.batch_size, limits=limits_of(ref), names=names)
    problem = seed_problem(names.get("seed", "seed"), request.seed)
    if problem:
        problems.append(problem)
    if problems:
        raise InputError(problems)
    sizes["guidance_scale"] = float(sizes["guidance_scale"])
    return sizes


def picture_problems(stories: list[Story], settings: StorySettings) -> tuple[list[str], list[str]]:
    """Every identity picture of the stories: that it exists and decodes (problems, with the group's place), and how
    it will be fitted to the identity's size (notes: scaled to cover, centre-cropped; ``characonsist.picture``)."""
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
            target = (group.identity.height or settings.height, group.identity.width or settings.width)
            fit = fit_size((image.height, image.width), target)
            notes.append(f"{group.where[0]}: identity picture {group.picture}: {fit.describe()}")
    return problems, notes


def story_problems(stories: list[Story], settings: StorySettings, limits: ModelLimits, tokenizer, ref: ModelRef,
                   names: dict[str, str] | None = None) -> list[str]:
    """The run's sizes and every image's problems with their places: sizes the model cannot take, words it does
    not know, prompts too long, groups without frames, groups too large for one run (the group size rule)."""
    problems = setting_problems(height=settings.height, width=settings.width, limits=limits, names=names)
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
            sizes = [(image.height or settings.height, image.width or settings.width) for image in group.images]
            if all(isinstance(h, int) and isinstance(w, int) for h, w in sizes):
                problems += [f"{group.where[0]}: {p}" for p in group_size_problems(sizes, settings.batch_size, names)]
            images += group.images
            places += group.where
    if tokenizer is not None:
        problems += prompt_problems(images, places, tokenizer, settings.max_sequence_length, limits.vocabulary, model)
    return problems
