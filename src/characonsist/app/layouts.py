"""Storyboards and comic pages of a run folder's images, as PNG pages and one PDF (the command line's
``generate --layout`` and the web UI's export share this module).

Layouts (every finished image of the story in order, identity first in each group, its caption underneath):

- ``storyboard``: one sheet per group (identity and frames in a grid, the group's name on top);
- ``strip``: comic strips of up to four panels in a row;
- ``2x2``: comic pages of four panels;
- ``panel``: one panel per page.

Files: ``DIR/layouts/<layout>_NN.png`` (one per page) and ``DIR/layouts/<layout>.pdf`` (every page), written
atomically through the output folder; a file there that characonsist did not write is never replaced.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from ..output import png_bytes, png_text, read_png_record, storyboard
from .folder import FolderError, OutputFolder
from .settings import label, setting

LAYOUTS = ("storyboard", "strip", "2x2", "panel")
FOLDER = "layouts"
PDF_CREATOR = "characonsist"


@dataclass
class Panel:
    image: Image.Image
    caption: str        # '' for none
    group: str
    label: str          # identity, frame 1, ...


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def panels_of(out: OutputFolder, jobs) -> list[Panel]:
    """Every finished group's images in story order (read from the folder)."""
    panels = []
    for job in jobs:
        if job.state != "done":
            continue
        for record in job.records:
            with Image.open(out.path(record["path"])) as image:
                panels.append(Panel(image.convert("RGB"), record.get("caption") or "", job.folder,
                                    "identity" if record["role"] == "identity" else f"frame {record['index']}"))
    return panels


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return [line for line in lines if line] or []


def comic_page(panels: list[Panel], columns: int, rows: int, title: str = "", panel_width: int = 480,
               margin: int = 28, gutter: int = 18, border: int = 3, fit: list[Panel] | None = None) -> Image.Image:
    """One comic page: panels in ``rows`` x ``columns`` cells with black borders and a caption box under each
    image (none when the caption is empty); ``title`` on top. Cells are sized for the panels of ``fit`` (all the
    pages' panels), so every page of a layout has the same size."""
    font, title_font = _font(18), _font(26)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    scaled = []
    for p in panels:
        scale = panel_width / p.image.width
        size = (panel_width, max(1, round(p.image.height * scale)))
        scaled.append(p.image.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC))
    fit = fit or panels
    image_h = max((max(1, round(p.image.height * panel_width / p.image.width)) for p in fit), default=panel_width)
    wrapped = [_wrap(probe, p.caption, font, panel_width - 20)[:5] for p in panels]
    line_h = 24
    caption_h = max((len(w) * line_h + 16 for w in (_wrap(probe, p.caption, font, panel_width - 20)[:5] for p in fit)
                     if w), default=0)
    cell_w, cell_h = panel_width + 2 * border, image_h + caption_h + 2 * border
    title_h = 48 if title else 0
    width = 2 * margin + columns * cell_w + (columns - 1) * gutter
    height = 2 * margin + title_h + rows * cell_h + (rows - 1) * gutter
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((margin, margin), title, fill="black", font=title_font)
    for i, (im, lines) in enumerate(zip(scaled, wrapped, strict=True)):
        row, col = divmod(i, columns)
        x = margin + col * (cell_w + gutter)
        y = margin + title_h + row * (cell_h + gutter)
        box_h = im.height + (len(lines) * line_h + 16 if lines else 0) + 2 * border
        draw.rectangle([x, y, x + cell_w - 1, y + box_h - 1], fill="white", outline="black", width=border)
        page.paste(im, (x + border, y + border))
        if lines:
            ty = y + border + im.height
            draw.line([x, ty, x + cell_w - 1, ty], fill="black", width=border)
            draw.rectangle([x + border, ty + border, x + cell_w - border - 1, y + box_h - border - 1],
                           fill=(255, 248, 214))
            for j, line in enumerate(lines):
                draw.text((x + border + 10, ty + 8 + j * line_h), line, fill="black", font=font)
    return page


def render_layout(layout: str, panels: list[Panel], title: str = "") -> list[Image.Image]:
    """The pages of ``layout`` for ``panels`` (ValueError for an unknown layout or no panels)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not panels:
        raise ValueError("no finished images to lay out")
    if layout == "storyboard":
        pages, groups = [], {}
        for p in panels:
            groups.setdefault(p.group, []).append(p)
        for name, members in groups.items():
            captions = [f"{p.label}: {p.caption}" if p.caption else p.label for p in members]
            pages.append(storyboard([p.image for p in members], captions, title=name))
        return pages
    per_page, columns = PER_PAGE[layout], {"strip": 4, "2x2": 2, "panel": 1}[layout]
    columns = min(columns, len(panels)) if layout == "strip" else columns
    rows = -(-per_page // columns) if layout == "2x2" else 1
    pages = []
    for start in range(0, len(panels), per_page):
        number = f" ({start // per_page + 1})" if start else ""
        pages.append(comic_page(panels[start:start + per_page], columns, rows, title=title and title + number,
                                fit=panels))
    return pages


def pdf_bytes(pages: list[Image.Image], title: str = "") -> bytes:
    """Every page in one PDF (Pillow's writer; no dates, so the same pages give the same bytes)."""
    buffer = io.BytesIO()
    first, *rest = [p.convert("RGB") for p in pages]
    first.save(buffer, format="PDF", save_all=True, append_images=rest, resolution=150.0, title=title or "story",
               creator=PDF_CREATOR, producer=PDF_CREATOR, creationDate=None, modDate=None)
    return buffer.getvalue()


def _is_ours(out: OutputFolder, rel: str) -> bool:
    """Whether the file at ``rel`` is missing or one this module wrote."""
    path = out.path(rel)
    if not (path.exists() or path.is_symlink()):
        return True
    if path.is_symlink() or not path.is_file():
        return False
    if rel.endswith(".pdf"):
        with open(path, "rb") as f:   # Pillow writes the creator as UTF-16 text
            data = f.read()
        return data.startswith(b"%PDF") and (PDF_CREATOR.encode("utf-16-be") in data
                                             or f"({PDF_CREATOR})".encode() in data)
    record = read_png_record(path)
    return isinstance(record, dict) and record.get("layout") is not None


def layout_files(layout: str, pages: int, formats=("png", "pdf")) -> list[str]:
    files = [f"{FOLDER}/{layout}_{i:02d}.png" for i in range(1, pages + 1)] if "png" in formats else []
    return files + ([f"{FOLDER}/{layout}.pdf"] if "pdf" in formats else [])


PER_PAGE = {"strip": 4, "2x2": 4, "panel": 1}   # panels a page; a storyboard is one page a group


def check_layout_targets(out: OutputFolder, jobs, layouts, formats=("png", "pdf"), names: dict | None = None) -> None:
    """Before any work (the model not loaded): every file ``layouts`` would write once every group of ``jobs`` is
    finished is missing or one this module wrote; FolderError names the first that is not (and the ``layout`` field
    as ``names`` calls it)."""
    images = sum(len(job.records) for job in jobs)
    for layout in dict.fromkeys(layouts):
        pages = len(jobs) if layout == "storyboard" else -(-images // PER_PAGE.get(layout, 1))
        for rel in layout_files(layout, pages, formats):
            if not _is_ours(out, rel):
                raise FolderError(f"{out.path(rel)} was not written by characonsist and "
                                  f"{setting(names, 'layout', layout)} writes there: move it away (characonsist "
                                  f"never replaces files it did not write), or leave out {label(names, 'layout')}",
                                  out.path(rel))


def write_layouts(out: OutputFolder, jobs, layouts, title: str = "", formats=("png", "pdf")) -> list[str]:
    """Render ``layouts`` of the finished groups of ``jobs`` and write them into ``out`` (locked by the caller);
    the paths written, relative to ``out``. Pages left from an earlier, longer export of the same layout are
    removed (only files this module wrote)."""
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout {', '.join(map(repr, unknown))}; valid: {', '.join(LAYOUTS)}")
    panels = panels_of(out, jobs)
    written = []
    for layout in dict.fromkeys(layouts):
        pages = render_layout(layout, panels, title)
        files = layout_files(layout, len(pages), formats)
        stale = [p.relative_to(out.root).as_posix() for p in out.path(FOLDER).glob(f"{layout}_*.png")] \
            if out.path(FOLDER).is_dir() else []
        stale = [rel for rel in stale if rel not in files and _is_ours(out, rel)]
        for rel in files:
            if not _is_ours(out, rel):
                raise FolderError(f"{out.path(rel)} was not written by characonsist: move it away (characonsist "
                                  "never replaces files it did not write) and export again", out.path(rel))
        for i, page in enumerate(pages, 1):
            if "png" in formats:
                record = {"layout": layout, "page": i, "pages": len(pages), "title": title,
                          "groups": sorted({p.group for p in panels})}
                out.write_bytes(f"{FOLDER}/{layout}_{i:02d}.png", png_bytes(page, png_text(record)))
        if "pdf" in formats:
            out.write_bytes(f"{FOLDER}/{layout}.pdf", pdf_bytes(pages, title))
        for rel in stale:
            out.remove(rel)
        written += files
    return written


__all__ = ["LAYOUTS", "Panel", "check_layout_targets", "comic_page", "layout_files", "panels_of", "pdf_bytes", "render_layout",
           "write_layouts"]
