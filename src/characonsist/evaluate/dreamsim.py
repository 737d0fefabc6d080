"""DreamSim (Fu, Tamir et al., NeurIPS 2023) in plain torch: the official checkpoints, no torchvision/timm/open_clip.

The model is the one ``dreamsim.dreamsim(pretrained=True, dreamsim_type=...)`` of the official package (v0.2.1,
``dreamsim/model.py`` and ``feature_extraction/``) builds:

* preprocessing: RGB, resized to 224x224 with PIL's bicubic filter, scaled to [0, 1], then each backbone's
  normalisation (ImageNet mean/std for DINO, OpenAI CLIP's mean/std for CLIP and OpenCLIP);
* backbones: DINO-style ViTs (pre-norm blocks, CLS token, learned position embedding). CLIP and OpenCLIP weights
  come converted to that layout, with a layer norm after the position embedding (``ln_pre``), layer-norm eps 1e-5
  (DINO: 1e-6), QuickGELU for OpenAI CLIP, GELU otherwise;
* features: DINO and DINOv2 give the CLS token of the last block's output (before the final norm, the package's
  ``cls``); CLIP/OpenCLIP give the final-normed CLS token times the projection (``embedding``). DINOv2 adds layer
  scale and resizes its 37x37 position embeddings to the 16x16 grid as its hub model does;
* the ensemble concatenates DINO ViT-B/16 (768), CLIP ViT-B/16 (512) and OpenCLIP ViT-B/16 (512): 1792 values;
* the fine-tuned LoRA adapter (peft, on every ``qkv`` projection) is merged into the weights at load time:
  ``W + lora_alpha / r * B @ A``;
* the embedding is centred (its own mean subtracted) and scaled to unit length (``normalize_embeds=True``);
  the distance is 1 - cosine.

Files: the official cache folder as the package lays it out (``cache_dir``, the package's default ``./models``):
each type's checkpoint zip unpacked there (``*_pretrain.pth.tar`` backbones, ``<tag>_lora/`` adapter), and DINO's
and DINOv2's backbones where ``torch.hub`` puts them (``checkpoints/``). Missing files are downloaded from the same
URLs as the package, unless offline.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .unavailable import ModelUnavailable

IMAGE_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64  # every backbone here (ViT-B: 768 / 12 heads; ViT-L: 1024 / 16)

RELEASES = "https://github.com/ssundaram21/dreamsim/releases/download"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


@dataclass(frozen=True)
class Backbone:
    """One ViT of DreamSim: its checkpoint file (relative to the cache folder) and how it was trained."""

    file: str
    family: str                 # dino | dinov2 | clip | open_clip
    feature: str                # cls (last block's CLS token) | embedding (final norm, CLS, projection)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (IMAGENET_MEAN, IMAGENET_STD) if self.family.startswith("dino") else (CLIP_MEAN, CLIP_STD)

    @property
    def clip_layout(self) -> bool:
        """CLIP weights converted to DINO's layout: ``ln_pre`` stored as ``pos_drop``, a ``proj`` matrix."""
        return not self.family.startswith("dino")


BACKBONES = {
    "dino_vitb16": Backbone("checkpoints/dino_vitbase16_pretrain.pth", "dino", "cls"),
    "dinov2_vitb14": Backbone("checkpoints/dinov2_vitb14_pretrain.pth", "dinov2", "cls"),
    "clip_vitb16": Backbone("clip_vitb16_pretrain.pth.tar", "clip", "embedding"),
    "clip_vitb32": Backbone("clip_vitb32_pretrain.pth.tar", "clip", "embedding"),
    "open_clip_vitb16": Backbone("open_clip_vitb16_pretrain.pth.tar", "open_clip", "embedding"),
    "open_clip_vitb32": Backbone("open_clip_vitb32_pretrain.pth.tar", "open_clip", "embedding"),
}


@dataclass(frozen=True)
class DreamSimType:
    """A ``dreamsim_type`` of the package: its backbones in concatenation order, its adapter folder, its zip."""

    backbones: tuple[str, ...]
    adapter: str
    url: str


TYPES = {
    "ensemble": DreamSimType(("dino_vitb16", "clip_vitb16", "open_clip_vitb16"), "ensemble_lora",
                             f"{RELEASES}/v0.2.0-checkpoints/dreamsim_ensemble_checkpoint.zip"),
    "dino_vitb16": DreamSimType(("dino_vitb16",), "dino_vitb16_single_lora",
                                f"{RELEASES}/v0.2.0-checkpoints/dreamsim_dino_vitb16_checkpoint.zip"),
    "clip_vitb32": DreamSimType(("clip_vitb32",), "clip_vitb32_single_lora",
                                f"{RELEASES}/v0.2.0-checkpoints/dreamsim_clip_vitb32_checkpoint.zip"),
    "open_clip_vitb32": DreamSimType(("open_clip_vitb32",), "open_clip_vitb32_single_lora",
                                     f"{RELEASES}/v0.2.0-checkpoints/dreamsim_open_clip_vitb32_checkpoint.zip"),
    "dinov2_vitb14": DreamSimType(("dinov2_vitb14",), "dinov2_vitb14_single_lora",
                                  f"{RELEASES}/v0.2.1-checkpoints/dreamsim_dinov2_vitb14_checkpoint.zip"),
}
# DINO's and DINOv2's backbones: the package gets them through torch.hub (facebookresearch/dino and /dinov2), whose
# hubconf downloads these files into torch.hub's folder (set to the cache folder), ``checkpoints/``
EXTRA_URLS = {"checkpoints/dino_vitbase16_pretrain.pth": DINO_URL,
              "checkpoints/dinov2_vitb14_pretrain.pth": DINOV2_URL}


# ----------------------------------------------------------------------------------------------------- the ViT

class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (DINOv2: each branch times
    a learned per-channel scale, ``ls1`` / ``ls2``)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float, quick_gelu: bool, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, hidden, quick_gelu)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DreamSimViT(nn.Module):
    """One backbone with its feature head: normalise, patchify, CLS + position, blocks, then ``feature``."""

    def __init__(self, backbone: Backbone, width: int, depth: int, patch: int, hidden: int, tokens: int,
                 proj_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        eps = 1e-6 if backbone.family in ("dino", "dinov2") else 1e-5
        layer_scale = backbone.family == "dinov2"
        heads = max(1, width // HEAD_DIM)
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps) if backbone.clip_layout else None
        self.blocks = nn.ModuleList(Block(width, heads, hidden, eps, backbone.family == "clip", layer_scale)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, proj_dim)) if proj_dim else None

    @property
    def out_dim(self) -> int:
        return self.proj.shape[1] if self.backbone.feature == "embedding" else self.cls_token.shape[-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: (N, 3, 224, 224) in [0, 1] -> (N, out_dim) features (not normalised)."""
        mean, std = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
                     for v in self.backbone.mean_std)
        x = self.patch_embed((pixels - mean) / std)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens for {self.pos_embed.shape[1]} position embeddings")
        x = x + self.pos_embed
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.backbone.feature == "cls":
            return x[:, 0]
        return self.norm(x[:, 0]) @ self.proj


def _native_name(key: str) -> str:
    return "ln_pre." + key[len("pos_drop."):] if key.startswith("pos_drop.") else key


def _official_to_native(state: dict) -> dict:
    return {_native_name(k): v for k, v in state.items()}


def native_to_official(state: dict) -> dict:
    """This module's parameter names -> the checkpoint's (the package's DINO layout; used to write test files)."""
    return {("pos_drop." + k[len("ln_pre."):] if k.startswith("ln_pre.") else k): v for k, v in state.items()}


def build_vit(name: str, state: dict, where: str) -> DreamSimViT:
    """A backbone sized from its checkpoint ``state`` (native names; ``proj`` included for CLIP layouts)."""
    backbone = BACKBONES[name]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k != "mask_token"}
    # (DINOv2's mask_token is for training only)
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        proj_dim = state["proj"].shape[1] if backbone.clip_layout else None
        pos = state["pos_embed"]
    except (KeyError, ValueError, IndexError) as e:
        raise ModelUnavailable(f"{where}: not a {name} checkpoint of the DreamSim package (missing {e})") from None
    grid = IMAGE_SIZE // patch
    if pos.shape[1] != grid * grid + 1:
        if backbone.family != "dinov2":
            raise ModelUnavailable(f"{where}: {pos.shape[1]} position embeddings do not fit a {IMAGE_SIZE}x"
                                   f"{IMAGE_SIZE} image in {patch}x{patch} patches")
        state["pos_embed"] = dinov2_positions(pos, grid)
    with torch.device("meta"):
        vit = DreamSimViT(backbone, width, depth, patch, hidden, grid * grid + 1, proj_dim)
    missing, unexpected = vit.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelUnavailable(f"{where}: does not match the {name} backbone (missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]})")
    return vit


def dinov2_positions(pos: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's position embeddings for a ``grid`` x ``grid`` patch grid, resized as its hub model does at run time
    (``interpolate_pos_encoding``: bicubic, no antialiasing, scale factor ``(grid + 0.1) / side``)."""
    side = math.isqrt(pos.shape[1] - 1)
    patches = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (grid + offset) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ModelUnavailable(f"DINOv2 position embeddings: {side}x{side} resized to {tuple(patches.shape[-2:])}, "
                               f"not {grid}x{grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos[:, :1].float(), patches], dim=1).to(pos.dtype)


# ---------------------------------------------------------------------------------------------- the full model

class DreamSimModel(nn.Module):
    """DreamSim's backbones (LoRA merged): ``embed`` gives centred unit embeddings, ``distance`` 1 - cosine."""

    def __init__(self, kind: str, branches: list[DreamSimViT], cache_dir: Path | None = None):
        super().__init__()
        self.kind, self.cache_dir = kind, cache_dir
        self.branches = nn.ModuleList(branches)

    @staticmethod
    def preprocess(images) -> torch.Tensor:
        """PIL images -> (N, 3, 224, 224) in [0, 1]: RGB, PIL bicubic resize (the package's torchvision Resize on
        PIL images calls PIL), then /255 (ToTensor)."""

        arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32)
                  for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The branches' features concatenated, before normalisation."""
        return torch.cat([branch(pixels) for branch in self.branches], dim=-1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centred (own mean subtracted), unit-length embeddings, as the package's ``normalize_embeds``."""
        x = self.features(pixels)
        x = x - x.mean(dim=-1, keepdim=True)
        return x / x.norm(dim=-1, keepdim=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(a, b)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(self.embed(a), self.embed(b), dim=-1)


def default_cache_dir(kind: str = "ensemble") -> Path:
    """The package's default ``./models`` when it already holds this type's files, else ``HF_HOME/dreamsim``."""
    local = Path("models")
    if not missing_files(kind, local):
        return local
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "dreamsim"


def required_files(kind: str) -> list[str]:
    """The files (relative to the cache folder) this module reads for ``kind``."""
    spec = _spec(kind)
    return [BACKBONES[b].file for b in spec.backbones] + [f"{spec.adapter}/adapter_config.json"]


def missing_files(kind: str, cache_dir: str | Path) -> list[str]:
    cache_dir = Path(cache_dir)
    out = [f for f in required_files(kind) if not (cache_dir / f).is_file()]
    adapter = cache_dir / _spec(kind).adapter
    if not any((adapter / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        out.append(f"{_spec(kind).adapter}/adapter_model.safetensors (or .bin)")
    return out


def _spec(kind: str) -> DreamSimType:
    if kind not in TYPES:
        raise ModelUnavailable(f"DreamSim type {kind!r} is not supported; use one of {', '.join(TYPES)}")
    return TYPES[kind]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def ensure_files(kind: str, cache_dir: str | Path, download: bool = True, progress: bool = True) -> Path:
    """Make sure ``kind``'s files are in ``cache_dir``: download the package's zip (and DINO's torch.hub
    checkpoint) for what is missing; files already there are never replaced."""
    cache_dir = Path(cache_dir).expanduser()
    missing = missing_files(kind, cache_dir)
    if not missing:
        return cache_dir
    spec = _spec(kind)
    fetches = []
    if any(m not in EXTRA_URLS for m in missing):
        fetches.append(("zip", spec.url))
    fetches += [(m, EXTRA_URLS[m]) for m in missing if m in EXTRA_URLS]

    def refuse(why: str):
        listing = "; ".join(f"{name} from {url}" for name, url in fetches)
        raise ModelUnavailable(
            f"DreamSim {kind!r}: missing in {cache_dir}: {', '.join(missing)}. {why}. Get them ({listing}; unzip the "
            f"zip into that folder, DINO's file goes to checkpoints/) or pass --dreamsim-cache with the official "
            f"package's cache folder")

    if not download or _offline():
        refuse("Offline (HF_HUB_OFFLINE)" if download else "Downloading is off")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for what, url in fetches:
        target = cache_dir / ("dreamsim_checkpoint.download.zip" if what == "zip" else what)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=progress)
        except Exception as e:  # URLError, HTTPError, OSError: anything means the file is not to be had
            refuse(f"Downloading {url} failed ({type(e).__name__}: {e})")
        if what == "zip":
            try:
                _unzip_missing(target, cache_dir)
            finally:
                target.unlink(missing_ok=True)
    still = missing_files(kind, cache_dir)
    if still:
        raise ModelUnavailable(f"DreamSim {kind!r}: after downloading {spec.url}, still missing in {cache_dir}: "
                                  f"{', '.join(still)}")
    return cache_dir


def _unzip_missing(archive: Path, folder: Path) -> None:
    """Extract the members of ``archive`` that are not in ``folder`` yet (nothing outside ``folder``)."""
    root = folder.resolve()
    with zipfile.ZipFile(archive) as z:
        for member in z.infolist():
            target = (folder / member.filename).resolve()
            if root not in target.parents and target != root:
                raise ModelUnavailable(f"{archive}: member {member.filename!r} points outside {folder}")
            if member.is_dir() or target.exists():
                continue
            z.extract(member, folder)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelUnavailable(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def read_backbone(name: str, cache_dir: Path) -> DreamSimViT:
    path = cache_dir / BACKBONES[name].file
    state = _torch_load(path)
    if BACKBONES[name].clip_layout:
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ModelUnavailable(f"{path}: expected a dict with 'state_dict' (the package's CLIP-as-DINO file)")
        state = state["state_dict"]
    return build_vit(name, _official_to_native(dict(state)), str(path))


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """The peft adapter: its config (``adapter_config.json``) and weights (safetensors or torch ``.bin``)."""
    config_file = folder / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"{config_file}: not readable JSON ({e})") from None
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ModelUnavailable(f"{config_file}: no {key!r} (a peft LoRA config is expected)")
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"))
    else:
        weights = _torch_load(folder / "adapter_model.bin")
    return config, weights


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?extractor_list\.(\d+)\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_PLAIN_KEY = re.compile(r"(?:base_model\.model\.)?extractor_list\.(\d+)\.model\.(.+)$")


def merge_adapter(branches: list[DreamSimViT], config: dict, weights: dict, where: str) -> int:
    """Add ``scale * B @ A`` of every LoRA pair to its layer's weight (``scale = lora_alpha / r``, or
    ``/ sqrt(r)`` with rsLoRA); other saved tensors (biases trained with ``bias != 'none'``) replace the layer's.
    Returns the number of merged layers."""
    scale = float(config["lora_alpha"]) / (math.sqrt(config["r"]) if config.get("use_rslora") else float(config["r"]))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if m := _LORA_KEY.match(key):
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
        elif m := _PLAIN_KEY.match(key):
            _param(branches, int(m.group(1)), _native_name(m.group(2)), key, where).data.copy_(tensor)
        else:
            raise ModelUnavailable(f"{where}: unexpected adapter tensor {key!r}")
    for (index, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelUnavailable(f"{where}: LoRA of {module!r} in backbone {index} lacks its "
                                      f"{'B' if 'A' in ab else 'A'} matrix")
        weight = _param(branches, index, module + ".weight", f"{module} (LoRA)", where)
        a, b = ab["A"].float(), ab["B"].float()
        delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * scale
        weight.data += delta.to(weight.dtype)
    return len(pairs)


def _param(branches, index: int, name: str, key: str, where: str) -> torch.Tensor:
    if index >= len(branches):
        raise ModelUnavailable(f"{where}: {key!r} is for backbone {index}; this type has {len(branches)}")
    params = dict(branches[index].named_parameters())
    if name not in params:
        raise ModelUnavailable(f"{where}: {key!r} names no parameter of the {branches[index].backbone.family} "
                                  f"backbone")
    return params[name]


def load_dreamsim(kind: str = "ensemble", cache_dir: str | Path | None = None, device: str = "cpu",
                  download: bool = True, progress: bool = True) -> DreamSimModel:
    """The official DreamSim of ``kind`` from the package's cache folder (downloading what is missing), LoRA merged,
    in eval mode on ``device``."""
    spec = _spec(kind)
    cache_dir = ensure_files(kind, cache_dir if cache_dir is not None else default_cache_dir(kind), download,
                             progress)
    branches = [read_backbone(name, cache_dir) for name in spec.backbones]
    adapter = cache_dir / spec.adapter
    config, weights = read_adapter(adapter)
    merge_adapter(branches, config, weights, str(adapter))
    return DreamSimModel(kind, branches, cache_dir).eval().requires_grad_(False).to(device)
