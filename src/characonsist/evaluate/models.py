"""The models behind the metrics, loaded by hub id or local folder (``from_pretrained``), on the GPU if any.

Each wrapper embeds PIL images (and CLIP texts) into unit vectors and says in ``describe()`` which model and
which preprocessing it used; the report prints that next to every figure.

* CLIP (CLIP-T, CLIP-I, CLIP-I-fg/bg): transformers ``CLIPModel`` + its ``CLIPProcessor``.
* DINOv2: transformers ``Dinov2Model``; the CLS token after the last layer norm (``pooler_output``).
* Segmenter (foreground masks where the run has none), as the paper: SAM (``segment.py``: transformers
  ``SamModel``, default ``facebook/sam-vit-huge``) prompted with the ``Owlv2ForObjectDetection`` box of the
  image's character text, the best of its three masks by predicted IoU; or ``CLIPSegForImageSegmentation``
  prompted with the character text (``--segmenter clipseg``).
* Face detector, as the paper: RetinaFace (``retinaface.py``: the PyTorch port's network with its ResNet-50 or
  MobileNet-0.25 weights, prior boxes, decoding and NMS, written here; the highest-scoring face); or transformers
  ``Owlv2ForObjectDetection``, zero-shot with the query "a photo of a human face" (``--face-detector`` an OWLv2 id).
* Face embedder, as the paper: FaceNet (``facenet.py``: Inception-ResNet-v1 with facenet-pytorch's VGGFace2
  weights, written here); or an ArcFace ONNX model (insightface's model-zoo files, e.g. ``w600k_r50.onnx``) run
  with onnxruntime (``pip install 'characonsist[eval]'``).
* DreamSim: the official checkpoints (the ``dreamsim`` package's cache folder and download URLs) run by
  ``evaluate/dreamsim.py`` in plain torch (no torchvision, timm, open_clip or dreamsim package): DINO ViT-B/16 CLS +
  CLIP and OpenCLIP ViT-B/16 projected CLS for ``ensemble``, the fine-tuned LoRA merged at load time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .unavailable import ModelUnavailable

EXTRA = "pip install 'characonsist[eval]'"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def pick_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"--device {name}: no CUDA GPU is visible")
    return name


def _load(loader, name: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"cannot load the {what} {name!r} (a hub id or a local folder; offline, it must be in "
                               f"the Hugging Face cache): {str(e).splitlines()[0]}") from None


def _quiet():
    """transformers' loading bars and notices off while loading (restored after)."""

    from transformers.utils import logging

    @contextmanager
    def scope():
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        bars = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()

    return scope()


def _describe_processor(processor) -> str:
    """A short account of an image processor: resize, crop, normalisation."""
    p = getattr(processor, "image_processor", processor)
    parts = []
    size = getattr(p, "size", None)
    if size:
        resample = getattr(p, "resample", None)
        method = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(int(resample), str(resample)) \
            if resample is not None else "default"
        parts.append(f"resize {dict(size)} ({method})")
    if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None):
        parts.append(f"center crop {dict(p.crop_size)}")
    if getattr(p, "do_pad", False):
        parts.append("pad to square")
    mean, std = getattr(p, "image_mean", None), getattr(p, "image_std", None)
    if mean is not None:
        parts.append(f"normalize mean {tuple(round(float(m), 4) for m in mean)} std "
                     f"{tuple(round(float(s), 4) for s in std)}")
    return ", ".join(parts)


class _Torch:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = pick_device(device)

    def _run(self, module, **inputs):
        """``module`` on ``inputs`` moved to the device, without autograd (``_head`` runs a projection likewise)."""
        with self.torch.inference_mode():
            return module(**{k: v.to(self.device) for k, v in inputs.items()})

    def _head(self, module, x):
        with self.torch.inference_mode():
            return module(x)


class ClipModel(_Torch):
    """CLIP image and text embeddings (projected, unit length)."""

    def __init__(self, name: str, device: str = "auto"):
        super().__init__(device)
        from transformers import AutoProcessor, CLIPModel

        with _quiet():
            self.model = _load(CLIPModel, name, "CLIP model").eval().to(self.device)
            self.processor = _load(AutoProcessor, name, "CLIP processor")
        self.name = name
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.truncated = 0

    def describe(self, text: bool = False) -> dict:
        prep = _describe_processor(self.processor) + "; projected embeddings, cosine"
        if text:
            prep += f"; text: the CLIP tokenizer, truncated to {self.max_length} tokens"
        return {"model": f"CLIPModel {self.name}", "preprocessing": prep}

    def embed_images(self, images) -> np.ndarray:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self._run(self.model.vision_model, pixel_values=pixels)
        return _unit(self._head(self.model.visual_projection, out.pooler_output))

    def embed_texts(self, texts) -> np.ndarray:
        tok = self.processor.tokenizer
        full = tok(list(texts))["input_ids"]
        self.truncated += sum(len(ids) > self.max_length for ids in full)
        batch = tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self._run(self.model.text_model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _unit(self._head(self.model.text_projection, out.pooler_output))


class Dinov2(_Torch):
    """DINOv2 image embeddings: the CLS token after the final layer norm."""

    def __init__(self, name: str, device: str = "auto"):
        super().__init__(device)
        from transformers import AutoImageProcessor, Dinov2Model

        with _quiet():
            self.model = _load(Dinov2Model, name, "DINOv2 model").eval().to(self.device)
            self.processor = _load(AutoImageProcessor, name, "DINOv2 image processor")
        self.name = name

    def describe(self) -> dict:
        return {"model": f"Dinov2Model {self.name}", "preprocessing": _describe_processor(self.processor)
                + "; CLS token after the final layer norm, cosine"}

    def embed_images(self, images) -> np.ndarray:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _unit(self._run(self.model, pixel_values=pixels).pooler_output)


class ClipSegSegmenter(_Torch):
    """Foreground masks from CLIPSeg prompted with the character text (sigmoid > threshold)."""

    def __init__(self, name: str, device: str = "auto", threshold: float = 0.4):
        super().__init__(device)
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        with _quiet():
            self.model = _load(CLIPSegForImageSegmentation, name, "CLIPSeg model").eval().to(self.device)
            self.processor = _load(AutoProcessor, name, "CLIPSeg processor")
        self.name, self.threshold = name, threshold

    def describe(self) -> str:
        return (f"CLIPSegForImageSegmentation {self.name} prompted with the character text "
                f"({_describe_processor(self.processor)}); sigmoid > {self.threshold}, resized to the image (bilinear)")

    def masks(self, images, texts) -> list[np.ndarray]:
        import torch.nn.functional as F

        images = list(images)
        batch = self.processor(text=list(texts), images=images, padding=True, return_tensors="pt")
        logits = self._run(self.model, **batch).logits
        logits = logits.reshape(len(images), *logits.shape[-2:])
        out = []
        for image, logit in zip(images, logits, strict=True):
            prob = F.interpolate(logit[None, None].float().sigmoid(), size=(image.height, image.width),
                                 mode="bilinear", align_corners=False)[0, 0]
            out.append((prob > self.threshold).cpu().numpy())
        return out


class Owlv2Detector(_Torch):
    """OWLv2 zero-shot detection: per image, the best-scoring box for a text query, or None below a threshold."""

    def __init__(self, name: str, device: str = "auto"):
        super().__init__(device)
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        with _quiet():
            self.model = _load(Owlv2ForObjectDetection, name, "OWLv2 detector").eval().to(self.device)
            self.processor = _load(AutoProcessor, name, "OWLv2 processor")
        self.name = name

    def best_boxes(self, images, queries, threshold: float) -> list[tuple[float, float, float, float, float] | None]:
        """Per image ``(x0, y0, x1, y1, score)`` in pixels for its query (truncated to the text model's length), or
        None when the best score is below ``threshold``; ``last_scores`` keeps each image's best score."""
        images = list(images)
        batch = self.processor(text=[[q] for q in queries], images=images, truncation=True, return_tensors="pt")
        out = self._run(self.model, **batch)
        scores = out.logits.max(dim=-1).values.sigmoid().float().cpu().numpy()
        boxes = out.pred_boxes.float().cpu().numpy()
        found, self.last_scores = [], []
        for image, s, b in zip(images, scores, boxes, strict=True):
            k = int(np.argmax(s))
            self.last_scores.append(float(s[k]))
            if s[k] < threshold:
                found.append(None)
                continue
            side = max(image.width, image.height)  # OWLv2 pads to a square (bottom, right) before resizing
            cx, cy, w, h = (float(v) * side for v in b[k])
            x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
            x1, y1 = min(float(image.width), cx + w / 2), min(float(image.height), cy + h / 2)
            found.append((x0, y0, x1, y1, float(s[k])) if x1 - x0 >= 2 and y1 - y0 >= 2 else None)
        return found


class Owlv2FaceDetector(Owlv2Detector):
    """The best-scoring box for a face query (OWLv2, zero-shot), or None below the threshold."""

    QUERY = "a photo of a human face"

    def __init__(self, name: str, device: str = "auto", threshold: float = 0.3):
        super().__init__(name, device)
        self.threshold = threshold

    def describe(self) -> str:
        return (f"Owlv2ForObjectDetection {self.name}, query {self.QUERY!r}, best box with score >= {self.threshold} "
                f"({_describe_processor(self.processor)})")

    def detect(self, images) -> list[tuple[float, float, float, float, float] | None]:
        """Per image ``(x0, y0, x1, y1, score)`` in pixels, or None."""
        images = list(images)
        return self.best_boxes(images, [self.QUERY] * len(images), self.threshold)


def onnx_session(file, device: str = "auto", what: str = "the ONNX model"):
    """An onnxruntime session of ``file`` (CUDA first when ``device`` picks a GPU and onnxruntime has it)."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelUnavailable(f"{what} needs onnxruntime: {EXTRA}") from None
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and pick_device(device).startswith("cuda") \
            and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(file), providers=providers)
    except Exception as e:
        raise ModelUnavailable(f"{file}: not a loadable ONNX model ({e})") from None


class ArcFaceOnnx:
    """Face embeddings from an ArcFace-style ONNX model (NCHW RGB input, (x - 127.5) / 127.5)."""

    def __init__(self, path: str, device: str = "auto"):
        file = _resolve_file(path, "face embedding model", suffix=".onnx")
        self.session = onnx_session(file, device, "face identity similarity")
        shape = self.session.get_inputs()[0].shape
        self.size = tuple(int(d) if isinstance(d, int) else 112 for d in shape[2:4]) if len(shape) == 4 else (112, 112)
        self.file, self.margin = file, 0.2
        self.label = f"ArcFace ONNX {file.name}"

    def describe(self) -> str:
        return (f"ArcFace ONNX {self.file.name} (onnxruntime): square crop of the face box with {self.margin:.0%} "
                f"margin, no landmark alignment, resized to {self.size[1]}x{self.size[0]} (bilinear), RGB, "
                "(x - 127.5) / 127.5; cosine")

    def crop(self, image, box):
        x0, y0, x1, y1 = box[:4]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = max(x1 - x0, y1 - y0) * (1 + self.margin) / 2

        return image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half))).resize(
            (self.size[1], self.size[0]), Image.BILINEAR)

    def embed(self, faces) -> np.ndarray:

        size = (self.size[1], self.size[0])
        faces = [f if f.size == size else f.resize(size, Image.BILINEAR) for f in faces]
        batch = np.stack([(np.asarray(f.convert("RGB"), dtype=np.float32) - 127.5) / 127.5 for f in faces])
        batch = batch.transpose(0, 3, 1, 2)
        name = self.session.get_inputs()[0].name
        out = [self.session.run(None, {name: batch[i:i + 1]})[0][0] for i in range(len(batch))]
        return _unit(np.stack(out).reshape(len(out), -1))


class DreamSim(_Torch):
    """DreamSim embeddings (``evaluate/dreamsim.py``: the official checkpoints in plain torch), from ``cache_dir``."""

    def __init__(self, kind: str = "ensemble", cache_dir: str | None = None, device: str = "auto",
                 progress: bool = True):
        super().__init__(device)
        from .dreamsim import load_dreamsim

        self.kind = kind
        self.model = load_dreamsim(kind, cache_dir, self.device, progress=progress)

    def describe(self) -> dict:
        from .dreamsim import TYPES

        names = " + ".join(TYPES[self.kind].backbones)
        return {"model": f"DreamSim {self.kind} ({names}, LoRA merged; checkpoints in {self.model.cache_dir})",
                "preprocessing": "RGB, resize 224x224 (PIL bicubic), [0, 1], each backbone's mean/std; embeddings "
                                 "concatenated, centred, unit length; distance = 1 - cosine"}

    def embed_images(self, images, batch_size: int = 16) -> np.ndarray:
        images = list(images)
        out = [self._head(self.model.embed, self.model.preprocess(images[i:i + batch_size]).to(self.device))
               for i in range(0, len(images), batch_size)]
        return _unit(self.torch.cat(out))


def _unit(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _resolve_file(name: str, what: str, suffix: str):
    """A local file, a folder holding exactly one ``suffix`` file, or ``owner/repo:file`` on the hub."""

    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob(f"*{suffix}"))
        if len(found) == 1:
            return found[0]
        raise ModelUnavailable(f"{path}: expected one {suffix} file for the {what}, found {len(found)}; name the file")
    repo, sep, filename = name.partition(":")
    if sep and filename:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as e:
            raise ModelUnavailable(f"cannot download {filename!r} from {repo!r} for the {what}: {e}") from None
    raise ModelUnavailable(f"{name!r}: the {what} must be a {suffix} file, a folder with one, or owner/repo:file")


def fill_colour() -> tuple[int, int, int]:
    """The colour masked-out pixels get: CLIP's normalisation mean, which the CLIP processor maps to 0."""
    return tuple(int(math.floor(c * 255 + 0.5)) for c in CLIP_MEAN)
