"""``CharaConsistPipeline``: a FluxPipeline that generates a story (identity image + frames) consistently, and
its siblings on the other backbones (``ChromaStoryPipeline``).

Loading, offloading and device maps are the stock pipeline's own (``from_pretrained``, ``from_pipe``,
``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``device_map="balanced"``); ``__call__`` takes
a story instead of a prompt. ``CharaConsistPipeline.from_pretrained`` / ``from_pipe`` find the backbone from the
model's transformer class and return the matching class. See docs/API.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._compat import dtype_keyword, dtype_kwarg, import_flux
from .backbones import Backbone, backbone_named, backbone_of
from .engine import CALLBACK_TENSORS, Engine, Slot, StepBatch
from .inputs import (
    OUTPUT_TYPES,
    InputError,
    ModelLimits,
    excerpt,
    group_size_problems,
    image_problems,
    model_defaults,
    model_limits,
    prompt_problems,
    seed_problem,
    setting_problems,
)
from .inversion import InversionConfig, inversion_calls, parse_inversion, prepare_picture_row
from .match import Matches
from .methods import Method, get_method
from .picture import describe_source, fit_picture, load_picture, psnr
from .seeds import DEFAULT_SEED, story_seeds
from .story import StoryImage, coerce_images

FluxPipeline = import_flux()


@dataclass
class StoryPipelineOutput:
    """Result of one story: images, the masks and matches behind them, the seeds and every setting."""

    identity: object
    frames: list
    masks: list                       # identity first; bool (rows, cols) token-grid masks, or None
    matches: list[Matches | None]     # one per frame
    seeds: list[int | None]           # identity first
    notes: list[list[str]]            # identity first: fallbacks taken
    method: str
    settings: dict = field(default_factory=dict)
    picture: dict | None = None       # identity from a picture: its source, fit, inversion and reconstruction PSNR

    @property
    def images(self) -> list:
        return [self.identity, *self.frames]


def _generators(n: int, seed, generator, images: list[StoryImage]):
    """One generator per image: StoryImage.seed > ``generator`` > ``seed`` (int for all, or list)."""
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator] * n
        seeds = [g.initial_seed() for g in gens]
    else:
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * n
        gens = [None] * n
    out_gens, out_seeds = [], []
    for img, g, s in zip(images, gens, seeds, strict=True):
        if img.seed is not None:
            g, s = None, img.seed
        if g is None and s is not None:
            g = torch.Generator("cpu").manual_seed(int(s))
        out_gens.append(g)
        out_seeds.append(None if s is None else int(s))
    return out_gens, out_seeds


def _seed_problems(n: int, seed, generator) -> list[str]:
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator]
        bad = [i for i, g in enumerate(gens) if not isinstance(g, torch.Generator)]
        if bad:
            return [f"generator: expected a torch.Generator or a list of them, got {excerpt(generator)}"]
        if isinstance(generator, list) and len(gens) != n:
            return [f"generator: got {len(gens)} generators for {n} images (identity + frames)"]
        return []
    if seed is None:
        return []
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            return [f"seed: got {len(seed)} seeds for {n} images (identity + frames)"]
        return [p for i, s in enumerate(seed) if (p := seed_problem(f"seed[{i}]", s))]
    problem = seed_problem("seed", seed)
    return [problem + " (or a list of seeds, identity first)"] if problem else []


class _MutedEmptyFp32Warning(logging.Filter):
    """diffusers' ``ModelMixin.to(dtype)`` warns that modules "should be kept in float32: []" even when the list
    is empty (nothing to keep); ``from_pipe`` casts every module, so each run printed it once per model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_PHASE_LABELS = {"prerun": "layout pre-run"}
# FluxPipeline's arguments that a story call takes in another form (a diffusers user's first guess).
FLUX_ONLY_ARGUMENTS = {
    "prompt": "a story call has no prompt: give identity='background#character#action' and frames=[...]",
    "prompt_2": "a story call has no prompt_2: the same prompt goes to both text encoders",
    "negative_prompt": "FLUX.1 has no negative prompt (guidance is distilled; Chroma's negative pass uses the empty "
                       "prompt, its pipeline's default); leave it out",
    "num_images_per_prompt": "a story call makes one image per prompt: list more frames instead",
    "latents": "a story call makes its own starting noise from seed= or generator=; leave latents out",
    "prompt_embeds": "a story call encodes its prompts itself; give identity= and frames= as text",
    "pooled_prompt_embeds": "a story call encodes its prompts itself; give identity= and frames= as text",
    "sigmas": "a story call uses the scheduler's own sigmas; set num_inference_steps instead",
    "joint_attention_kwargs": "the story methods own the attention; give method options instead",
}


class _StepBars:
    """The step progress bars: one per pass of a chunk, diffusers' bar settings, counting that pass's steps.

    CharaConsist's layout pre-run (``mask_step + 1`` steps) gets its own bar; the main run's bar counts
    ``num_inference_steps`` with the steps taken over from the pre-run already done. ``callback`` (if any) is
    called after every step of every pass: ``callback(phase_name, steps_done, steps_total)``.
    """

    def __init__(self, pipe, callback: Callable[[str, int, int], None] | None):
        self.pipe, self.callback, self.bar, self.phase, self.done = pipe, callback, None, None, 0

    def start_phase(self, phase) -> None:

        self.close()
        self.phase, self.done = phase, phase.start
        config = dict(getattr(self.pipe, "_progress_bar_config", None) or {})
        label = config.get("desc") or "steps"
        config["desc"] = label if phase.final else _PHASE_LABELS.get(phase.name, phase.name)
        self.bar = tqdm(total=phase.steps, initial=phase.start, **config)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None and self.phase is not None:
            self.callback(self.phase.name, self.done, self.phase.steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _transformer_class(name_or_path) -> str | None:
    """The transformer class named by a model's ``model_index.json`` (a folder or a hub id), or None."""

    try:
        if os.path.isdir(name_or_path):
            index = json.loads((Path(name_or_path) / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(str(name_or_path))
        entry = index.get("transformer")
        return entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    except Exception:   # unreadable or unreachable: the loader itself reports it
        return None


class StoryPipelineMixin:
    """Story generation with a consistency method (CharaConsist by default), on any backbone of
    ``characonsist.backbones``; mixed into each backbone's stock diffusers pipeline."""

    @property
    def backbone(self) -> Backbone:
        """The backbone adapter, from the transformer's class."""
        return backbone_of(self)

    @classmethod
    def _story_class(cls, transformer_class: str | None):
        """The story pipeline class for a transformer class (this one when it fits or the class is unknown)."""
        backbone = backbone_named(transformer_class) if transformer_class else None
        if backbone is None:
            return cls
        for klass in (cls, *STORY_PIPELINES.values()):
            if any(base.__name__ == backbone.pipeline_class for base in klass.__mro__):
                return klass
        return cls

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The stock pipeline's ``from_pretrained``, for the backbone the model's ``model_index.json`` names (a
        Chroma folder gives a ``ChromaStoryPipeline``); without a dtype every module loads in **float32**.

        That is diffusers' documented default; transformers >= 5 would otherwise keep the text encoders in the
        dtype they were saved in (the toy model's float16) next to a float32 transformer, and the first forward
        would fail on mixed dtypes. Pass ``dtype=torch.bfloat16`` (or ``torch_dtype``) for FLUX on a GPU.
        """
        kwargs = dtype_keyword(kwargs)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs.update(dtype_kwarg(torch.float32))
        transformer_class = _transformer_class(pretrained_model_name_or_path)
        if transformer_class is not None and backbone_named(transformer_class) is None:
            from .backbones import BACKBONES

            raise InputError(f"model {pretrained_model_name_or_path}: its transformer is a {transformer_class}, not a "
                             f"supported backbone ({', '.join(BACKBONES)})")
        klass = cls._story_class(transformer_class)
        return super(StoryPipelineMixin, klass).from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Wrap an existing stock pipeline (FluxPipeline, ChromaPipeline), sharing its modules, **in their own
        dtype**; the story class follows the pipeline's transformer.

        diffusers' ``from_pipe`` casts the shared modules to float32 unless a dtype is passed, which would
        silently turn a bf16 FLUX into an fp32 one (8.8x slower and twice the memory, measured on an H100).
        """
        transformer = getattr(pipeline, "transformer", None)
        if transformer is not None:
            cls = cls._story_class(backbone_of(transformer).transformer_class)
        kwargs = dtype_keyword(kwargs)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            module = getattr(pipeline, "transformer", None)
            kwargs.update(dtype_kwarg(module.dtype if module is not None else pipeline.dtype))
        muted = _MutedEmptyFp32Warning()
        logger = logging.getLogger("diffusers.models.modeling_utils")
        logger.addFilter(muted)
        try:
            return super(StoryPipelineMixin, cls).from_pipe(pipeline, **kwargs)   # noqa: UP008 (cls was chosen above)
        finally:
            logger.removeFilter(muted)

    @property
    def step_batch(self) -> StepBatch | None:
        """During a ``callback_on_step_end`` call: what its rows are (``engine.StepBatch``: the images' story
        indices, identity 0, their height and width, the latents' sigma after the step); None outside one."""
        return getattr(self, "_step_batch", None)

    # ------------------------------------------------------------------ inputs
    def model_folder(self) -> Path | None:
        """The local folder the pipeline was loaded from (``from_pretrained``/``from_pipe``), if any."""
        name = getattr(self.config, "_name_or_path", None)
        return Path(name) if name and os.path.isdir(name) else None

    def story_defaults(self) -> dict:
        """Height, width, steps, guidance and ``max_sequence_length`` used when a call leaves them out: the model
        folder's ``characonsist_defaults.json`` (the toy model's 128 px, 20 steps, 32 tokens), else FLUX.1-schnell's
        for a transformer without guidance embedding, else FLUX.1-dev's (1024 px, 50 steps, 3.5, 512)."""
        config = dict(self.transformer.config) if getattr(self, "transformer", None) is not None else None
        base = self.backbone.defaults(config) if config is not None else None
        return model_defaults(self.model_folder(), config, base)

    def input_limits(self) -> ModelLimits:
        """Sizes and prompt vocabulary this model takes (``characonsist.inputs.model_limits``)."""
        vae = getattr(self, "vae", None)
        return model_limits(dict(vae.config) if vae is not None else None, self.story_defaults(),
                            self.prompt_tokenizer)

    @property
    def prompt_tokenizer(self):
        """The tokenizer of the transformer's text tokens (FLUX.1: T5's ``tokenizer_2``; Chroma: ``tokenizer``)."""
        return self.backbone.prompt_tokenizer(self)

    def check_inputs(self, identity, frames=(), method: str | Method = "characonsist", height=None, width=None,
                     num_inference_steps=None, guidance_scale=None, seed=None, generator=None,
                     max_sequence_length=None, batch_size=None, output_type="pil", callback_on_step_end=None,
                     callback_on_step_end_tensor_inputs=("latents",), identity_image=None, inversion=None,
                     **method_options) -> tuple[list[StoryImage], Method]:
        """Check a call's inputs before any work (diffusers' ``check_inputs``): every problem at once, as one
        ``characonsist.inputs.InputError`` (a ValueError). Returns the images (identity first) and the method.

        The rules are ``characonsist.inputs``'s, the same the command line applies before loading the model.
        """
        problems: list[str] = []
        for name in sorted(set(method_options) & set(FLUX_ONLY_ARGUMENTS)):
            problems.append(f"{name}: {FLUX_ONLY_ARGUMENTS[name]}")
            del method_options[name]
        try:
            images = coerce_images(identity, frames)
        except InputError as e:
            problems += e.problems
            images = []
        try:
            method = get_method(method, **method_options)
        except InputError as e:
            problems += e.problems
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        limits = self.input_limits()
        problems += setting_problems(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                                     batch_size=batch_size if len(images) > 1 else None, limits=limits)
        if len(images) > 1 and not problems:
            defaults = self.story_defaults()
            sizes = [(im.height or height or defaults["height"], im.width or width or defaults["width"]) for im in images]
            problems += group_size_problems(sizes, batch_size)
        if output_type not in OUTPUT_TYPES:
            problems.append(f"output_type={excerpt(output_type)}; valid: {', '.join(map(repr, OUTPUT_TYPES))}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            problems.append(f"callback_on_step_end={excerpt(callback_on_step_end)} is not callable")
        unknown = [k for k in (callback_on_step_end_tensor_inputs or ()) if k not in CALLBACK_TENSORS]
        if unknown:
            problems.append(f"callback_on_step_end_tensor_inputs: {', '.join(map(excerpt, unknown))} not available; "
                            f"valid: {', '.join(map(repr, CALLBACK_TENSORS))}")
        if identity_image is not None and not self.backbone.supports_picture():
            problems.append(f"identity_image: a picture as the identity is not available on {self.backbone.name} "
                            "(its adapter has no picture encoding); leave it out")
        elif identity_image is not None:
            try:
                load_picture(identity_image, "identity_image")
            except InputError as e:
                problems += e.problems
        if inversion is not None or identity_image is not None:
            try:
                parse_inversion(inversion)
            except InputError as e:
                problems += e.problems
            if identity_image is None:
                problems.append(f"inversion={excerpt(inversion)} is given without an identity_image (it says how "
                                "the identity follows a picture)")
        if images:
            places = ["identity", *(f"frames[{i}]" for i in range(len(images) - 1))]
            problems += _seed_problems(len(images), seed, generator)
            problems += image_problems(images, places, limits)
            if not any("max_sequence_length" in p for p in problems) and self.prompt_tokenizer is not None:
                problems += prompt_problems(images, places, self.prompt_tokenizer, max_sequence_length or 512,
                                            limits.vocabulary)
        if problems:
            raise InputError(problems)
        return images, method

    def token_spans(self, image: StoryImage, max_sequence_length: int) -> tuple[int, int, int]:
        """(background tokens, real prompt tokens, character tokens) in the transformer's text sequence (FLUX.1,
        Chroma: T5, no end token; ``Backbone.token_spans``).

        Raises InputError if the prompt does not fit ``max_sequence_length`` (FluxPipeline would silently cut it).
        """
        problems = prompt_problems([image], [f"prompt {excerpt(image.spec())}"], self.prompt_tokenizer,
                                   max_sequence_length)
        if problems:
            raise InputError(problems)
        return self.backbone.token_spans(self, image, max_sequence_length)

    @torch.no_grad()
    def __call__(
        self,
        identity: str | StoryImage,
        frames: list[str | StoryImage] = (),
        method: str | Method = "characonsist",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | list[int] | None = DEFAULT_SEED,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress_callback: Callable[[str, int, int], None] | None = None,
        identity_image=None,
        inversion: str | dict | InversionConfig | None = None,
        **method_options,
    ) -> StoryPipelineOutput | tuple:
        """Generate the identity and its frames. Settings left at None take the model's defaults
        (``story_defaults``: FLUX.1-dev's 1024 px, 50 steps, guidance 3.5, 512 tokens; a model folder's
        ``characonsist_defaults.json``, e.g. the toy model's, wins). ``progress_callback(phase, done, total)`` is
        called after every denoising step of every pass (pre-runs included); an exception raised in it stops the
        call. ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` (diffusers' FluxPipeline
        convention) is called after every step of the main run with the lockstep batch's rows (identity first):
        ``"latents"`` (returned ones replace them), ``"x0"`` and ``"noise_pred"`` (read-only); ``pipe.step_batch``
        names the rows during the call (docs/API.md, "Step callbacks").

        ``identity_image`` (a PIL image, an array or an image file) makes the identity that picture, captioned by
        ``identity``: it is fitted to the identity's size (scaled to cover, centre-cropped), and the identity's row
        follows it by ``inversion`` (``characonsist.inversion``; None: the default); ``out.identity`` is the
        reconstruction and ``out.picture`` says how close it is (PSNR). See docs/API.md."""
        defaults = self.story_defaults()
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        max_sequence_length = defaults["max_sequence_length"] if max_sequence_length is None else max_sequence_length
        images, method = self.check_inputs(
            identity, frames, method, height, width, num_inference_steps, guidance_scale, seed, generator,
            max_sequence_length, batch_size, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs,
            identity_image, inversion, **method_options)
        default_h = height or defaults["height"]
        default_w = width or defaults["width"]
        multiple = self.vae_scale_factor * 2
        slots: list[Slot] = []
        seeding = "given"
        if generator is None and seed is not None and not isinstance(seed, (list, tuple)):
            seeding = method.seeding   # one seed: spread over the images by the method's official convention
            seed = story_seeds(int(seed), len(images), seeding, own=[img.seed for img in images])
        gens, seeds = _generators(len(images), seed, generator, images)
        for k, img in enumerate(images):
            h, w = img.height or default_h, img.width or default_w
            bg_len, real_len, char_len = self.token_spans(img, max_sequence_length)
            slots.append(Slot(k, img, h, w, seeds[k], gens[k], (h // multiple, w // multiple), bg_len, real_len,
                              char_len))

        chunks = self._chunks(images, method, batch_size)
        results: dict[int, dict] = {}
        notes: dict[int, list[str]] = {}
        progress = _StepBars(self, progress_callback)
        picture = None
        try:
            if identity_image is not None:
                picture = self._picture(identity_image, parse_inversion(inversion), slots[0], num_inference_steps,
                                        guidance_scale, max_sequence_length, progress)
            for chunk in chunks:
                chunk_slots = []
                for pos, k in enumerate(chunk):
                    s = slots[k]
                    if s.generator is not None and len(chunks) > 1:   # every chunk restarts from the same noise
                        s = Slot(**{**s.__dict__, "generator": torch.Generator("cpu").manual_seed(seeds[k])})
                    s.pos = pos
                    chunk_slots.append(s)
                engine = Engine(self, method)
                latents, run = engine.generate(
                    chunk_slots, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    max_sequence_length=max_sequence_length, progress=progress, callback=callback_on_step_end,
                    callback_tensor_inputs=callback_on_step_end_tensor_inputs)
                extra = method.results(run)
                decoded = self._decode(chunk_slots, latents, output_type)
                for s, img in zip(chunk_slots, decoded, strict=True):
                    if s.story_index in results:
                        continue
                    results[s.story_index] = {"image": img, **extra.get(s.pos, {})}
                    notes[s.story_index] = run.notes.get(s.pos, [])
        finally:
            progress.close()
        self.maybe_free_model_hooks()

        ordered = [results[k] for k in range(len(images))]
        settings = {
            "method": method.name, "method_options": method.settings(), "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "max_sequence_length": max_sequence_length, "batch_size": batch_size,
            "sizes": [[s.height, s.width] for s in slots], "seeding": seeding,
        }
        notes_out = [list(notes[k]) for k in range(len(images))]
        if picture is not None:
            fitted, info = picture
            info["psnr"] = None if output_type == "latent" else psnr(ordered[0]["image"], fitted)
            settings["identity_picture"] = info
            said = f"{info['psnr']:.2f} dB" if info["psnr"] is not None else "not measured (latent output)"
            notes_out[0].insert(0, f"identity from the picture {info['source']} ({info['fit']}), inversion "
                                   f"{info['inversion']}: reconstruction PSNR {said}")
            if info["follow"] == "steps" and len(images) > 1:
                notes_out[0].insert(1, "the identity follows its picture at every step: what it shares with the "
                                       "frames does not change it")
        out = StoryPipelineOutput(
            identity=ordered[0]["image"], frames=[r["image"] for r in ordered[1:]],
            masks=[r.get("mask") for r in ordered], matches=[r.get("matches") for r in ordered[1:]],
            seeds=seeds, notes=notes_out, method=method.name, settings=settings,
            picture=None if picture is None else picture[1])
        return out if return_dict else (out.images,)

    def _picture(self, identity_image, config: InversionConfig, slot: Slot, num_inference_steps: int,
                 guidance_scale: float, max_sequence_length: int, progress) -> tuple:
        """Fit the identity's picture to its size and prepare the row that follows it (``inversion``); returns
        (fitted picture, its record for ``out.picture``)."""
        source = load_picture(identity_image, "identity_image")
        fitted, fit = fit_picture(source, slot.height, slot.width)
        slot.picture = prepare_picture_row(
            self, fitted, config, prompt=slot.image.prompt, height=slot.height, width=slot.width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length, seed=slot.seed, progress=progress)
        info = {"source": describe_source(identity_image), "source_size": list(fit.source), "size": list(fit.target),
                "fit": fit.describe(), "inversion": config.spec(), "follow": config.follow,
                "inversion_calls": inversion_calls(config, num_inference_steps)}
        return fitted, info

    @staticmethod
    def _chunks(images: list[StoryImage], method: Method, batch_size: int | None) -> list[list[int]]:
        """Story indices per chunk: the identity, up to ``batch_size - 1`` frames, and what they depend on."""
        frames = list(range(1, len(images)))
        if not frames:
            return [[0]]
        per = len(frames) if batch_size is None else max(batch_size - 1, 1)
        chunks = []
        for i in range(0, len(frames), per):
            members = {0, *frames[i:i + per]}
            todo = list(members)
            while todo:
                for dep in method.dependencies(images, todo.pop()):
                    if dep not in members:
                        members.add(dep)
                        todo.append(dep)
            chunks.append(sorted(members))
        return chunks

    def _decode(self, slots: list[Slot], latents: list[torch.Tensor], output_type: str) -> list:
        """VAE-decode each size group as one batch (as FluxPipeline decodes its batch)."""
        out: list = [None] * len(slots)
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(slots):
            sizes.setdefault((s.height, s.width), []).append(i)
        for (h, w), idx in sizes.items():
            images = self.backbone.decode(self, torch.cat([latents[i] for i in idx]), h, w, output_type)
            for i, im in zip(idx, images, strict=True):
                out[i] = im
        return out

    def _vae_device(self):
        params = next(self.vae.parameters(), None)
        if params is None or params.device.type == "meta" or params.device.type == "cpu":
            return self._execution_device
        return params.device


class CharaConsistPipeline(StoryPipelineMixin, FluxPipeline):
    """FLUX.1 story generation with a consistency method (CharaConsist by default). Its ``from_pretrained`` and
    ``from_pipe`` return the story pipeline of the model's backbone (``ChromaStoryPipeline`` for Chroma,
    ``Flux2KleinStoryPipeline`` for FLUX.2 [klein])."""


from diffusers import ChromaPipeline  # noqa: E402


class ChromaStoryPipeline(StoryPipelineMixin, ChromaPipeline):
    """Chroma story generation (``characonsist.backbones.chroma``): the same call as ``CharaConsistPipeline``."""


from diffusers import Flux2KleinPipeline  # noqa: E402


class Flux2KleinStoryPipeline(StoryPipelineMixin, Flux2KleinPipeline):
    """FLUX.2 [klein] story generation (``characonsist.backbones.klein``): the same call as ``CharaConsistPipeline``."""

    def story_defaults(self) -> dict:
        """The distilled checkpoints' defaults (4 steps, no guidance) or, where ``is_distilled`` is false, the base
        checkpoints' (50 steps, guidance 4.0); a folder's ``characonsist_defaults.json`` wins."""
        return model_defaults(self.model_folder(), dict(self.transformer.config), self.backbone.pipeline_defaults(self))


STORY_PIPELINES = {"FluxPipeline": CharaConsistPipeline, "ChromaPipeline": ChromaStoryPipeline,
                   "Flux2KleinPipeline": Flux2KleinStoryPipeline}
