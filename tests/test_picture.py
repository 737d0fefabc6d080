"""A picture as the identity: reading and fitting pictures, the inversions, the engine's row following the picture,
every method with a picture, and a real photograph through the tiny pipeline (CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from characonsist import inversion as inv
from characonsist.engine import sampler_schedule
from characonsist.inputs import InputError
from characonsist.inversion import InversionConfig, PictureRow, encode_picture, invert, parse_inversion
from characonsist.methods.base import story_seeds
from characonsist.picture import describe_source, fit_picture, fit_size, load_picture, psnr
from conftest import FRAMES, IDENTITY, effects_off  # the shared story (conftest.py)

KW = dict(height=32, width=32, num_inference_steps=8, max_sequence_length=32)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return (rng.random((40, 48, 3)) * 255).astype(np.uint8)


def _x0(pipe, image, height=32, width=32):
    fitted, _ = fit_picture(load_picture(image), height, width)
    return encode_picture(pipe, fitted, "cpu")


# ------------------------------------------------------------------ pictures

def test_load_picture_takes_images_arrays_and_files(tmp_path, picture):
    path = tmp_path / "p.png"
    Image.fromarray(picture).save(path)
    for value in (picture, picture / 255.0, Image.fromarray(picture), path, str(path),
                  torch.from_numpy(picture).permute(2, 0, 1) / 255.0):
        image = load_picture(value)
        assert image.mode == "RGB" and image.size == (48, 40)
        assert np.abs(np.asarray(image).astype(int) - picture).max() <= 1
    grey = load_picture(picture[..., 0])
    assert np.array_equal(np.asarray(grey)[..., 1], picture[..., 0])
    rgba = np.concatenate([picture, np.full((40, 48, 1), 7, np.uint8)], -1)
    assert np.array_equal(np.asarray(load_picture(rgba)), picture)


@pytest.mark.parametrize("value, message", [
    ("missing.png", "image file not found"), (np.zeros((4, 4, 2)), "must be (H, W)"),
    (np.full((4, 4, 3), 2.0), "must be in [0, 1]"), (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), 300), "0-255"), (42, "expected a PIL image"), ("", "empty path")])
def test_bad_pictures_are_named_with_what_to_do(value, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")) as info:
        load_picture(value, "identity_image")
    assert info.value.problems[0].startswith("identity_image: ")


def test_broken_files_and_folders(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="not an image PIL can read"):
        load_picture(tmp_path / "broken.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_picture(tmp_path / "cut.png")
    with pytest.raises(InputError, match="is a folder"):
        load_picture(tmp_path)


def test_fit_scales_to_cover_and_cuts_the_middle():
    fit = fit_size((40, 48), (32, 32))
    assert fit.scaled == (32, 39) and fit.resized and fit.cropped
    assert fit.describe() == "48x40 downscaled to 39x32, centre-cropped to 32x32 (18% of it cut)"
    assert fit_size((32, 32), (32, 32)).describe() == "32x32 used as it is"
    up = fit_size((10, 20), (32, 32))
    assert up.scaled == (32, 64) and up.describe().startswith("20x10 upscaled to 64x32")
    assert fit_size((64, 64), (32, 32)).describe() == "64x64 downscaled to 32x32"
    # the middle is kept: a picture whose left and right thirds are black keeps only its white middle
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, 32:64] = 255
    fitted, fit = fit_picture(Image.fromarray(stripes), 32, 32)
    assert fitted.size == (32, 32) and not fit.resized and np.asarray(fitted).min() == 255


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    b = np.full((4, 4, 3), 0.1)
    assert psnr(a, b) == pytest.approx(20.0)          # mse 0.01
    with pytest.raises(ValueError, match="different sizes"):
        psnr(a, np.zeros((2, 2, 3)))


# ------------------------------------------------------------------ inversion options and solvers

def test_inversion_specs_round_trip_and_bad_ones_are_refused():
    assert parse_inversion(None) == InversionConfig()
    assert parse_inversion("euler:follow=start:eta=0.5") == InversionConfig("euler", "start", eta=0.5)
    for spec in ("renoise", "euler", "fireflow", "rf:gamma=0.7", "euler:follow=start:eta=0.9:eta_end=0.5"):
        assert parse_inversion(spec).spec() == spec
    assert parse_inversion({"mode": "rf", "gamma": 1}).gamma == 1.0
    for bad, message in [("nope", "valid: 'renoise'"), ("renoise:follow=start", "needs an inversion"),
                         ("rf:gamma=2", r"gamma=2.0: must be in \[0, 1\]"), ("euler:speed=2", "no option"),
                         ("euler:fast", "not KEY=VALUE"), (3, "expected a mode name")]:
        with pytest.raises(InputError, match=message):
            parse_inversion(bad)


def _field(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth nonlinear velocity field for the solver tests (no model)."""
    return torch.tanh(x) * (1.5 - sigma) + 0.3 * x.roll(1, -1)


def test_rf_inversion_spans_euler_and_renoise_exactly():
    """RF-Inversion's controller (Eq. 8): gamma = 0 is Euler inversion, gamma = 1 the straight path to the noise, i.e.
    re-noising the picture along the sampler's sigmas."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 6, 4, generator=gen), torch.randn(1, 6, 4, generator=gen)
    sigmas = torch.tensor([1.0, 0.93, 0.8, 0.61, 0.4, 0.18, 0.0])
    euler = invert(_field, x0, sigmas, InversionConfig("euler"))
    assert all(torch.equal(a, b) for a, b in zip(euler, invert(_field, x0, sigmas, InversionConfig("rf", gamma=0.0),
                                                                noise), strict=True))
    straight = invert(_field, x0, sigmas, InversionConfig("rf", gamma=1.0), noise)
    renoise = PictureRow(InversionConfig("renoise"), x0, noise, sigmas)
    for k in range(len(sigmas)):
        torch.testing.assert_close(straight[k], renoise.at(k), atol=1e-5, rtol=1e-5)
    assert torch.equal(euler[-1], x0) and torch.equal(renoise.at(6), x0)


def test_fireflow_is_more_accurate_than_euler_at_the_same_cost():
    """dx/dsigma = x has the exact inverse path x0 e^sigma: FireFlow's reused midpoint (second order) lands far closer
    than Euler with the same number of steps (one model call more)."""
    x0 = torch.ones(1, 3, 2)
    sigmas = torch.linspace(1, 0, 11)
    calls = {"n": 0}

    def field(x, sigma):
        calls["n"] += 1
        return x

    errors = {}
    for mode in ("euler", "fireflow"):
        calls["n"] = 0
        path = invert(field, x0, sigmas, InversionConfig(mode))
        errors[mode] = float((path[0] - math.e * x0).abs().max())
        assert calls["n"] == inv.inversion_calls(InversionConfig(mode), 10)
    assert errors["fireflow"] < errors["euler"] / 10


# ------------------------------------------------------------------ the engine follows the picture

def test_renoise_keeps_the_row_on_the_picture_path_and_ends_on_its_latents_exactly(story_pipe, picture):
    """Re-noising along the sampler's sigmas: after every step the identity's row is (1 - s) x0 + s eps (eps its seed
    noise); at the end it is the picture's latents, bit for bit."""
    seen = []

    def record(pipe, step, t, kwargs):
        seen.append(kwargs["latents"][0].clone())
        return {}

    out = story_pipe(IDENTITY, FRAMES, identity_image=picture, inversion="renoise", output_type="latent",
                     callback_on_step_end=record, **KW)
    x0 = _x0(story_pipe, picture)
    assert torch.equal(out.identity, x0[0])
    sched, _ = sampler_schedule(story_pipe.scheduler, KW["num_inference_steps"], x0.shape[1], "cpu")
    noise, _ = story_pipe.prepare_latents(1, 16, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(2025))
    assert len(seen) == KW["num_inference_steps"]
    for k, latents in enumerate(seen):
        sigma = float(sched.sigmas[k + 1])
        torch.testing.assert_close(latents, ((1 - sigma) * x0 + sigma * noise)[0], atol=1e-6, rtol=1e-6)
    assert out.picture["psnr"] is None and out.picture["inversion"] == "renoise"


@pytest.mark.parametrize("mode", ["euler", "fireflow", "rf"])
def test_inverted_path_is_followed_at_every_step(story_pipe, picture, mode, monkeypatch):
    from characonsist import pipeline

    rows, seen = [], []

    def keep(*args, **kwargs):
        rows.append(inv.prepare_picture_row(*args, **kwargs))
        return rows[-1]

    monkeypatch.setattr(pipeline, "prepare_picture_row", keep)
    out = story_pipe(IDENTITY, FRAMES[:1], identity_image=picture, inversion=mode, output_type="latent",
                     callback_on_step_end=lambda p, s, t, k: seen.append(k["latents"][0].clone()) or {}, **KW)
    path = rows[0].path
    assert len(path) == KW["num_inference_steps"] + 1 and torch.equal(out.identity, path[-1][0])
    for k, latents in enumerate(seen):
        torch.testing.assert_close(latents, path[k + 1][0], atol=0, rtol=0)


def test_inversion_of_a_generated_image_round_trips(story_pipe, monkeypatch):
    """A generated image's latents, inverted and regenerated in the batch (``follow="start"``), come back within a
    few percent; FireFlow closer than Euler."""
    kw = {**KW, "num_inference_steps": 12}
    z = story_pipe(IDENTITY, [], method="vanilla", seed=3, output_type="latent", **kw).identity[None]
    monkeypatch.setattr(inv, "encode_picture", lambda pipe, image, device: z.clone())
    errors = {}
    for mode in ("euler", "fireflow"):
        out = story_pipe(IDENTITY, FRAMES[:1], seed=5, identity_image=np.zeros((32, 32, 3), np.uint8),
                         inversion=f"{mode}:follow=start", output_type="latent", **kw)
        errors[mode] = float((out.identity - z[0]).norm() / z.norm())
        start = story_pipe(IDENTITY, FRAMES[:1], seed=5, identity_image=np.zeros((32, 32, 3), np.uint8),
                           inversion=mode, output_type="latent", **kw)
        assert torch.equal(start.identity, z[0])                   # follow="steps" ends on the picture exactly
    assert errors["euler"] < 0.05 and errors["fireflow"] < errors["euler"]


def test_eta_pulls_the_free_row_toward_the_picture(story_pipe, picture):
    """RF-Inversion's reverse controller: eta = 1 on every step is the straight path to the picture (it lands on its
    latents); eta = 0 leaves the model's own steps."""
    x0 = _x0(story_pipe, picture)[0]
    errors = {}
    for eta in (0.0, 0.5, 1.0):
        out = story_pipe(IDENTITY, [], identity_image=picture, inversion=f"euler:follow=start:eta={eta}:eta_end=1",
                         output_type="latent", **KW)
        errors[eta] = float((out.identity - x0).norm() / x0.norm())
    assert errors[1.0] < 1e-5 < errors[0.5] < errors[0.0]


# ------------------------------------------------------------------ methods with a picture

def test_vanilla_frames_do_not_see_the_picture_and_the_identity_is_its_reconstruction(story_pipe, picture):
    plain = story_pipe(IDENTITY, FRAMES, method="vanilla", output_type="np", **KW)
    out = story_pipe(IDENTITY, FRAMES, method="vanilla", identity_image=picture, output_type="np", **KW)
    assert all(np.array_equal(a, b) for a, b in zip(plain.frames, out.frames, strict=True))
    fitted, _ = fit_picture(load_picture(picture), 32, 32)
    decoded = story_pipe(IDENTITY, FRAMES, method="vanilla", identity_image=picture, output_type="latent", **KW)
    assert torch.equal(decoded.identity, _x0(story_pipe, picture)[0])
    assert out.picture["psnr"] == pytest.approx(psnr(out.identity, fitted))
    assert out.picture["fit"].startswith("48x40 downscaled") and out.picture["size"] == [32, 32]
    assert "reconstruction PSNR" in out.notes[0][0] and out.settings["identity_picture"] == out.picture


OFF = effects_off(8)


@pytest.mark.parametrize("method", sorted(OFF))
def test_every_method_switched_off_with_a_picture_gives_plain_frames(story_pipe, picture, method):
    out = story_pipe(IDENTITY, FRAMES, method=method, identity_image=picture, inversion="euler", output_type="np",
                     **OFF[method], **KW)
    plain = story_pipe(IDENTITY, FRAMES, method="vanilla", seed=out.seeds, output_type="np", **KW)
    assert all(np.array_equal(a, b) for a, b in zip(out.frames, plain.frames, strict=True))


@pytest.mark.parametrize("method", sorted(OFF))
def test_every_method_takes_a_picture(story_pipe, picture, method):
    out = story_pipe(IDENTITY, FRAMES, method=method, identity_image=picture, output_type="latent", **KW)
    assert torch.equal(out.identity, _x0(story_pipe, picture)[0])      # the identity stays the picture
    seeds = story_seeds(2025, 3, "shared" if method == "characonsist" else "per_image")
    generated = story_pipe(IDENTITY, FRAMES, method=method, output_type="latent", seed=seeds, **KW)
    assert any(not torch.equal(a, b) for a, b in zip(out.frames, generated.frames, strict=True))   # frames see the picture
    assert all(torch.isfinite(f).all() for f in out.frames)
    if method != "storydiffusion":                                     # masks come from the picture's own row
        assert out.masks[0] is not None and out.masks[0].shape == (8, 8)
    assert "follows its picture at every step" in out.notes[0][1]


def test_chunks_and_another_identity_size(story_pipe, picture):
    from characonsist import StoryImage

    full = story_pipe(IDENTITY, FRAMES, identity_image=picture, inversion="euler", output_type="np", **KW)
    chunked = story_pipe(IDENTITY, FRAMES, identity_image=picture, inversion="euler", batch_size=2,
                         output_type="np", **KW)
    for a, b in zip(full.images, chunked.images, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    wide = StoryImage("in the park", "a red cat", "sitting", height=32, width=48)
    out = story_pipe(wide, FRAMES, identity_image=picture, output_type="np", **KW)
    assert out.identity.shape == (32, 48, 3) and out.picture["size"] == [32, 48]
    assert out.picture["fit"] == "48x40 centre-cropped to 48x32 (20% of it cut)"
    assert any("background not shared" in n for n in out.notes[1])


def test_bad_picture_inputs_are_reported_before_any_work(story_pipe, picture):
    with pytest.raises(InputError) as info:
        story_pipe(IDENTITY, FRAMES, identity_image="nowhere.png", inversion="sideways", **KW)
    text = str(info.value)
    assert "identity_image: nowhere.png: image file not found" in text and "inversion" in text
    with pytest.raises(InputError, match="without an identity_image"):
        story_pipe(IDENTITY, FRAMES, inversion="euler", **KW)


def test_a_real_photograph_through_the_tiny_pipeline(story_pipe):
    """scikit-image's astronaut (a 512x512 photograph shipped in its wheel) as the identity, downscaled to the tiny
    model's size, with the default inversion and with an inversion, through CharaConsist."""
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()
    for inversion in (None, "fireflow"):
        out = story_pipe("in a room#a woman#smiling", ["in a city#a woman#walking"], identity_image=photo,
                         inversion=inversion, output_type="np", **KW)
        assert out.picture["source_size"] == [512, 512] and out.picture["fit"] == "512x512 downscaled to 32x32"
        assert math.isfinite(out.picture["psnr"]) and np.isfinite(out.frames[0]).all()
        assert out.masks[0] is not None


def test_a_job_is_made_from_the_picture_it_planned_and_can_carry_its_bytes(tmp_path):
    """The bytes a group is made from are the bytes its manifest's sha256 names; a worker on another machine gets
    them in the job (Ray), not a path it may not have."""
    from characonsist.app.jobs import Job, picture_of, with_picture_bytes
    from characonsist.picture import file_digest
    from characonsist.story import StoryImage
    from characonsist.storyfile import Group

    path = tmp_path / "me.png"
    Image.new("RGB", (20, 10), (200, 10, 10)).save(path)
    group = Group("g", StoryImage("park", "a cat", "sits"), [StoryImage("park", "a cat", "runs")], [None, None],
                  ["s.txt:1", "s.txt:2"], picture=str(path))
    records = [{"picture": {"path": str(path), "sha256": file_digest(path)}}, {}]
    job = Job(group, "g", records, "hash")
    assert picture_of(job).getpixel((0, 0)) == (200, 10, 10)
    assert describe_source(picture_of(job)) == str(path)      # the notes name the file, not "Image (20, 10)"

    carried = with_picture_bytes(job)
    assert carried.group.picture == path.read_bytes() and job.group.picture == str(path)   # the job is unchanged
    path.unlink()                                   # the worker's machine has no such file: the bytes suffice
    assert picture_of(carried).size == (20, 10)
    with pytest.raises(InputError, match="cannot read it"):
        picture_of(job)

    Image.new("RGB", (20, 10), (10, 10, 200)).save(path)       # edited after the run was planned
    with pytest.raises(InputError, match="changed since the run was planned"):
        picture_of(job)
    assert picture_of(dataclasses.replace(job, group=dataclasses.replace(group, picture=None))) is None
