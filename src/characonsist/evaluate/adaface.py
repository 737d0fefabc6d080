"""AdaFace face embeddings (Kim, Jain and Liu, CVPR 2022, "AdaFace: Quality Adaptive Margin for Face Recognition"),
one of the three face models of ViStoryBench's CIDS for realistic humans (docs/EVAL.md, "ViStoryBench").

The network is AdaFace's IR backbone (its ``net.py``, ``Backbone(mode='ir')`` with ``BasicBlockIR`` units), written
here in plain torch with the published key names, so that the released Lightning checkpoints load as AdaFace's
``load_pretrained_model`` loads them (``ckpt['state_dict']``, the ``model.`` entries with that prefix removed; the
margin head ``head.*`` is not used). IR-101 (AdaFace's ``ir_101``, ``get_blocks(100)``): a 3x3 stem to 64 channels,
stages of 3, 13, 30 and 3 units at 64, 128, 256, 512 channels (each stage's first unit strides 2), then batch norm,
flatten of the 7x7 map, a linear layer to 512 and a non-affine batch norm; the output is divided by its norm.

Input, as AdaFace's ``to_input``: a 112x112 aligned face, **BGR** channel order, ``(x / 255 - 0.5) / 0.5``.

``IResNet(widths=(4, 8, 12, 16), units=(1, 2, 1, 1), stem=4, dim=16)`` is a narrow, shallow variant with the same
key names (tests); the loader reads widths, units and the embedding size from the checkpoint (a stage starts where
the width changes, as in every AdaFace backbone).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoints
from .models import ModelUnavailable, pick_device

PRETRAIN = "ViStoryBench/VistoryBench_pretrain"
ADAFACE_FILE = "adaface_ir101_webface12m.ckpt"
ADAFACE_SOURCE = f"{PRETRAIN}:adaface/{ADAFACE_FILE}"     # where the benchmark's download_weights.sh puts it
IR101_UNITS = (3, 13, 30, 3)
WIDTHS = (64, 128, 256, 512)
SIZE = 112


class BasicBlockIR(nn.Module):
    """AdaFace's ``BasicBlockIR``: BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN, plus the shortcut (a 1x1 max
    pool with the stride when the width is unchanged, else 1x1 conv + BN)."""

    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.BatchNorm2d(depth), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class IResNet(nn.Module):
    """AdaFace's ``Backbone(input_size=(112, 112), num_layers, mode='ir')`` for up to 100 layers; returns the unit
    embedding and its norm, as AdaFace's ``forward``."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, units: tuple[int, ...] = IR101_UNITS, stem: int = 64,
                 dim: int = 512):
        super().__init__()
        self.widths, self.units, self.stem, self.dim = tuple(widths), tuple(units), stem, dim
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        blocks, cin = [], stem
        for width, n in zip(widths, units, strict=True):
            for k in range(n):
                blocks.append(BasicBlockIR(cin, width, 2 if k == 0 else 1))
                cin = width
        self.body = nn.Sequential(*blocks)
        side = SIZE // 2 ** len(widths)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(cin * side * side, dim), nn.BatchNorm1d(dim, affine=False))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


def shape_of(state: dict) -> dict:
    """The ``IResNet`` arguments a state dict was saved with (stem, stage widths and unit counts, embedding size)."""
    try:
        stem = int(state["input_layer.0.weight"].shape[0])
        depth = {int(m.group(1)): int(v.shape[0]) for k, v in state.items()
                 if (m := re.match(r"body\.(\d+)\.res_layer\.1\.weight$", k))}
        widths, units = [], []
        for i in range(len(depth)):      # a stage starts where the width changes (AdaFace's stages all differ)
            if widths and widths[-1] == depth[i]:
                units[-1] += 1
            else:
                widths.append(depth[i])
                units.append(1)
        dim = int(state["output_layer.3.weight"].shape[0])
    except (KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"not an AdaFace IR backbone state dict (missing {e})") from None
    if not widths:
        raise ValueError("not an AdaFace IR backbone state dict (no body.N.res_layer units)")
    return {"stem": stem, "widths": tuple(widths), "units": tuple(units), "dim": dim}


def read_checkpoint(file: str | Path) -> dict:
    """The backbone's state dict in ``file``: a Lightning checkpoint (``{'state_dict': {'model.…', 'head.…'}}``, as
    AdaFace releases them) or a plain state dict. Loaded with torch's weights-only unpickler; objects of other
    classes that a Lightning checkpoint carries outside the tensors (hyper-parameters, callbacks) are read as inert
    placeholders, never imported or run."""
    file = Path(file)
    expected = f"AdaFace's {ADAFACE_FILE} (the benchmark's {ADAFACE_SOURCE})"
    stubs: list = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(stubs):
                state = torch.load(file, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            name = re.search(r"GLOBAL ([\w.]+)", str(e))
            if name is None or any(s[1] == name.group(1) for s in stubs):
                raise ModelUnavailable(f"{file}: cannot read an AdaFace checkpoint ({str(e).splitlines()[0]}); "
                                       f"expected {expected}") from None
            stubs.append((type(name.group(1).rpartition(".")[2], (_Inert,), {}), name.group(1)))
        except Exception as e:
            raise ModelUnavailable(f"{file}: cannot read an AdaFace checkpoint ({e}); expected {expected}") from None
    else:
        raise ModelUnavailable(f"{file}: too many unknown objects to be an AdaFace checkpoint (expected {expected})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{file}: holds a {type(state).__name__}, not a state dict (expected {expected})")
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


class _Inert(dict):
    """Placeholder for a non-tensor object of a checkpoint: takes any arguments and state, does nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


def load_adaface(file: str | Path) -> IResNet:
    """The network with the weights of ``file``, in eval mode; a ``ModelUnavailable`` naming the file otherwise."""
    state = read_checkpoint(file)
    try:
        net = IResNet(**shape_of(state))
    except ValueError as e:
        raise ModelUnavailable(f"{file}: {str(e).splitlines()[0]}") from None
    return checkpoints.load_exactly(net, state, file, "AdaFace's IR backbone layout")


def resolve_checkpoint(source: str, progress: bool = True) -> Path:
    """An AdaFace checkpoint from ``source``: ``adaface`` (the benchmark's ``ADAFACE_SOURCE`` on the hub), a local
    ``.ckpt``, a URL (downloaded once into torch hub's cache) or ``owner/repo:file``."""
    try:
        return checkpoints.resolve_checkpoint(str(source), aliases={"adaface": ADAFACE_SOURCE}, what="AdaFace",
                                              flag="--adaface", expected=ADAFACE_FILE, progress=progress)
    except ModelUnavailable as e:
        if "cannot download" not in str(e):
            raise
        raise ModelUnavailable(f"{e} (pass --adaface /path/to/{ADAFACE_FILE}, or --adaface none to leave AdaFace "
                               "out of the face mix)") from None


class AdaFace:
    """AdaFace embeddings of aligned 112x112 faces (PIL RGB), fed as AdaFace's ``to_input`` does."""

    def __init__(self, source: str = ADAFACE_SOURCE, device: str = "auto", progress: bool = True):
        self.device = pick_device(device)
        self.file = resolve_checkpoint(source, progress=progress)
        self.net = load_adaface(self.file).to(self.device)
        n = self.net
        variant = "" if (n.stem, n.widths, n.units, n.dim) == (64, WIDTHS, IR101_UNITS, 512) else \
            f" [variant: widths {n.widths}, units {n.units}, {n.dim}-d]"
        self.label = f"AdaFace IR-{2 * sum(n.units) + 2 if not variant else 'x'} {self.file.name}{variant}"

    def describe(self) -> str:
        return f"{self.label}: aligned 112x112 face, BGR, (x / 255 - 0.5) / 0.5; unit length"

    @staticmethod
    def tensor(faces) -> torch.Tensor:
        """AdaFace's ``to_input`` for a batch: RGB -> BGR, computed in float64 then cast to float32."""
        batch = np.stack([np.asarray(f.convert("RGB"))[:, :, ::-1] for f in faces]) / 255.0
        return torch.from_numpy(((batch - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()).float()

    def embed(self, faces) -> np.ndarray:
        with torch.inference_mode():
            out, _ = self.net(self.tensor(faces).to(self.device))
        x = out.float().cpu().numpy().astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
