"""`characonsist ui` on the other backbones: the UI's worker and HTTP API on a tiny random Chroma folder and tiny
random FLUX.2 [klein] folders (distilled and base), saved like any model folder. The form starts from the model's
own defaults (Chroma 35 steps / guidance 5; klein distilled 4 steps, base 50 steps / guidance 4), a story is
generated with its events and images, and the identity the UI wrote is the story pipeline's own; an uploaded picture becomes the identity."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")


from characonsist import CharaConsistPipeline  # noqa: E402
from test_ui_api import doc, events, picture_story, png_bytes, running_ui, upload  # noqa: E402  (test_ui_api.py's helpers)

SETTINGS = {"num_inference_steps": 2, "height": 32, "width": 32,
            "method_options": {"mask_step": "1"}, "save_masks": True}
STORY = doc("sitting", "running")

MODELS = {   # name: (builder keyword arguments, steps and guidance the form must start from)
    "chroma": ({}, 35, 5.0),
    "klein": ({"is_distilled": True}, 4, 1.0),
    "klein-base": ({"is_distilled": False}, 50, 4.0),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    """(name, saved folder) of a tiny Chroma, a tiny distilled klein and a tiny base klein."""
    from characonsist.testing import tiny_chroma_pipeline, tiny_klein_pipeline

    name = request.param
    folder = tmp_path_factory.mktemp("ui_backbones") / name
    build = tiny_chroma_pipeline if name == "chroma" else tiny_klein_pipeline
    build(**MODELS[name][0]).save_pretrained(folder)
    return name, str(folder)


@pytest.fixture()
def ui(model, tmp_path):
    _, folder = model
    yield from running_ui(folder, tmp_path / "ui", polls=1200)   # as `characonsist ui --model FOLDER` makes it


def test_the_form_starts_from_the_backbones_defaults(model, ui):
    name, _ = model
    _, steps, guidance = MODELS[name]
    info = ui.get("/api/info").json()
    assert info["model_state"] == "ready", info["model_error"]
    assert info["defaults"]["num_inference_steps"] == steps and info["defaults"]["guidance_scale"] == guidance
    assert info["defaults"]["height"] == info["defaults"]["width"] == 1024
    # a story checked with the form's defaults is planned with them (what the page shows as the command)
    checked = ui.post("/api/validate", json={"name": "walk", "story": STORY, "settings": {}}).json()
    assert checked["settings"]["num_inference_steps"] == steps and checked["settings"]["guidance_scale"] == guidance


@pytest.mark.slow
def test_a_story_is_generated_through_the_ui(model, ui, tmp_path):
    name, folder = model
    response = ui.post("/api/jobs", json={"kind": "generate", "name": "walk", "story": STORY, "settings": SETTINGS})
    assert response.status_code == 202, response.text
    seen = events(ui, response.json()["id"])
    assert seen[-1]["type"] == "done", seen[-1]
    steps = [(e["phase"], e["done"], e["total"]) for e in seen if e["type"] == "progress"]
    assert steps[-1] == ("main", 2, 2)
    (group,) = [e for e in seen if e["type"] == "group"]
    images = group["gallery"]["images"]
    assert [im["role"] for im in images] == ["identity", "frame"]
    for im in images:
        got = ui.get(im["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert ui.get(images[1]["mask"]).status_code == 200
    # the identity the UI wrote is what the story pipeline makes of the same call (guidance: the model's default)
    pipe = CharaConsistPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    guidance = MODELS[name][2]
    out = pipe("park#a cat#sitting", ["park#a cat#running"], num_inference_steps=2, height=32, width=32,
               guidance_scale=guidance, mask_step=1, output_type="pil")
    assert out.settings["max_sequence_length"] == 512      # the UI has no field for it: the model's default
    with Image.open(tmp_path / "ui" / "walk" / "000_walk" / "identity.png") as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(out.identity))


@pytest.mark.slow
def test_an_uploaded_picture_is_the_identity(model, ui, tmp_path):
    """The picture's inversion runs on the backbone (a pass labelled "inversion"); the identity written is the
    reconstruction of the fitted picture, and the gallery gives its PSNR."""
    from characonsist.picture import fit_picture, psnr

    stored = upload(ui, png_bytes()).json()
    settings = {**SETTINGS, "inversion": "euler"}
    response = ui.post("/api/jobs", json={"kind": "generate", "name": "walk", "story": picture_story(stored["image"]),
                                          "settings": settings})
    assert response.status_code == 202, response.text
    seen = events(ui, response.json()["id"])
    assert seen[-1]["type"] == "done", seen[-1]
    inversion = [e["done"] for e in seen if e["type"] == "progress" and e["phase"] == "inversion"]
    assert inversion[-1] == 2
    picture = [e for e in seen if e["type"] == "group"][0]["gallery"]["picture"]
    assert picture["inversion"] == "euler" and picture["fit"].startswith("96x40 downscaled to 77x32")
    fitted, _ = fit_picture(Image.open(io.BytesIO(png_bytes())).convert("RGB"), 32, 32)
    with Image.open(tmp_path / "ui" / "walk" / "000_walk" / "identity.png") as identity:
        assert abs(psnr(identity, fitted) - picture["psnr"]) < 1e-6
