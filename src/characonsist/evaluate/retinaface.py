"""RetinaFace face detection for ID sim (Deng et al. 2020, "RetinaFace: Single-stage Dense Face Localisation in the
Wild"), as CharaConsist's paper detects faces before FaceNet.

The network is the widely used PyTorch port's (biubug6/Pytorch_Retinaface ``models/retinaface.py`` + ``net.py``,
also packaged in facexlib ``detection/retinaface.py``), written here in plain torch: a backbone (torchvision's
ResNet-50 layout, or the port's MobileNet-0.25), three levels (strides 8, 16, 32) through an FPN, an SSH context
module per level, and per level 1x1 convolutions for 2 anchors: face/background logits, box offsets, 5 landmark
offsets. It loads the published state dicts by their key names (``body.layer2.0.conv1.weight``,
``fpn.output1.0.weight``, ``ssh1.conv7x7_3.1.running_var``, ``ClassHead.0.conv1x1.weight``, ...; a ``module.``
prefix, as DataParallel saved them, is removed). Default: facexlib's release of the ResNet-50 weights
(``RESNET50_URL``; the port's ``Resnet50_Final.pth`` is on Google Drive only), downloaded once into torch hub's cache.

Inference as the port's ``detect.py`` and facexlib's ``detect_faces``: the image at its own size (no resize,
``resize = 1`` / ``use_origin_size=True``), BGR, minus the mean (104, 117, 123), no scaling; prior boxes of min
sizes (16, 32), (64, 128), (256, 512) on feature maps of ceil(H / step) x ceil(W / step) for steps (8, 16, 32);
boxes and landmarks decoded with variances (0.1, 0.2) (``utils/box_utils.py``: ``decode``, ``decode_landm``);
score = softmax face probability; keep score > threshold, the ``top_k`` best, NMS at IoU 0.4 (``py_cpu_nms``:
areas of ``(x1 - x0 + 1) * (y1 - y0 + 1)``), then ``keep_top_k``. ID sim uses the highest-scoring face.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import checkpoints
from .models import pick_device
from .unavailable import ModelUnavailable

RELEASE = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
RESNET50_URL = RELEASE + "detection_Resnet50_Final.pth"
MOBILENET_URL = RELEASE + "detection_mobilenet0.25_Final.pth"
ALIASES = {"retinaface": RESNET50_URL, "retinaface-resnet50": RESNET50_URL,
           "retinaface-mobilenet": MOBILENET_URL, "retinaface-mobilenet0.25": MOBILENET_URL}
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)
THRESHOLD = 0.8          # facexlib's detect_faces(conf_threshold=0.8)
NMS_THRESHOLD = 0.4      # detect.py and facexlib
TOP_K, KEEP_TOP_K = 5000, 750   # detect.py: best candidates before NMS, detections kept after


# ------------------------------------------------------------------------------------------ network

def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0,
            groups: int = 1) -> nn.Sequential:
    """Convolution (no bias, same padding), batch norm, then LeakyReLU(``leaky``) unless None: keys ``0``, ``1``."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky))
    return nn.Sequential(*layers)


def depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet-v1 block: 3x3 depthwise and 1x1 pointwise convolutions, each with BN and LeakyReLU(0.1)."""
    return nn.Sequential(*conv_bn(cin, cin, 3, stride, 0.1, groups=cin), *conv_bn(cin, cout, 1, 1, 0.1))


class MobileNet025(nn.Module):
    """The port's MobileNet-v1 at width 0.25 (``net.py`` ``MobileNetV1``): stages of 64, 128, 256 channels at
    strides 8, 16, 32 (its ImageNet classifier is not part of the detector)."""

    channels = (64, 128, 256)

    def __init__(self):
        super().__init__()
        d = depthwise_separable
        self.stage1 = nn.Sequential(conv_bn(3, 8, 3, 2, 0.1), d(8, 16, 1), d(16, 32, 2), d(32, 32, 1), d(32, 64, 2),
                                    d(64, 64, 1))
        self.stage2 = nn.Sequential(d(64, 128, 2), *[d(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(d(128, 256, 2), d(256, 256, 1))

    def forward(self, x):
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        return [c2, c3, self.stage3(c3)]


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride on the 3x3 convolution), expansion 4."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet-50 layout (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), returning the outputs of
    ``layer2``-``layer4`` (strides 8, 16, 32). ``width`` (64) and ``layers`` ((3, 4, 6, 3)) give narrower, shallower
    variants with the same key names (tests)."""

    def __init__(self, width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.width, self.layers = width, tuple(layers)
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin = width
        for k, count in enumerate(layers):
            inner = width * 2 ** k
            blocks = [Bottleneck(cin if b == 0 else inner * 4, inner, 2 if b == 0 and k > 0 else 1) for b in range(count)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
            cin = inner * 4
        self.channels = tuple(width * 4 * 2 ** k for k in (1, 2, 3))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    """The port's feature pyramid: 1x1 lateral convolutions ``output1..3``, nearest upsampling added top-down, 3x3
    ``merge2`` then ``merge1``; LeakyReLU slope 0.1 when ``out`` <= 64 channels, else ReLU (as ``net.py``)."""

    def __init__(self, channels: tuple[int, int, int], out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        for k, cin in enumerate(channels):
            self.add_module(f"output{k + 1}", conv_bn(cin, out, 1, 1, leaky))
        self.merge1, self.merge2 = conv_bn(out, out, 3, 1, leaky), conv_bn(out, out, 3, 1, leaky)

    def forward(self, features):
        p1, p2, p3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3 (half the channels), 5x5 and 7x7 receptive fields built from
    stacked 3x3 convolutions (a quarter each), concatenated, ReLU. Key names as the port (``conv7x7_3``)."""

    def __init__(self, cin: int, out: int):
        super().__init__()
        if out % 4:
            raise ValueError(f"SSH needs a channel count divisible by 4, got {out}")
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = conv_bn(cin, out // 2, leaky=None)
        self.conv5X5_1 = conv_bn(cin, out // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn(out // 4, out // 4, leaky=None)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn(out // 4, out // 4, leaky=None)

    def forward(self, x):
        five = self.conv5X5_1(x)
        seven = self.conv7x7_3(self.conv7X7_2(five))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(five), seven], 1))


class Head(nn.Module):
    """A 1x1 convolution ``conv1x1`` giving ``values`` numbers per anchor, as (N, H * W * anchors, values) in
    row-major (y, x, anchor) order: the order of ``prior_boxes``."""

    def __init__(self, cin: int, anchors: int, values: int):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(cin, anchors * values, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace: backbone ``body``, ``fpn``, ``ssh1..3``, heads ``ClassHead``, ``BboxHead``, ``LandmarkHead``
    (one per level). ``forward`` gives (box offsets (N, P, 4), face/background logits (N, P, 2), landmark offsets
    (N, P, 10)) for the P prior boxes of the input's size."""

    def __init__(self, backbone: str = "resnet50", out_channels: int | None = None, width: int = 64,
                 layers: tuple[int, ...] = (3, 4, 6, 3), anchors: int = 2):
        super().__init__()
        if backbone == "resnet50":
            self.body = ResNet(width, layers)
        elif backbone == "mobilenet0.25":
            self.body = MobileNet025()
        else:
            raise ValueError(f"backbone {backbone!r}: expected resnet50 or mobilenet0.25")
        out = out_channels or (256 if backbone == "resnet50" else 64)
        self.backbone, self.out_channels, self.anchors = backbone, out, anchors
        self.fpn = FPN(self.body.channels, out)
        for k in (1, 2, 3):
            self.add_module(f"ssh{k}", SSH(out, out))
        self.ClassHead = nn.ModuleList([Head(out, anchors, 2) for _ in STEPS])
        self.BboxHead = nn.ModuleList([Head(out, anchors, 4) for _ in STEPS])
        self.LandmarkHead = nn.ModuleList([Head(out, anchors, 10) for _ in STEPS])

    def forward(self, x):
        levels = self.fpn(self.body(x))
        levels = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        heads = (self.BboxHead, self.ClassHead, self.LandmarkHead)
        return tuple(torch.cat([head[k](f) for k, f in enumerate(levels)], 1) for head in heads)


# ------------------------------------------------------------------------------------------ anchors, boxes, NMS

def prior_boxes(height: int, width: int, min_sizes=MIN_SIZES, steps=STEPS) -> torch.Tensor:
    """The port's ``PriorBox`` (``layers/functions/prior_box.py``, ``clip=False``): per level, for each cell of
    the ceil(H / step) x ceil(W / step) map in row-major order and each min size, (cx, cy, w, h) relative to the
    image: centre ((x + 0.5) * step / W, (y + 0.5) * step / H), size (min_size / W, min_size / H)."""
    out = []
    for sizes, step in zip(min_sizes, steps, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([gx, gy], -1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor([[s / width, s / height] for s in sizes], dtype=torch.float64).expand(centres.shape[0], -1, 2)
        out.append(torch.cat([centres, wh], -1).reshape(-1, 4))
    return torch.cat(out).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Box offsets -> corners (x0, y0, x1, y1) relative to the image (``box_utils.decode``)."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def encode_boxes(boxes: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Corners -> the offsets ``decode_boxes`` turns back into them (the training target, ``box_utils.encode``)."""
    centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
    return torch.cat([(centre - priors[..., :2]) / (variances[0] * priors[..., 2:]),
                      torch.log(size / priors[..., 2:]) / variances[1]], -1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Landmark offsets (5 x (dx, dy)) -> points relative to the image (``box_utils.decode_landm``)."""
    points = pre.unflatten(-1, (5, 2))
    return (priors[..., None, :2] + points * variances[0] * priors[..., None, 2:]).flatten(-2)


def encode_landmarks(points: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Points (5 x (x, y)) relative to the image -> the offsets ``decode_landmarks`` turns back into them."""
    offsets = (points.unflatten(-1, (5, 2)) - priors[..., None, :2]) / (variances[0] * priors[..., None, 2:])
    return offsets.flatten(-2)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float = NMS_THRESHOLD, offset: float = 1.0) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first. A box is dropped when its IoU
    with a kept, better box exceeds ``threshold``. ``offset=1`` measures sides as ``x1 - x0 + 1`` (the port's
    ``py_cpu_nms``), 0 as torchvision's ``nms`` (facexlib)."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes.to(torch.float32)
    area = (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset)
    keep = []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = torch.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = torch.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = (bottom_right - top_left + offset).clamp(min=0).prod(-1)
        iou = inter / (area[best] + area[rest] - inter)
        order = rest[iou <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------ checkpoints

def shape_of(state: dict) -> dict:
    """The ``RetinaFace`` arguments a state dict was saved with (backbone, widths, depths, anchors)."""
    try:
        out = int(state["fpn.output1.0.weight"].shape[0])
        anchors = int(state["ClassHead.0.conv1x1.weight"].shape[0]) // 2
        if "body.stage1.0.0.weight" in state:
            return {"backbone": "mobilenet0.25", "out_channels": out, "anchors": anchors}
        width = int(state["body.conv1.weight"].shape[0])
    except (KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"not a RetinaFace state dict of the PyTorch port (missing {e})") from None
    layers = tuple(len({m.group(1) for k in state if (m := re.match(rf"body\.layer{n}\.(\d+)\.", k))}) for n in (1, 2, 3, 4))
    return {"backbone": "resnet50", "out_channels": out, "width": width, "layers": layers, "anchors": anchors}


def load_retinaface(file: str | Path) -> RetinaFace:
    """The network with the weights of ``file`` (a state dict of the PyTorch port: ``Resnet50_Final.pth``,
    ``mobilenet0.25_Final.pth`` or facexlib's ``detection_*`` copies; a ``module.`` prefix and a ``state_dict``
    wrapper are accepted), in eval mode. A clear ``ModelUnavailable`` when the file is not such a state dict."""
    file = Path(file)
    state = checkpoints.read_state_dict(file, "RetinaFace", "the PyTorch port's Resnet50_Final.pth or facexlib's "
                                        f"{RESNET50_URL.rsplit('/', 1)[-1]}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        shape = shape_of(state)
        if shape["anchors"] != len(MIN_SIZES[0]):
            raise ValueError(f"{shape['anchors']} anchors per cell; the port's prior boxes have {len(MIN_SIZES[0])}")
        net = RetinaFace(**shape)
    except ValueError as e:
        raise ModelUnavailable(f"{file}: {str(e).splitlines()[0]}") from None
    return checkpoints.load_exactly(net, state, file, "the RetinaFace port's layout")


def resolve_checkpoint(source: str, progress: bool = True) -> Path:
    """A RetinaFace checkpoint from ``source``: ``retinaface`` (ResNet-50) or ``retinaface-mobilenet`` (facexlib's
    release, downloaded once into torch hub's cache), a URL (likewise), a local .pth, or ``owner/repo:file``."""
    return checkpoints.resolve_checkpoint(source, aliases=ALIASES, what="RetinaFace", flag="--face-detector",
                                          expected="detection_Resnet50_Final.pth", progress=progress)


def is_retinaface_source(source: str) -> bool:
    """Whether ``--face-detector`` names RetinaFace (an alias, a URL, a .pth/.pt file) rather than an OWLv2 model."""
    s = source.lower()
    return s in ALIASES or s.startswith(("http://", "https://")) or s.endswith((".pth", ".pt"))


# ------------------------------------------------------------------------------------------ detector

class Face(NamedTuple):
    """One detection in pixels: box corners, face probability, 5 landmarks ((x, y): the eyes, the nose tip, the
    mouth corners, in the port's order). Indexes like the ``(x0, y0, x1, y1, score)`` tuples of the other detectors."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: tuple[tuple[float, float], ...]


class RetinaFaceDetector:
    """ID sim's face detector: RetinaFace as the PyTorch port runs it; per image the highest-scoring face."""

    def __init__(self, source: str = "retinaface", device: str = "auto", threshold: float = THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, progress: bool = True, batch_size: int = 4,
                 nms_offset: float = 1.0, top_k: tuple[int | None, int | None] = (TOP_K, KEEP_TOP_K),
                 facexlib_order: bool = False):
        """``nms_offset`` 1: the port's ``py_cpu_nms`` areas, 0: torchvision's ``nms`` (facexlib); ``top_k``: the
        candidates kept before and after NMS (``detect.py``'s; facexlib's ``detect_faces`` keeps all: ``(None,
        None)``). ``facexlib_order``: equal scores in facexlib's order (numpy's ``argsort()[::-1]`` of the kept
        scores, then torchvision's stable descending sort) instead of prior order."""
        self.device = pick_device(device)
        self.nms_offset, self.top_k, self.facexlib_order = nms_offset, top_k, facexlib_order
        self.file = resolve_checkpoint(source, progress=progress)
        self.net = load_retinaface(self.file).to(self.device)
        self.threshold, self.nms_threshold, self.batch_size = threshold, nms_threshold, batch_size
        n = self.net
        variant = ""
        if n.backbone == "resnet50" and (n.body.width, n.body.layers, n.out_channels) != (64, (3, 4, 6, 3), 256):
            variant = f" [variant: width {n.body.width}, blocks {n.body.layers}, {n.out_channels} channels]"
        elif n.backbone == "mobilenet0.25" and n.out_channels != 64:
            variant = f" [variant: {n.out_channels} channels]"
        self.label = f"RetinaFace {n.backbone} (PyTorch port, biubug6/facexlib) {self.file.name}{variant}"
        self.last_scores: list[float] = []

    def describe(self) -> str:
        return (f"{self.label}: the image at its own size (no resize), BGR minus mean (104, 117, 123); prior boxes min "
                f"sizes {[list(s) for s in MIN_SIZES]}, steps {list(STEPS)}, variances {list(VARIANCES)}; face "
                f"probability > {self.threshold}, NMS IoU {self.nms_threshold}; the highest-scoring face")

    def tensor(self, images) -> torch.Tensor:
        """Same-size PIL images as the network's input: NCHW float, BGR minus the port's mean."""
        batch = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32)[:, :, ::-1] for im in images])
        return torch.from_numpy(batch - np.asarray(MEAN_BGR, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()

    def raw(self, images):
        """The heads' outputs for same-size images: (box offsets, face probabilities (N, P), landmark offsets),
        and the prior boxes."""
        x = self.tensor(images).to(self.device)
        with torch.inference_mode():
            loc, logits, landmarks = self.net(x)
        priors = prior_boxes(x.shape[2], x.shape[3]).to(self.device)
        if priors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"{loc.shape[1]} predictions for {priors.shape[0]} prior boxes")
        return loc.float(), logits.float().softmax(-1)[..., 1], landmarks.float(), priors

    def faces(self, images) -> list[list[Face]]:
        """Every face per image after the score threshold and NMS, best first (pixels; boxes not clipped, as the
        port gives them). ``last_scores`` keeps each image's best face probability, kept or not."""
        images = list(images)
        found: list[list[Face] | None] = [None] * len(images)
        self.last_scores = [0.0] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, im in enumerate(images):
            by_size.setdefault(im.size, []).append(k)
        for (w, h), indices in by_size.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                loc, scores, landmarks, priors = self.raw([images[k] for k in chunk])
                scale = torch.tensor([w, h], dtype=torch.float32, device=loc.device)
                boxes = decode_boxes(loc, priors) * scale.repeat(2)
                points = decode_landmarks(landmarks, priors) * scale.repeat(5)
                for k, b, s, p in zip(chunk, boxes, scores, points, strict=True):
                    self.last_scores[k] = float(s.max()) if s.numel() else 0.0
                    found[k] = self._select(b, s, p)
        return found

    def _select(self, boxes, scores, points) -> list[Face]:
        keep = torch.nonzero(scores > self.threshold).flatten()
        before, after = self.top_k
        if self.facexlib_order:
            order = np.argsort(scores[keep].cpu().numpy())[::-1].copy()
            keep = keep[torch.from_numpy(order).to(keep.device)]
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:before]
        kept = keep[nms(boxes[keep], scores[keep], self.nms_threshold, self.nms_offset)][:after]
        out = []
        for b, s, p in zip(boxes[kept].tolist(), scores[kept].tolist(), points[kept].tolist(), strict=True):
            out.append(Face(*b, s, tuple((p[2 * j], p[2 * j + 1]) for j in range(5))))
        return out

    def detect(self, images) -> list[Face | None]:
        """Per image the highest-scoring face, its box clipped to the image (as the crop is), or None when no face
        passes the threshold (or the clipped box is under 2 px)."""
        images = list(images)
        out = []
        for image, faces in zip(images, self.faces(images), strict=True):
            if not faces:
                out.append(None)
                continue
            f = faces[0]
            x0, y0 = max(0.0, f.x0), max(0.0, f.y0)
            x1, y1 = min(float(image.width), f.x1), min(float(image.height), f.y1)
            out.append(f._replace(x0=x0, y0=y0, x1=x1, y1=y1) if x1 - x0 >= 2 and y1 - y0 >= 2 else None)
        return out
