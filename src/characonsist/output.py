"""What a run leaves on disk, as bytes and pictures: PNGs with their settings, JSON, masks and storyboards.

Writing is the output folder's job (``characonsist.app.folder``: atomic, locked, nothing outside it).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

META_KEY = "characonsist"  # PNG text chunk holding the JSON record of the image


def settings_hash(settings: dict) -> str:
    """A short stable hash of a JSON-serialisable dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """Encode ``image`` as PNG with ``text`` as tEXt/iTXt chunks (no timestamps: same input, same bytes)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value)) if not str(value).isascii() else info.add_text(key, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_text(record: dict | None) -> dict[str, str]:
    """A record as PNG text chunks: readable keys (prompt, seed, method, settings) plus the full JSON."""
    text = {}
    if record:
        for key in ("prompt", "seed", "method"):
            if key in record:
                text[key] = record[key]
        if "settings" in record:
            text["settings"] = json.dumps(json_safe(record["settings"]), sort_keys=True, allow_nan=False)
        text[META_KEY] = json.dumps(json_safe(record), sort_keys=True, allow_nan=False)
    return text


def read_png_record(path: str | Path) -> dict | None:
    """The JSON record ``png_text`` stored in a PNG, or None (no such file, not ours, or unreadable)."""
    try:
        with Image.open(path) as image:
            image.load()  # also verifies the file is complete
            blob = image.text.get(META_KEY)
    except Exception:
        return None
    try:
        return json.loads(blob) if blob else None
    except ValueError:
        return None


def json_safe(data):
    """A copy that strict JSON can hold: non-finite floats become None (``NaN`` is not JSON), numpy scalars
    Python ones, anything else unknown its ``str``."""
    if isinstance(data, dict):
        return {str(k): json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, (bool, np.bool_)):
        return bool(data)
    if isinstance(data, (int, np.integer)):
        return int(data)
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(data) else None
    if data is None or isinstance(data, str):
        return data
    return str(data)


def json_bytes(data: dict) -> bytes:
    """Strict JSON (no NaN), indented, with a final newline."""
    return (json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def read_json(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- pictures

def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _upscale_mask(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A token-grid bool mask as a grey image of ``size`` (nearest neighbour: each token stays a square)."""
    grid = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
    return grid.resize(size, Image.NEAREST)


def mask_visual(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40)) -> Image.Image:
    """The image with the foreground mask overlaid in ``color``, next to the mask itself."""
    image = image.convert("RGB")
    big = _upscale_mask(mask, image.size)
    tint = Image.new("RGB", image.size, color)
    overlay = Image.composite(Image.blend(image, tint, 0.45), image, big)
    sheet = Image.new("RGB", (image.width * 2, image.height), "white")
    sheet.paste(overlay, (0, 0))
    sheet.paste(big.convert("RGB"), (image.width, 0))
    return sheet


def match_visual(identity: Image.Image, frame: Image.Image, frame_idx, id_idx, sim=None,
                 id_grid: tuple[int, int] | None = None, frame_grid: tuple[int, int] | None = None,
                 max_lines: int = 48) -> Image.Image:
    """Identity (left) and frame (right) with matched token pairs joined by lines (strongest first, at most
    ``max_lines``); indices are flat token-grid positions (row-major over (h/16, w/16) unless grids given)."""
    identity, frame = identity.convert("RGB"), frame.convert("RGB")
    id_grid = id_grid or (identity.height // 16, identity.width // 16)
    frame_grid = frame_grid or (frame.height // 16, frame.width // 16)
    height = max(identity.height, frame.height)
    sheet = Image.new("RGB", (identity.width + frame.width, height), "white")
    sheet.paste(identity, (0, 0))
    sheet.paste(frame, (identity.width, 0))
    draw = ImageDraw.Draw(sheet)
    frame_idx, id_idx = np.asarray(frame_idx).reshape(-1), np.asarray(id_idx).reshape(-1)
    order = np.argsort(-np.asarray(sim).reshape(-1)) if sim is not None and len(frame_idx) else np.arange(len(frame_idx))
    if len(order) > max_lines:  # spread the shown pairs over the ranking, not only the top few
        order = order[np.linspace(0, len(order) - 1, max_lines).round().astype(int)]

    def centre(index: int, grid: tuple[int, int], image: Image.Image, dx: int) -> tuple[float, float]:
        row, col = divmod(int(index), grid[1])
        return dx + (col + 0.5) * image.width / grid[1], (row + 0.5) * image.height / grid[0]

    for rank, k in enumerate(order):
        hue = int(255 * rank / max(len(order), 1))
        color = (hue, 255 - hue, (96 + 3 * hue) % 256)
        a = centre(id_idx[k], id_grid, identity, 0)
        b = centre(frame_idx[k], frame_grid, frame, identity.width)
        draw.line([a, b], fill=color, width=1)
        for x, y in (a, b):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    return sheet


def storyboard(images: list[Image.Image], captions: list[str], columns: int | None = None, title: str | None = None,
               cell: int = 256, pad: int = 8) -> Image.Image:
    """A grid sheet: each image scaled into a ``cell``-wide tile with its caption wrapped underneath."""
    font, title_font = _font(12), _font(16)
    columns = columns or min(len(images), 5)
    rows = -(-len(images) // columns)
    tiles = []
    for image in images:
        scale = cell / max(image.width, image.height)
        tiles.append(image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                                 Image.LANCZOS))
    line_h = 15
    wrapped = [textwrap.wrap(c, width=max(8, cell // 7))[:6] for c in captions]
    text_h = line_h * max((len(w) for w in wrapped), default=0)
    title_h = 26 if title else 0
    width = columns * (cell + pad) + pad
    height = title_h + rows * (cell + text_h + 2 * pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=title_font)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped, strict=True)):
        row, col = divmod(i, columns)
        x = pad + col * (cell + pad) + (cell - tile.width) // 2
        y = title_h + pad + row * (cell + text_h + 2 * pad) + (cell - tile.height) // 2
        sheet.paste(tile, (x, y))
        ty = title_h + pad + row * (cell + text_h + 2 * pad) + cell + 3
        for j, line in enumerate(lines):
            draw.text((pad + col * (cell + pad), ty + j * line_h), line, fill="black", font=font)
    return sheet
