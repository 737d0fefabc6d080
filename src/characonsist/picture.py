"""A user's picture as the identity image: reading it (PIL image, array or file), fitting it to the size the model
generates the identity at, and how close the reconstruction is to it (PSNR).

Nothing here imports torch, so the application layer checks a picture before any model loads. The inversion of
the model's flow that makes the identity's row follow the picture is ``characonsist.inversion``.

Fitting keeps the aspect ratio: the picture is scaled (Lanczos) until it covers the target size, then the middle
is cut out. A picture already the target size is used as it is. ``describe_fit`` says what was done, for the
output's notes.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .inputs import InputError, excerpt


@dataclass(frozen=True)
class Fit:
    """How a picture of ``source`` (height, width) becomes ``target``: scaled to ``scaled``, then centre-cropped."""

    source: tuple[int, int]
    scaled: tuple[int, int]
    target: tuple[int, int]

    @property
    def resized(self) -> bool:
        return self.scaled != self.source

    @property
    def cropped(self) -> bool:
        return self.scaled != self.target

    def describe(self) -> str:
        (sh, sw), (ch, cw), (th, tw) = self.source, self.scaled, self.target
        if not self.resized and not self.cropped:
            return f"{sw}x{sh} used as it is"
        parts = []
        if self.resized:
            factor = ch / sh
            parts.append(f"{'down' if factor < 1 else 'up'}scaled to {cw}x{ch}")
        if self.cropped:
            lost = 1 - (th * tw) / (ch * cw)
            parts.append(f"centre-cropped to {tw}x{th} ({100 * lost:.0f}% of it cut)")
        return f"{sw}x{sh} " + ", ".join(parts)


def fit_size(source: tuple[int, int], target: tuple[int, int]) -> Fit:
    """The scaled size (height, width) that covers ``target`` with the source's aspect ratio (at least the target
    on both sides; the source size itself when it is the target)."""
    (sh, sw), (th, tw) = source, target
    if (sh, sw) == (th, tw):
        return Fit(source, source, target)
    scale = max(th / sh, tw / sw)
    scaled = (max(th, math.ceil(sh * scale - 1e-6)), max(tw, math.ceil(sw * scale - 1e-6)))
    return Fit(source, scaled, target)


SOURCE_KEY = "characonsist_source"   # PIL ``info`` key: the file a picture's bytes came from (``describe_source``)


def describe_source(value) -> str:
    """A short name for a picture value (its path, or its type and size) for messages and records."""
    if isinstance(value, (str, Path)):
        return str(value)
    named = (getattr(value, "info", None) or {}).get(SOURCE_KEY)    # a PIL image read from a file's bytes
    if isinstance(named, str):
        return named
    shape = getattr(value, "shape", None) or getattr(value, "size", None)
    return f"{type(value).__name__} {tuple(shape) if shape is not None else ''}".strip()


def load_picture(value, place: str = "identity_image"):
    """The picture as an RGB ``PIL.Image``: a PIL image, an array (H, W), (H, W, 3) or (H, W, 4), uint8 or float in
    [0, 1] (a torch tensor is taken as an array, channels last or first), or a path to an image file.

    Raises InputError naming ``place`` and what is wrong (missing file, not an image, bad shape, ...)."""

    if isinstance(value, Image.Image):
        if value.width < 1 or value.height < 1:
            raise InputError(f"{place}: the picture is empty ({value.width}x{value.height})")
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not str(value).strip():
            raise InputError(f"{place}: empty path; give an image file (PNG, JPEG, WebP, ...)")
        if path.is_dir():
            raise InputError(f"{place}: {path} is a folder, not an image file")
        if not path.is_file():
            if path.exists():
                raise InputError(f"{place}: {path} is not a regular file (a device, pipe or socket); give an image "
                                 "file (PNG, JPEG, WebP, ...)")
            raise InputError(f"{place}: {path}: image file not found")
        return _decode(path, str(path), place)[0]
    if hasattr(value, "detach") and hasattr(value, "cpu"):   # a torch tensor
        value = value.detach().float().cpu().numpy()
        if value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[-1] not in (1, 3, 4):
            value = np.moveaxis(value, 0, -1)
    if isinstance(value, np.ndarray):
        return _from_array(value, place)
    raise InputError(f"{place}: expected a PIL image, an array (H, W[, 3 or 4]) or an image file path, got "
                     f"{type(value).__name__} {excerpt(value)}")


def load_picture_bytes(data: bytes, name: str, place: str = "picture", formats: tuple[str, ...] | None = None,
                       max_pixels: int | None = None):
    """``(RGB PIL image, PIL format name)`` of an image file's bytes (an upload), decoded completely, with the same
    messages as a file (``name`` stands for the file in them). ``formats`` (PIL names such as ``"PNG"``) and
    ``max_pixels`` refuse other formats and larger pictures before they are decoded."""

    return _decode(io.BytesIO(data), name, place, formats, max_pixels)


def _decode(source, name: str, place: str, formats: tuple[str, ...] | None = None, max_pixels: int | None = None):
    """Open and decode an image file (a path or a file object) completely: ``(RGB image, format)``, or InputError."""

    where = place if not name or name == place else f"{place}: {name}"   # an unnamed upload: "picture: ..." once
    try:
        with Image.open(source) as image:
            if formats is not None and image.format not in formats:
                raise InputError(f"{where}: a {image.format} picture; save it as "
                                 f"{', '.join(formats[:-1])} or {formats[-1]}")
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise InputError(f"{where}: {image.width}x{image.height} is more than "
                                 f"{max_pixels / 1e6:g} megapixels; scale the picture down first")
            image.load()
            if image.width < 1 or image.height < 1:
                raise InputError(f"{where}: the picture is empty ({image.width}x{image.height})")
            return image.convert("RGB"), image.format
    except UnidentifiedImageError:
        raise InputError(f"{where}: not an image PIL can read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: {e}; scale the picture down first") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read the image ({e.strerror or e}); is the file complete "
                         "and readable?") from None


def _from_array(array: np.ndarray, place: str):

    a = array
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise InputError(f"{place}: an array picture must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if a.dtype == np.uint8:
        data = a
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise InputError(f"{place}: the array picture has NaN or infinite values")
        if np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            if f.min() < 0 or f.max() > 255:
                raise InputError(f"{place}: integer pixel values must be 0-255, got {f.min():g} to {f.max():g}")
            data = f.astype(np.uint8)
        else:
            if f.min() < -1e-3 or f.max() > 1 + 1e-3:
                raise InputError(f"{place}: float pixel values must be in [0, 1], got {f.min():.3g} to {f.max():.3g}")
            data = (np.clip(f, 0, 1) * 255).round().astype(np.uint8)
    else:
        raise InputError(f"{place}: unsupported array dtype {a.dtype}")
    image = Image.fromarray(np.ascontiguousarray(data))
    return image.convert("RGB")


def fit_picture(image, height: int, width: int):
    """``(fitted RGB PIL image, Fit)``: ``image`` scaled to cover ``height`` x ``width`` and centre-cropped."""

    fit = fit_size((image.height, image.width), (height, width))
    if fit.resized:
        image = image.resize((fit.scaled[1], fit.scaled[0]), Image.LANCZOS)
    if fit.cropped:
        top, left = (fit.scaled[0] - height) // 2, (fit.scaled[1] - width) // 2
        image = image.crop((left, top, left + width, top + height))
    return image, fit


def picture_size(path: str | Path, place: str = "picture") -> tuple[int, int]:
    """(height, width) of an image file, after checking that it decodes completely (InputError otherwise)."""
    image = load_picture(Path(path), place)
    return image.height, image.width


def bytes_digest(data: bytes) -> str:
    """The sha256 of a picture's bytes, as ``file_digest`` gives it for its file."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (a changed picture makes a different group: resume regenerates it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_float_array(image) -> np.ndarray:
    """A pipeline image (PIL, uint8 or float array, CHW or HWC tensor) as float64 (H, W, 3) in [0, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = np.moveaxis(image, 0, -1)
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image[..., :3].astype(np.float64) / 255
    return np.clip(image[..., :3].astype(np.float64), 0, 1)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images of one size (pixel range [0, 1]); inf when equal."""
    x, y = as_float_array(a), as_float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr: images of different sizes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
