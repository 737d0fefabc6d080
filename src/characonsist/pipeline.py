"""``CharaConsistPipeline``: a FluxPipeline that generates a story (identity image + frames) consistently.

Loading, offloading and device maps are FluxPipeline's own (``from_pretrained``, ``from_pipe``,
``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``device_map="balanced"``); ``__call__`` takes
a story instead of a prompt. See docs/API.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._compat import import_flux
from .engine import Engine, Slot
from .match import Matches
from .methods import Method, get_method
from .methods.base import story_seeds
from .story import StoryImage

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

    @property
    def images(self) -> list:
        return [self.identity, *self.frames]


def _generators(n: int, seed, generator, images: list[StoryImage]):
    """One generator per image: StoryImage.seed > ``generator`` > ``seed`` (int for all, or list)."""
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator] * n
        if len(gens) != n:
            raise ValueError(f"generator: got {len(gens)} generators for {n} images (identity + frames)")
        seeds = [g.initial_seed() for g in gens]
    else:
        seeds = seed if isinstance(seed, (list, tuple)) else [seed] * n
        if len(seeds) != n:
            raise ValueError(f"seed: got {len(seeds)} seeds for {n} images (identity + frames)")
        gens = [None] * n
    out_gens, out_seeds = [], []
    for img, g, s in zip(images, gens, seeds):
        if img.seed is not None:
            g, s = None, img.seed
        if g is None and s is not None:
            g = torch.Generator("cpu").manual_seed(int(s))
        out_gens.append(g)
        out_seeds.append(None if s is None else int(s))
    return out_gens, out_seeds


class CharaConsistPipeline(FluxPipeline):
    """FLUX.1 story generation with a consistency method (CharaConsist by default)."""

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Wrap an existing FluxPipeline, sharing its modules, **in their own dtype**.

        diffusers' ``from_pipe`` casts the shared modules to float32 unless a dtype is passed, which would
        silently turn a bf16 FLUX into an fp32 one (8.8x slower and twice the memory, measured on an H100).
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            module = getattr(pipeline, "transformer", None)
            dtype = module.dtype if module is not None else pipeline.dtype
            from diffusers.pipelines import pipeline_utils

            kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = dtype
        return super().from_pipe(pipeline, **kwargs)

    def token_spans(self, image: StoryImage, max_sequence_length: int) -> tuple[int, int, int]:
        """(background tokens, real prompt tokens, character tokens) in the T5 sequence, no end token.

        Raises if the prompt does not fit ``max_sequence_length`` (FluxPipeline would silently cut it).
        """
        tok = self.tokenizer_2

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False).input_ids) if text else 0

        real = count(image.prompt)
        if real + 1 > max_sequence_length:
            raise ValueError(f"prompt {image.spec()!r} is {real + 1} T5 tokens with the end token; the limit is "
                             f"max_sequence_length={max_sequence_length}: shorten it or raise the limit (<= 512)")
        bg = min(count(image.background.strip()), real)
        return bg, real, min(count(image.character.strip()), real - bg)

    @torch.no_grad()
    def __call__(
        self,
        identity: str | StoryImage,
        frames: list[str | StoryImage] = (),
        method: str | Method = "characonsist",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
        seed: int | list[int] | None = 2025,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int = 512,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **method_options,
    ) -> StoryPipelineOutput | tuple:
        images = [StoryImage.coerce(identity)] + [StoryImage.coerce(f) for f in frames]
        method = get_method(method, **method_options)
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length={max_sequence_length}: FLUX's T5 takes at most 512")
        if batch_size is not None and batch_size < 2 and len(images) > 1:
            raise ValueError(f"batch_size={batch_size}: a chunk holds the identity and at least one frame (>= 2)")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; valid: 'pil', 'np', 'pt', 'latent'")
        default_h = height or self.default_sample_size * self.vae_scale_factor
        default_w = width or self.default_sample_size * self.vae_scale_factor
        multiple = self.vae_scale_factor * 2
        slots: list[Slot] = []
        seeding = "given"
        if generator is None and seed is not None and not isinstance(seed, (list, tuple)):
            seeding = method.seeding   # one seed: spread over the images by the method's official convention
            seed = story_seeds(int(seed), len(images), seeding)
        gens, seeds = _generators(len(images), seed, generator, images)
        for k, img in enumerate(images):
            h, w = img.height or default_h, img.width or default_w
            if h % multiple or w % multiple:
                raise ValueError(f"image {k} ({img.spec()!r}): size {h}x{w} is not a multiple of {multiple}")
            bg_len, real_len, char_len = self.token_spans(img, max_sequence_length)
            slots.append(Slot(k, img, h, w, seeds[k], gens[k], (h // multiple, w // multiple), bg_len, real_len,
                              char_len))

        chunks = self._chunks(images, method, batch_size)
        total = sum(p.steps - p.start for p in method.phases(num_inference_steps)) * len(chunks)
        results: dict[int, dict] = {}
        notes: dict[int, list[str]] = {}
        with self.progress_bar(total=total) as progress:
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
                for s, img in zip(chunk_slots, decoded):
                    if s.story_index in results:
                        continue
                    results[s.story_index] = {"image": img, **extra.get(s.pos, {})}
                    notes[s.story_index] = run.notes.get(s.pos, [])
        self.maybe_free_model_hooks()

        ordered = [results[k] for k in range(len(images))]
        settings = {
            "method": method.name, "method_options": method.settings(), "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "max_sequence_length": max_sequence_length, "batch_size": batch_size,
            "sizes": [[s.height, s.width] for s in slots], "seeding": seeding,
        }
        out = StoryPipelineOutput(
            identity=ordered[0]["image"], frames=[r["image"] for r in ordered[1:]],
            masks=[r.get("mask") for r in ordered], matches=[r.get("matches") for r in ordered[1:]],
            seeds=seeds, notes=[notes[k] for k in range(len(images))], method=method.name, settings=settings)
        return out if return_dict else (out.images,)

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
            lat = torch.cat([latents[i] for i in idx])
            if output_type == "latent":
                images = list(lat)
            else:
                lat = self._unpack_latents(lat, h, w, self.vae_scale_factor)
                lat = lat / self.vae.config.scaling_factor + self.vae.config.shift_factor
                image = self.vae.decode(lat.to(self._vae_device()), return_dict=False)[0]
                images = self.image_processor.postprocess(image, output_type=output_type)
            for i, im in zip(idx, images):
                out[i] = im
        return out

    def _vae_device(self):
        params = next(self.vae.parameters(), None)
        if params is None or params.device.type == "meta" or params.device.type == "cpu":
            return self._execution_device
        return params.device
