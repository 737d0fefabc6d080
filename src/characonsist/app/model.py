"""Which model a request names and what can be known of it without its weights.

``resolve_model`` finds the model (``toy``, a local diffusers folder, or a hub id) and reads its defaults and
limits from config files only. Loading it is ``app.loading``; deciding how (memory mode, weight format) is
``app.memory_plan``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import InputError, ModelLimits, model_defaults, model_limits, read_config
from .settings import label

DTYPES = ("auto", "bfloat16", "float16", "float32")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; anything else is taken as a folder path


@dataclass
class ModelRef:
    """Where the model comes from: ``toy``, a local folder or a hub id; ``folder`` holds its files if known."""

    name: str
    kind: str                                        # toy | local | hub
    folder: Path | None = None
    defaults: dict = field(default_factory=dict)     # height, width, steps, guidance, max_sequence_length
    vae_config: dict | None = None


def resolve_model(name: str, names: dict | None = None) -> ModelRef:
    """Find the model without loading it: toy, an existing folder, or a hub id (access checked on the hub)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{label(names, 'model')}: give a hub id (owner/name), a local diffusers folder, or `toy`")
    if name == "toy":
        try:
            from ..toy import model as toy
        except ImportError as e:
            raise InputError(f"the toy model is not available in this install ({e})") from None
        try:
            toy.load_toy_defaults(toy.TOY_MODEL_DIR)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
        folder = Path(toy.TOY_MODEL_DIR)
        return ModelRef(name, "toy", folder, model_defaults(folder), read_config(folder / "vae" / "config.json"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model folder {name!r} has no model_index.json: not a diffusers pipeline folder "
                             "(save one with FluxPipeline.save_pretrained)")
        return ModelRef(name, "local", path, model_defaults(path), read_config(path / "vae" / "config.json"))
    if path.exists():
        raise InputError(f"model {name!r} is a file; give a diffusers pipeline folder, a hub id or `toy`")
    if not HUB_ID.fullmatch(name):
        raise InputError(f"model folder {name!r} does not exist (a hub id looks like owner/name, e.g. "
                         "black-forest-labs/FLUX.1-dev; `toy` is the model shipped with the package)")
    check_hub_access(name)
    defaults = model_defaults(None, read_config(_hub_file(name, "transformer/config.json")),
                              model_index=read_config(_hub_file(name, "model_index.json")))
    return ModelRef(name, "hub", None, defaults, read_config(_hub_file(name, "vae/config.json")))


def _hub_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:  # defaults and limits only: FLUX.1-dev's are used when the file cannot be had
        return None


def check_hub_access(repo: str) -> None:
    """Fail early, with what to do, if a hub model is gated, missing, or neither reachable nor cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)   # its "... thrown while requesting HEAD" warning: the message below says it
    try:
        hf_hub_download(repo, "model_index.json")
    except GatedRepoError:
        raise InputError(
            f"{repo} is a gated model and this machine has no access token for it: accept its license at "
            f"https://huggingface.co/{repo} (logged in), then run `hf auth login` or set HF_TOKEN, and rerun") from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo} was not found on the Hugging Face hub (if it is private, log in with "
                         "`hf auth login` or set HF_TOKEN); or pass a local folder") from None
    except LocalEntryNotFoundError:
        raise InputError(f"cannot reach the Hugging Face hub and {repo} is not in the local cache: download it "
                         "where there is a connection, or pass a local folder") from None
    finally:
        hub_log.setLevel(level)


def load_t5_tokenizer(ref: ModelRef):
    """The tokenizer of the transformer's text tokens alone (no weights): FLUX.1's T5 ``tokenizer_2``, or the only
    ``tokenizer`` of a backbone with one text encoder (Chroma); None when it cannot be had without the model."""
    from transformers import AutoTokenizer

    for sub in ("tokenizer_2", "tokenizer"):
        try:
            if ref.folder is not None:
                index = read_config(ref.folder / "model_index.json") or {}
                if sub in index and (ref.folder / sub).is_dir():
                    return AutoTokenizer.from_pretrained(ref.folder / sub)
                continue
            return AutoTokenizer.from_pretrained(ref.name, subfolder=sub)
        except Exception:  # no tokenizer saved separately / no network: checked after loading the model instead
            continue
    return None


def limits_of(ref: ModelRef, tokenizer=None) -> ModelLimits:
    """What the model takes (sizes, vocabulary), from its config files and tokenizer."""
    return model_limits(ref.vae_config, ref.defaults, tokenizer)


def resolve_dtype(name: str, names: dict | None = None) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU (recorded resolved, so the settings hash is stable)."""
    if name not in DTYPES:
        raise InputError(f"{label(names, 'dtype')} {name!r}; valid: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"
