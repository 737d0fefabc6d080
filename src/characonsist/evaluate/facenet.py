"""FaceNet face embeddings for ID sim: Inception-ResNet-v1 trained on VGGFace2, as published by facenet-pytorch.

CharaConsist's paper computes ID sim from FaceNet embeddings of RetinaFace crops. The weights are facenet-pytorch's
``20180402-114759-vggface2.pt`` (David Sandberg's TensorFlow FaceNet model 20180402-114759, converted to a
PyTorch state dict; released at ``FACENET_URL``). The network below is written here and loads that state dict by
its published key names (``conv2d_1a.conv.weight``, ``repeat_1.0.branch1.1.bn.running_mean``, ...; the
classifier ``logits.*`` is not used). Preprocessing follows facenet-pytorch's MTCNN face extraction:
crop the face box (``margin`` pixels of the final image added around it, as ``extract_face`` does), resize to
160x160 (bilinear), then ``fixed_image_standardization``: ``(x - 127.5) / 128``. Output: 512-d, L2-normalised.

``InceptionResnetV1(divisor=8, depths=(1, 1, 1))`` is a narrow, shallow variant with the same key names (tests);
the loader reads the width and depth from the checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from . import checkpoints
from .models import pick_device
from .unavailable import ModelUnavailable

FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
FACENET_FILE = "20180402-114759-vggface2.pt"
ALIASES = ("facenet", "facenet-vggface2")
CROP = 160


class ConvBN(nn.Sequential):
    """Convolution without bias, batch norm (eps 1e-3, the TensorFlow value), ReLU: keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu = nn.ReLU()


def _chain(*layers: nn.Module) -> nn.Module:
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class Branches(nn.Module):
    """Parallel branches ``branch0``, ``branch1``, ... concatenated along the channels (a reduction block)."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.count = len(branches)
        for k, branch in enumerate(branches):
            self.add_module(f"branch{k}", branch)

    def forward(self, x):
        return torch.cat([getattr(self, f"branch{k}")(x) for k in range(self.count)], 1)


class Residual(Branches):
    """An Inception-ResNet block: branches concatenated, 1x1 convolution ``conv2d`` back to the input width, scaled
    and added to the input, then ReLU (none in the final block)."""

    def __init__(self, channels: int, inner: int, branches: list[nn.Module], scale: float, relu: bool = True):
        super().__init__(*branches)
        self.conv2d = nn.Conv2d(inner, channels, 1)
        self.scale, self.use_relu = scale, relu

    def forward(self, x):
        out = x + self.scale * self.conv2d(super().forward(x))
        return F.relu(out) if self.use_relu else out


class InceptionResnetV1(nn.Module):
    """Inception-ResNet-v1 (Szegedy et al. 2016) as FaceNet uses it: 160x160 RGB in, a unit 512-d embedding out.

    ``divisor`` divides every width and ``depths`` sets the repeats of the 35/17/8 blocks (1 and (5, 10, 5): the
    published network)."""

    def __init__(self, divisor: int = 1, depths: tuple[int, int, int] = (5, 10, 5), dim: int = 512):
        super().__init__()
        c = lambda n: n // divisor  # noqa: E731
        self.divisor, self.depths, self.dim = divisor, tuple(depths), dim
        self.conv2d_1a = ConvBN(3, c(32), 3, stride=2)
        self.conv2d_2a = ConvBN(c(32), c(32), 3)
        self.conv2d_2b = ConvBN(c(32), c(64), 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBN(c(64), c(80), 1)
        self.conv2d_4a = ConvBN(c(80), c(192), 3)
        self.conv2d_4b = ConvBN(c(192), c(256), 3, stride=2)
        self.repeat_1 = nn.Sequential(*[self._block35(c) for _ in range(depths[0])])
        self.mixed_6a = Branches(ConvBN(c(256), c(384), 3, stride=2),
                                 _chain(ConvBN(c(256), c(192), 1), ConvBN(c(192), c(192), 3, padding=1),
                                        ConvBN(c(192), c(256), 3, stride=2)),
                                 nn.MaxPool2d(3, stride=2))
        self.repeat_2 = nn.Sequential(*[self._block17(c) for _ in range(depths[1])])
        self.mixed_7a = Branches(_chain(ConvBN(c(896), c(256), 1), ConvBN(c(256), c(384), 3, stride=2)),
                                 _chain(ConvBN(c(896), c(256), 1), ConvBN(c(256), c(256), 3, stride=2)),
                                 _chain(ConvBN(c(896), c(256), 1), ConvBN(c(256), c(256), 3, padding=1),
                                        ConvBN(c(256), c(256), 3, stride=2)),
                                 nn.MaxPool2d(3, stride=2))
        self.repeat_3 = nn.Sequential(*[self._block8(c, 0.2) for _ in range(depths[2])])
        self.block8 = self._block8(c, 1.0, relu=False)
        self.last_linear = nn.Linear(c(1792), dim, bias=False)
        self.last_bn = nn.BatchNorm1d(dim, eps=1e-3)

    @staticmethod
    def _block35(c) -> Residual:
        return Residual(c(256), c(96), [ConvBN(c(256), c(32), 1),
                                        _chain(ConvBN(c(256), c(32), 1), ConvBN(c(32), c(32), 3, padding=1)),
                                        _chain(ConvBN(c(256), c(32), 1), ConvBN(c(32), c(32), 3, padding=1),
                                               ConvBN(c(32), c(32), 3, padding=1))], scale=0.17)

    @staticmethod
    def _block17(c) -> Residual:
        return Residual(c(896), c(256), [ConvBN(c(896), c(128), 1),
                                         _chain(ConvBN(c(896), c(128), 1), ConvBN(c(128), c(128), (1, 7), padding=(0, 3)),
                                                ConvBN(c(128), c(128), (7, 1), padding=(3, 0)))], scale=0.1)

    @staticmethod
    def _block8(c, scale: float, relu: bool = True) -> Residual:
        return Residual(c(1792), c(384), [ConvBN(c(1792), c(192), 1),
                                          _chain(ConvBN(c(1792), c(192), 1), ConvBN(c(192), c(192), (1, 3), padding=(0, 1)),
                                                 ConvBN(c(192), c(192), (3, 1), padding=(1, 0)))], scale=scale, relu=relu)

    def forward(self, x):
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8"):
            x = getattr(self, name)(x)
        x = self.last_bn(self.last_linear(x.mean(dim=(2, 3))))
        return F.normalize(x, p=2, dim=1)


def shape_of(state: dict) -> dict:
    """The ``InceptionResnetV1`` arguments a state dict was saved with (width divisor, block repeats, dim)."""
    try:
        divisor = 32 // int(state["conv2d_1a.conv.weight"].shape[0])
        depths = tuple(len({m.group(1) for k in state if (m := re.match(rf"repeat_{n}\.(\d+)\.", k))})
                       for n in (1, 2, 3))
        dim = int(state["last_linear.weight"].shape[0])
    except (KeyError, AttributeError, ZeroDivisionError, IndexError) as e:
        raise ValueError(f"not a facenet-pytorch InceptionResnetV1 state dict (missing {e})") from None
    return {"divisor": divisor, "depths": depths, "dim": dim}


def load_facenet(file: str | Path) -> InceptionResnetV1:
    """The network with the weights of ``file`` (a facenet-pytorch state dict), in eval mode; the classifier
    (``logits.*``) is dropped. A clear ``ModelUnavailable`` when the file is not such a state dict."""
    file = Path(file)
    state = checkpoints.read_state_dict(file, "FaceNet", f"facenet-pytorch's {FACENET_FILE} ({FACENET_URL})")
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    try:
        net = InceptionResnetV1(**shape_of(state))
    except ValueError as e:
        raise ModelUnavailable(f"{file}: {str(e).splitlines()[0]}") from None
    return checkpoints.load_exactly(net, state, file, "facenet-pytorch's InceptionResnetV1 layout")


def resolve_checkpoint(source: str, progress: bool = True) -> Path:
    """A FaceNet checkpoint file from ``source``: ``facenet`` (the VGGFace2 weights, downloaded once from
    ``FACENET_URL`` into torch hub's cache; a copy in facenet-pytorch's own cache is used as is), an http(s) URL
    (likewise), a local ``.pt`` file, or ``owner/repo:file.pt`` on the Hugging Face hub."""
    return checkpoints.resolve_checkpoint(source, aliases={a: FACENET_URL for a in ALIASES}, what="FaceNet",
                                          flag="--face-model", expected=FACENET_FILE, progress=progress,
                                          also_look_in=(checkpoints.legacy_torch_dir(),))


class FaceNet:
    """ID sim embedder: facenet-pytorch's VGGFace2 FaceNet on face crops standardised as facenet-pytorch does."""

    def __init__(self, source: str = "facenet", device: str = "auto", margin: int = 0, progress: bool = True):
        self.device = pick_device(device)
        self.file = resolve_checkpoint(source, progress=progress)
        self.net = load_facenet(self.file).to(self.device)
        self.margin, self.size = margin, (CROP, CROP)
        s = self.net
        variant = "" if (s.divisor, s.depths, s.dim) == (1, (5, 10, 5), 512) else \
            f" [variant: widths/{s.divisor}, blocks {s.depths}, {s.dim}-d]"
        self.label = f"FaceNet InceptionResnetV1 (facenet-pytorch VGGFace2 weights) {self.file.name}{variant}"

    def describe(self) -> str:
        return (f"{self.label}: crop of the face box with {self.margin} px margin (in 160 px units, facenet-pytorch's "
                f"extract_face), resized to {CROP}x{CROP} (bilinear), RGB, (x - 127.5) / 128; {self.net.dim}-d, "
                "L2-normalised; cosine")

    def crop(self, image, box):
        """facenet-pytorch's ``extract_face`` on a PIL image: margin scaled to the box, clipped, 160x160."""

        x0, y0, x1, y1 = box[:4]
        mx = self.margin * (x1 - x0) / (CROP - self.margin)
        my = self.margin * (y1 - y0) / (CROP - self.margin)
        w, h = image.size
        region = (int(max(x0 - mx / 2, 0)), int(max(y0 - my / 2, 0)), int(min(x1 + mx / 2, w)), int(min(y1 + my / 2, h)))
        return image.convert("RGB").crop(region).resize((CROP, CROP), Image.BILINEAR)

    def tensor(self, faces) -> torch.Tensor:
        """Face crops (PIL, resized to 160x160 if not already) as the network's standardised NCHW batch."""

        faces = [f if f.size == self.size else f.resize(self.size, Image.BILINEAR) for f in faces]
        batch = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in faces])
        return (torch.from_numpy(batch).permute(0, 3, 1, 2) - 127.5) / 128.0

    def embed(self, faces) -> np.ndarray:
        with torch.inference_mode():
            out = self.net(self.tensor(faces).to(self.device))
        x = out.float().cpu().numpy().astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def is_facenet_source(source: str) -> bool:
    """Whether ``--face-model`` names FaceNet (the alias, a URL, a .pt/.pth file) rather than an ArcFace ONNX file."""
    s = source.lower()
    return s in ALIASES or s.startswith(("http://", "https://")) or s.endswith((".pt", ".pth"))
