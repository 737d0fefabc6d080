"""Layouts (storyboard, strip, 2x2, panel) as PNG pages and one PDF, and story documents written back as story
files: page counts, captions' room, deterministic bytes, files it will not replace, stale pages, escaping."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from characonsist.app.folder import FolderError, OutputFolder
from characonsist.app.layouts import LAYOUTS, Panel, check_layout_targets, pdf_bytes, render_layout, write_layouts
from characonsist.app.stories import dump_story, parse_story, story_document
from characonsist.inputs import InputError
from characonsist.output import png_bytes, png_text


def panels(n, captions=True):
    rng = np.random.default_rng(0)
    return [Panel(Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)),
                  f"caption {i} " * (i + 1) if captions else "", "g", f"frame {i}") for i in range(n)]


@pytest.mark.parametrize("layout,pages", [("storyboard", 1), ("strip", 2), ("2x2", 2), ("panel", 5)])
def test_page_counts_and_sizes(layout, pages):
    out = render_layout(layout, panels(5), title="T")
    assert len(out) == pages
    if layout == "2x2":
        assert out[0].size == out[1].size          # a last page with one panel keeps the page's size
    if layout == "panel":
        plain = render_layout(layout, panels(1, captions=False))[0]
        assert plain.height < out[0].height        # no caption box without a caption


def test_pdf_has_every_page_and_the_same_bytes_every_time():
    pages = render_layout("panel", panels(3))
    data = pdf_bytes(pages, "t")
    assert data == pdf_bytes(pages, "t") and data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type /Page\b(?!s)", data)) == 3


def _folder_with_group(tmp_path, n):
    out = OutputFolder(tmp_path / "run").open()
    records = []
    for i in range(n):
        path = f"g/{'identity' if i == 0 else f'frame_{i:02d}'}.png"
        out.write_bytes(path, png_bytes(Image.new("RGB", (64, 64), (40 * i, 90, 160)), png_text({"settings_hash": "x"})))
        records.append({"path": path, "role": "identity" if i == 0 else "frame", "index": i, "caption": f"c{i}"})
    return out, [SimpleNamespace(state="done", folder="g", records=records)]


def test_write_layouts_replaces_only_its_own_files_and_drops_stale_pages(tmp_path):
    out, jobs = _folder_with_group(tmp_path, 6)
    try:
        written = write_layouts(out, jobs, ["2x2"])
        assert written == ["layouts/2x2_01.png", "layouts/2x2_02.png", "layouts/2x2.pdf"]
        jobs[0].records = jobs[0].records[:3]                # a shorter story: one page, the second one removed
        assert write_layouts(out, jobs, ["2x2"]) == ["layouts/2x2_01.png", "layouts/2x2.pdf"]
        assert not (out.root / "layouts" / "2x2_02.png").exists()
        Image.new("RGB", (4, 4)).save(out.root / "layouts" / "strip_01.png")      # someone else's file
        with pytest.raises(FolderError, match="was not written by characonsist"):
            write_layouts(out, jobs, ["strip"])
        (out.root / "layouts" / "panel.pdf").write_bytes(b"%PDF-1.4 not ours")
        with pytest.raises(FolderError, match="panel.pdf was not written by characonsist"):
            write_layouts(out, jobs, ["panel"])
        with pytest.raises(ValueError, match="valid: " + ", ".join(LAYOUTS)):
            write_layouts(out, jobs, ["poster"])
    finally:
        out.close()


def test_a_layout_in_the_way_is_named_as_each_front_end_names_the_field(tmp_path):
    """The application layer names the ``layout`` field; the command line passes its flag for it."""
    out, jobs = _folder_with_group(tmp_path, 3)
    try:
        (out.root / "layouts").mkdir()
        Image.new("RGB", (4, 4)).save(out.root / "layouts" / "strip_01.png")      # someone else's file
        with pytest.raises(FolderError, match="and layout='strip' writes there.*or leave out layout$"):
            check_layout_targets(out, jobs, ["strip"], formats=("png",))
        with pytest.raises(FolderError, match="and --layout strip writes there.*or leave out --layout$"):
            check_layout_targets(out, jobs, ["strip"], formats=("png",), names={"layout": "--layout"})
    finally:
        out.close()


def test_story_documents_escape_and_refuse_what_a_format_cannot_hold():
    tricky = {"title": 'He said "hi"\\', "character": "a cat", "scenes": [{"name": "a", "background": "park",
              "images": [{"action": "sits"}, {"action": "runs", "caption": 'line one\nline "two" ü', "seed": 7,
                                              "width": 96}]}]}
    for fmt, name in (("yaml", "s.yaml"), ("toml", "s.toml")):
        story = parse_story(dump_story(tricky, fmt), name)
        assert story.title == 'He said "hi"\\' and story.groups[0].captions[1] == 'line one\nline "two" ü'
        assert story.groups[0].frames[0].seed == 7 and story.groups[0].frames[0].width == 96
        again = story_document(story)
        assert again["character"] == "a cat" and again["scenes"][0]["background"] == "park"
    hashed = {"character": "a#cat", "scenes": [{"images": [{"background": "p", "action": "x"}] * 2}]}
    with pytest.raises(InputError, match="cannot hold: save it as YAML or TOML"):
        dump_story(hashed, "text")
    with pytest.raises(InputError, match="story format 'docx'"):
        dump_story(tricky, "docx")
    with pytest.raises(InputError, match="scenes\\[0\\].frames\\[0\\]: the action field is empty"):
        dump_story({"scenes": [{"background": "p", "images": [{"character": "c", "action": "a"}, {"character": "c"}]}]},
                   "yaml")


def test_a_storyboard_with_a_caption_missing_refuses_instead_of_dropping_an_image():
    """``zip(..., strict=True)``: an image without its caption is an error, never a sheet short of one image."""
    from characonsist.output import storyboard

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    assert storyboard(images, ["a", "b", "c"]).width == storyboard(images[:2], ["a", "b"]).width + 256 + 8
    with pytest.raises(ValueError, match="shorter"):
        storyboard(images, ["a", "b"])
