"""A picture as the identity on Chroma and FLUX.2 [klein] (tiny random pipelines saved and reloaded, CPU), as
tests/test_picture.py checks it on FLUX.1: the picture's latents are the backbone's own encoding, the identity's row
follows the picture along the backbone's schedule at every step and ends on it, the inversion round-trips a
generated image, and the frames see the picture (every method switched off: the frames stay plain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline
from characonsist import inversion as inv
from characonsist.inversion import encode_picture
from characonsist.picture import fit_picture, load_picture
from conftest import FRAMES, IDENTITY, effects_off  # the shared story (conftest.py)

# Chroma and base klein with real classifier-free guidance (the inversion's negative pass runs too); klein's chat
# template needs 64 text tokens
KW = {"chroma": dict(height=32, width=32, num_inference_steps=6, max_sequence_length=32, guidance_scale=4.0),
      "klein": dict(height=32, width=32, num_inference_steps=6, max_sequence_length=64, guidance_scale=4.0)}


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return (rng.random((40, 48, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=["chroma", "klein"])
def pipe(request, tmp_path_factory):
    from characonsist.testing import tiny_chroma_pipeline, tiny_klein_pipeline

    folder = tmp_path_factory.mktemp("picture_backbones") / request.param
    (tiny_chroma_pipeline if request.param == "chroma" else tiny_klein_pipeline)().save_pretrained(folder)
    story = CharaConsistPipeline.from_pretrained(folder)
    story.set_progress_bar_config(disable=True)
    story.kw = KW[request.param]
    assert story.backbone.name == request.param and story.backbone.supports_picture()
    return story


def _x0(pipe, image):
    fitted, _ = fit_picture(load_picture(image), 32, 32)
    return encode_picture(pipe, fitted, "cpu")


def _final(pipe, packed):
    """What ``output_type="latent"`` gives for packed latents (FLUX.1 / Chroma: the packed tokens; klein: the VAE's
    latents, de-normalised and unpatched)."""
    return pipe.backbone.decode(pipe, packed, 32, 32, "latent")[0]


def test_the_pictures_latents_are_what_decoding_reads_back(pipe, picture):
    """``encode_picture`` is the inverse of the backbone's latent handling in ``decode``: undone, it gives the VAE's
    own posterior mode (klein: batch-norm statistics and 2x2 patches; Chroma: FLUX's shift, scale and packing)."""
    fitted, _ = fit_picture(load_picture(picture), 32, 32)
    x0 = encode_picture(pipe, fitted, "cpu")
    assert x0.dtype == torch.float32 and x0.shape[:2] == (1, 16 * 16 // 4)
    mode = pipe.vae.encode(pipe.image_processor.preprocess(fitted, height=32, width=32)).latent_dist.mode()
    if pipe.backbone.name == "klein":
        back = _final(pipe, x0)
    else:
        back = pipe._unpack_latents(x0, 32, 32, pipe.vae_scale_factor)[0]
        back = back / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    torch.testing.assert_close(back, mode[0], atol=1e-5, rtol=1e-5)


def test_renoise_keeps_the_row_on_the_picture_path_along_the_backbones_schedule(pipe, picture):
    seen = []
    out = pipe(IDENTITY, FRAMES, identity_image=picture, inversion="renoise", output_type="latent",
               callback_on_step_end=lambda p, s, t, k: seen.append(k["latents"][0].clone()) or {}, **pipe.kw)
    x0 = _x0(pipe, picture)
    assert torch.equal(out.identity, _final(pipe, x0))
    sched, _ = pipe.backbone.schedule(pipe.scheduler, 6, x0.shape[1], "cpu")
    noise, _ = pipe.backbone.latents(pipe, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(2025))
    assert len(seen) == 6
    for k, latents in enumerate(seen):
        sigma = float(sched.sigmas[k + 1])
        torch.testing.assert_close(latents, ((1 - sigma) * x0 + sigma * noise)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["euler", "fireflow"])
def test_inverted_path_is_followed_at_every_step(pipe, picture, mode, monkeypatch):
    from characonsist import pipeline

    rows, seen, calls = [], [], []
    forward = pipe.transformer.forward

    def count(*args, **kwargs):
        calls.append(kwargs["hidden_states"].shape[0])
        return forward(*args, **kwargs)

    def keep(*args, **kwargs):
        rows.append(inv.prepare_picture_row(*args, **kwargs))
        return rows[-1]

    monkeypatch.setattr(pipeline, "prepare_picture_row", keep)
    monkeypatch.setattr(pipe.transformer, "forward", count)
    out = pipe(IDENTITY, FRAMES[:1], method="vanilla", identity_image=picture, inversion=mode, output_type="latent",
               callback_on_step_end=lambda p, s, t, k: seen.append(k["latents"][0].clone()) or {}, **pipe.kw)
    path = rows[0].path
    assert len(path) == 7 and torch.equal(out.identity, _final(pipe, path[-1]))
    for k, latents in enumerate(seen):
        torch.testing.assert_close(latents, path[k + 1][0], atol=0, rtol=0)
    # the inversion ran one image at a time, with the negative pass of real guidance: 2 calls per model call
    inversion = calls[:2 * inv.inversion_calls(inv.InversionConfig(mode), 6)]
    assert inversion == [1] * len(inversion) and calls[len(inversion)] == 2
    assert len(calls) == len(inversion) + 2 * 6
    assert not torch.equal(path[0], rows[0].noise)          # a model inversion, not the re-noised picture


def test_inversion_of_a_generated_image_round_trips(pipe, monkeypatch):
    """A generated image's packed latents, inverted and regenerated in the batch (``follow="start"``) with the run's
    guidance, come back within a few percent (Euler at 12 steps: Chroma 3.0%, klein 4.9%; FireFlow 2.5%, 2.8%);
    ``follow="steps"`` ends on them exactly."""
    kw = {**pipe.kw, "num_inference_steps": 12}
    last = []
    pipe(IDENTITY, [], method="vanilla", seed=3, output_type="latent",
         callback_on_step_end=lambda p, s, t, k: last.append(k["latents"].clone()) or {}, **kw)
    z = last[-1]
    monkeypatch.setattr(inv, "encode_picture", lambda pipe, image, device: z.clone())
    blank = np.zeros((32, 32, 3), np.uint8)
    errors = {}
    for mode in ("euler", "fireflow"):
        got = []
        out = pipe(IDENTITY, FRAMES[:1], seed=5, identity_image=blank, inversion=f"{mode}:follow=start",
                   output_type="latent", **kw,
                   callback_on_step_end=lambda p, s, t, k: got.append(k["latents"][0].clone()) or {})  # noqa: B023
        errors[mode] = float((got[-1] - z[0]).norm() / z.norm())
    assert errors["euler"] < 0.1 and errors["fireflow"] < errors["euler"], errors
    start = pipe(IDENTITY, FRAMES[:1], seed=5, identity_image=blank, inversion="euler", output_type="latent", **kw)
    assert torch.equal(start.identity, _final(pipe, z))
    assert not torch.equal(out.identity, start.identity)


OFF = effects_off(6)


@pytest.mark.parametrize("method", ["characonsist", "consistory"])
def test_a_method_switched_off_with_a_picture_gives_plain_frames(pipe, picture, method):
    out = pipe(IDENTITY, FRAMES, method=method, identity_image=picture, inversion="euler", output_type="np",
               **OFF[method], **pipe.kw)
    plain = pipe(IDENTITY, FRAMES, method="vanilla", seed=out.seeds, output_type="np", **pipe.kw)
    assert all(np.array_equal(a, b) for a, b in zip(out.frames, plain.frames, strict=True))
    assert not np.array_equal(out.identity, plain.identity)
    assert "reconstruction PSNR" in out.notes[0][0] and np.isfinite(out.picture["psnr"])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(OFF))
def test_every_method_takes_a_picture(pipe, picture, method):
    """The identity stays the picture, the frames see it (they differ from the story made without it), masks come
    from the picture's own row."""
    out = pipe(IDENTITY, FRAMES, method=method, identity_image=picture, output_type="latent", **pipe.kw)
    assert torch.equal(out.identity, _final(pipe, _x0(pipe, picture)))
    generated = pipe(IDENTITY, FRAMES, method=method, output_type="latent", seed=out.seeds, **pipe.kw)
    assert any(not torch.equal(a, b) for a, b in zip(out.frames, generated.frames, strict=True))
    assert all(torch.isfinite(f).all() for f in out.frames)
    if method != "storydiffusion":
        assert out.masks[0] is not None and out.masks[0].shape == (8, 8)
    assert "follows its picture at every step" in out.notes[0][1]


def test_a_backbone_without_a_picture_encoding_is_refused_in_one_line(pipe, monkeypatch, picture):
    from characonsist.inputs import InputError

    monkeypatch.setattr(type(pipe.backbone), "supports_picture", lambda self: False)
    with pytest.raises(InputError, match=f"identity_image: a picture as the identity is not available on "
                                         f"{pipe.backbone.name} .*; leave it out"):
        pipe(IDENTITY, FRAMES, identity_image=picture, **pipe.kw)
