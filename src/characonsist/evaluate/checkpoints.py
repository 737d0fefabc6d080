"""Checkpoint files of the plain-torch eval models (FaceNet, RetinaFace): an alias or URL downloaded once into
torch hub's cache with a progress bar, a local file, or ``owner/repo:file`` on the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from .unavailable import ModelUnavailable


def checkpoint_dir() -> Path:
    """Where downloaded checkpoints go: torch hub's ``checkpoints`` folder (``TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def legacy_torch_dir() -> Path:
    """``$TORCH_HOME/checkpoints``: where facenet-pytorch caches its files (without torch hub's ``hub/`` level)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(torch_home).expanduser() / "checkpoints"


def resolve_checkpoint(source: str, *, aliases: dict[str, str], what: str, flag: str, expected: str,
                       progress: bool = True, also_look_in: tuple[Path, ...] = ()) -> Path:
    """The file ``source`` names. An alias (a key of ``aliases``, any case) or an http(s) URL is downloaded once
    into ``checkpoint_dir()`` (a copy already there or in ``also_look_in`` is used as is); a local file is used as
    is; ``owner/repo:file`` comes from the Hugging Face hub. ``what`` names the model in messages, ``flag`` the
    option that takes a file, ``expected`` the published file name. Errors are ``ModelUnavailable`` saying what
    to do (offline: the URL and the path to put the file at)."""
    source = str(source)
    source = aliases.get(source.lower(), source)
    if source.startswith(("http://", "https://")):
        import torch

        name = os.path.basename(source.split("?")[0]) or expected
        target = checkpoint_dir() / name
        for path in (target, *(Path(d) / name for d in also_look_in)):
            if path.is_file():
                return path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(source, str(target), progress=progress)
        except Exception as e:
            raise ModelUnavailable(f"cannot download the {what} weights {source} to {target} ({e}); offline, download "
                                   f"that file elsewhere and put it there, or pass {flag} /path/to/{name}") from None
        return target
    path = Path(source).expanduser()
    if path.is_file():
        return path
    repo, sep, filename = source.partition(":")
    if sep and filename and not path.exists():
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as e:
            raise ModelUnavailable(f"cannot download {filename!r} from {repo!r} for the {what} model: {e}") from None
    by_url: dict[str, list[str]] = {}
    for alias, url in aliases.items():
        by_url.setdefault(url, []).append(repr(alias))
    names = "".join(f"{' or '.join(a)} (downloads {url}), " for url, a in by_url.items())
    raise ModelUnavailable(f"{source!r}: no such {what} checkpoint; pass {names}a URL, a local {expected}, or "
                           "owner/repo:file")


def read_state_dict(file: str | Path, what: str, expected: str) -> dict:
    """The state dict in ``file`` (a ``torch.load``-able file; a ``{"state_dict": ...}`` wrapper is unwrapped);
    a ``ModelUnavailable`` naming the file, ``what`` it should be and the ``expected`` file otherwise."""
    import torch

    try:
        state = torch.load(Path(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelUnavailable(f"{file}: cannot read a {what} checkpoint ({e}); expected {expected}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{file}: holds a {type(state).__name__}, not a state dict (expected {expected})")
    return state


def load_exactly(net, state: dict, file: str | Path, layout: str):
    """``net`` with ``state`` loaded, every key present on both sides (batch norms' ``num_batches_tracked`` may be
    missing), in eval mode; a ``ModelUnavailable`` naming the file and the first keys that differ otherwise."""
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelUnavailable(f"{file}: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelUnavailable(f"{file}: not {layout} (missing {', '.join(missing[:3]) or 'none'}; "
                               f"unexpected {', '.join(unexpected[:3]) or 'none'})")
    return net.eval()
