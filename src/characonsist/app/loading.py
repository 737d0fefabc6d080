"""Loading the model in a memory mode and weight format, and the function that generates one story job with it.

    generate = load_engine(checked.ref, checked.settings)      # the pipeline, loaded as the settings say
    result = generate(job)                                      # a GroupResult (app.jobs)

A long-lived front end such as the web UI loads the pipeline once (``load_pipeline``) and makes a ``story_engine``
per run.
"""

from __future__ import annotations

import warnings

from .. import memory as memory_modes
from .jobs import GroupResult, picture_of
from .model import ModelRef
from .settings import StorySettings


def load_engine(ref: ModelRef, settings: StorySettings, progress: bool = True):
    """Load the pipeline as ``settings`` say (dtype, memory mode, GPUs, weight format, LoRAs, attention backend,
    compiled blocks); return ``generate(job, progress_callback=None) -> GroupResult``."""
    return story_engine(load_pipeline(ref, settings.dtype, progress=progress, **settings.loading), settings)


def load_pipeline(ref: ModelRef, dtype: str, memory: str = "none", gpus=(0,), quantize: str = "none",
                  vae_tiling: bool = False, loras=(), attention_backend: str | None = None, compile: bool = False,
                  progress: bool = True):
    """The ``CharaConsistPipeline`` of ``ref`` in ``dtype``, the memory mode and the weight format, with LoRAs
    (``{"source", "scale"}``), an attention backend and compiled blocks when given
    (``characonsist.memory.load_pipeline``)."""
    import torch

    from ..pipeline import CharaConsistPipeline

    name = str(ref.folder) if ref.kind == "toy" else ref.name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = memory_modes.load_pipeline(CharaConsistPipeline, name, getattr(torch, dtype), quantize=quantize,
                                          memory=memory, gpus=list(gpus), vae_tiling=bool(vae_tiling),
                                          loras=list(loras), attention_backend=attention_backend,
                                          compile=bool(compile))
    # the engine's own bars (one per pass) go under the front end's image bar
    pipe.set_progress_bar_config(disable=not progress, desc="steps", position=1, leave=False, dynamic_ncols=True)
    return pipe


def story_engine(pipe, settings: StorySettings):
    """``generate(job, progress_callback=None) -> GroupResult`` for a loaded pipeline and a run's settings.
    ``generate`` also passes ``callback_on_step_end`` and ``callback_on_step_end_tensor_inputs`` to the pipeline
    (the web UI's live previews); they never change an image that only reads."""

    def generate(job, progress_callback=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)) -> GroupResult:
        images = job.group.images
        picture = picture_of(job)
        extra = {"identity_image": picture, "inversion": settings.inversion} if picture is not None else {}
        out = pipe(identity=images[0], frames=images[1:], **settings.pipeline_arguments(),
                   seed=[r["seed"] for r in job.records], progress_callback=progress_callback,
                   callback_on_step_end=callback_on_step_end,
                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **extra)
        return GroupResult([out.identity, *out.frames], out.masks, out.matches, out.notes, out.settings)

    generate.tokenizer = pipe.prompt_tokenizer
    generate.limits = pipe.input_limits()
    generate.pipe = pipe
    return generate
