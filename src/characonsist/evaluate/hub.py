"""Whether the Hugging Face hub can be reached, asked once per ``characonsist eval``.

Without a network, every hub model would otherwise wait on the hub client's own timeouts and retries (about 100 s
for the default models) before saying it is not in the cache. One short connection to the hub's endpoint decides
at once; when it fails, the process is switched to the hub's offline mode (the local cache only), as
``HF_HUB_OFFLINE=1`` does.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

FLAGS = {"clip": "--clip", "dinov2": "--dinov2", "segmenter": "--segmenter", "box_detector": "--box-detector",
         "face_detector": "--face-detector", "face_model": "--face-model", "dreamsim": "--dreamsim-cache"}


def offline_set() -> bool:
    """Whether the hub client is already in offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Switch this process's hub client (and transformers, which asks it) to offline mode: the cache only."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def offline_notice(models: dict[str, str | None]) -> str | None:
    """If a model is not a local file or folder and the hub cannot be reached: switch to offline mode and return
    the line that says so and what to do; else None (nothing changed)."""
    remote = [k for k, v in models.items() if v and str(v).lower() != "none" and not Path(str(v)).exists()]
    if not remote or offline_set() or hub_reachable():
        return None
    from huggingface_hub import constants

    go_offline()
    flags = ", ".join(FLAGS[k] for k in remote if k in FLAGS)
    return (f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached: models are taken from the local cache "
            f"only; set HF_HUB_OFFLINE=1 to skip this check, or pass local model folders or files ({flags})")
