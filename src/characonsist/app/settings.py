"""``StorySettings``: the one typed, frozen record of how a story run makes its images.

The application layer makes it once (``app.request.validate_request``, from a front end's ``StoryRequest``: a
command line, a web form; ``StorySettings.from_manifest`` from a run folder) and hands the same object to ``StoryRun``, the
jobs (``app.jobs.plan_jobs``), the resume key (``resume_key``), the manifest (``manifest``) and the pipeline call
(``pipeline_arguments``). Method options travel as the method's own validated ``Config`` (docs/ARCHITECTURE.md,
"Who owns what").

Each field has one name everywhere: in Python, in ``manifest.json``'s ``settings``, in the web UI's JSON and in the
docs. Only the command line spells some of them its own way (``--steps`` for ``num_inference_steps``), in one table
in ``cli.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..inputs import InputError, excerpt
from ..seeds import DEFAULT_SEED

# Options recorded (and part of the resume key) even when left at their defaults: the official switches. Others
# are recorded only when given, so that a method gaining an option keeps the hashes of earlier runs.
ALWAYS_RECORDED = ("share_bg", "use_token_merge")


@dataclass(frozen=True)
class Lora:
    """A LoRA applied to the model: a file, a folder or a hub id, at a scale."""

    source: str
    scale: float = 1.0


@dataclass(frozen=True)
class StorySettings:
    """How a story run makes its images (see the module docstring). Every value is resolved (the model's defaults
    filled in, ``auto`` chosen) and checked: a ``StorySettings`` is only ever made valid."""

    model: str
    dtype: str
    method: str
    method_config: object = field(hash=False)   # the method's validated Config (``methods.base.check_config``)
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    seed: int = DEFAULT_SEED
    batch_size: int | None = None
    save_masks: bool = False
    inversion: str | None = None       # how an identity picture is followed (``characonsist.inversion`` spec)
    quantize: str = "none"
    memory: str = "none"
    vae_tiling: bool = False
    attention_backend: str | None = None
    compile: bool = False
    loras: tuple[Lora, ...] = ()
    gpu_ids: tuple[int, ...] = (0,)    # where this machine runs it: not recorded in the manifest
    recorded_options: tuple[str, ...] = ALWAYS_RECORDED   # the Config fields written as ``method_options``

    # ------------------------------------------------------------------ views
    @property
    def method_options(self) -> dict:
        """The method options as recorded (manifest, PNG records, resume key): the official switches and the ones
        given, in the Config's types."""
        return {k: getattr(self.method_config, k) for k in self.recorded_options}

    def method_instance(self):
        """A fresh ``Method`` of this run's Config for one pipeline call (the Config is not checked again)."""
        from ..methods import method_class

        return method_class(self.method).from_config(self.method_config)

    def resume_key(self) -> dict:
        """What makes a group's images what they are (its settings hash, with the images' own specs;
        ``app.jobs.plan_jobs``). Weight-changing settings count only when set, so earlier runs keep their hashes;
        memory modes, tiling, attention backends and compilation change how, not what."""
        key = {"model": self.model, "dtype": self.dtype, "method": self.method, "method_options": self.method_options,
               "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
               "max_sequence_length": self.max_sequence_length}
        if self.quantize != "none":
            key["quantize"] = self.quantize
        if self.loras:
            key["loras"] = [dataclasses.asdict(lora) for lora in self.loras]
        return key

    def manifest(self) -> dict:
        """``manifest.json``'s ``settings`` (read back by ``from_manifest``)."""
        data = {"model": self.model, "dtype": self.dtype, "method": self.method, "method_options": self.method_options,
                "height": self.height, "width": self.width, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length,
                "seed": self.seed, "batch_size": self.batch_size, "save_masks": self.save_masks}
        if self.inversion is not None:
            data["inversion"] = self.inversion
        data.update(quantize=self.quantize, memory=self.memory, vae_tiling=self.vae_tiling,
                    attention_backend=self.attention_backend, compile=self.compile,
                    loras=[dataclasses.asdict(lora) for lora in self.loras])
        return data

    def pipeline_arguments(self) -> dict:
        """The keyword arguments of ``CharaConsistPipeline.__call__`` that these settings give (a job adds its
        images, seeds and picture)."""
        return {"method": self.method_instance(), "height": self.height, "width": self.width,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "max_sequence_length": self.max_sequence_length, "batch_size": self.batch_size}

    @property
    def loading(self) -> dict:
        """How the model is loaded (``characonsist.memory.load_pipeline``'s keyword arguments)."""
        return {"quantize": self.quantize, "memory": self.memory, "gpus": list(self.gpu_ids),
                "vae_tiling": self.vae_tiling, "loras": [dataclasses.asdict(lora) for lora in self.loras],
                "attention_backend": self.attention_backend, "compile": self.compile}

    # ------------------------------------------------------------------ reading back
    @classmethod
    def from_manifest(cls, data: dict, where: str = "manifest.json") -> StorySettings:
        """The settings a manifest recorded (``manifest()``), checked by the method's Config; InputError naming
        the field when one is missing or wrong."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: settings: expected a mapping, got {excerpt(data)}")
        missing = [k for k in ("model", "dtype", "method", "height", "width", "num_inference_steps",
                               "guidance_scale", "max_sequence_length") if k not in data]
        if missing:
            raise InputError(f"{where}: settings: missing {', '.join(missing)}")
        options = data.get("method_options") or {}
        if not isinstance(options, dict):
            raise InputError(f"{where}: settings.method_options: expected a mapping, got {excerpt(options)}")
        config, recorded = method_config(data["method"], options)
        loras = tuple(Lora(str(item["source"]), float(item.get("scale", 1.0))) for item in data.get("loras") or [])
        return cls(model=data["model"], dtype=data["dtype"], method=data["method"], method_config=config,
                   height=data["height"], width=data["width"], num_inference_steps=data["num_inference_steps"],
                   guidance_scale=float(data["guidance_scale"]), max_sequence_length=data["max_sequence_length"],
                   seed=data.get("seed", DEFAULT_SEED), batch_size=data.get("batch_size"),
                   save_masks=bool(data.get("save_masks", False)), inversion=data.get("inversion"),
                   quantize=data.get("quantize", "none"), memory=data.get("memory", "none"),
                   vae_tiling=bool(data.get("vae_tiling", False)), attention_backend=data.get("attention_backend"),
                   compile=bool(data.get("compile", False)), loras=loras, recorded_options=recorded)


def method_config(method: str, options: dict) -> tuple[object, tuple[str, ...]]:
    """The method's Config from option values (typed, or text as a command line or a web form gives them: the
    method's ``parse_option`` reads it in the option's type) and the names recorded (``ALWAYS_RECORDED`` the
    method has, then the given ones). The Config's ``__post_init__`` checks them: InputError lists every problem."""
    from ..methods import method_class
    from ..methods.base import parse_option

    try:
        cls = method_class(method)
    except ValueError as e:
        raise InputError(str(e)) from None
    names = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = [k for k in options if k not in names]
    if unknown:
        raise InputError(f"method {method!r} has no option(s) {', '.join(map(excerpt, unknown))}; its options: "
                         f"{', '.join(names) or 'none'}")
    values = {k: parse_option(cls.Config, k, v) if isinstance(v, str) else v for k, v in options.items()}
    recorded = tuple(dict.fromkeys([k for k in ALWAYS_RECORDED if k in names] + list(options)))
    return cls(**values).config, recorded




def label(names: dict[str, str] | None, name: str) -> str:
    """How a front end names the field ``name`` in messages (the command line: its flag; by default the field)."""
    return (names or {}).get(name, name)


def setting(names: dict[str, str] | None, name: str, value) -> str:
    """A field set to a value, as the front end writes it: ``--memory none`` (``--overwrite`` for True) on the
    command line, ``memory='none'`` elsewhere (``characonsist.inputs.show``'s convention)."""
    shown = label(names, name)
    if shown.startswith("-"):
        return shown if value is True else f"{shown} {value}"
    return f"{shown}={value!r}"


__all__ = ["ALWAYS_RECORDED", "Lora", "StorySettings", "label", "method_config", "setting"]
