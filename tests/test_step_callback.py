"""``callback_on_step_end`` as diffusers' FluxPipeline calls it, over the lockstep batch: once per denoising step of
the main run, ``latents`` the packed latents of every image (identity first), ``x0`` / ``noise_pred`` read-only,
``pipe.step_batch`` naming the rows; a callback that only reads never changes an image (every method, and CharaConsist
switched off still equals plain FLUX)."""

import numpy as np
import pytest
import torch

from characonsist import StoryImage
from conftest import FRAMES, IDENTITY, KW  # the shared story (conftest.py)

TENSORS = ["latents", "x0", "noise_pred"]


def _reader(seen):
    def callback(pipe, step, timestep, kwargs):
        batch = pipe.step_batch
        seen.append({"step": step, "t": float(timestep), "batch": batch,
                     **{k: None if v is None else v.clone() for k, v in kwargs.items()}})
        return kwargs             # diffusers' usual pattern: hand the inputs back unchanged
    return callback


@pytest.mark.parametrize("method", ["vanilla", "characonsist", "consistory", "storysync", "storydiffusion"])
def test_a_reading_callback_changes_no_image(story_pipe, method):
    plain = story_pipe(IDENTITY, FRAMES, method=method, **KW)
    seen = []
    read = story_pipe(IDENTITY, FRAMES, method=method, callback_on_step_end=_reader(seen),
                      callback_on_step_end_tensor_inputs=TENSORS, **KW)
    for a, b in zip(plain.images, read.images, strict=True):
        assert a.tobytes() == b.tobytes()
    assert [s["step"] for s in seen] == list(range(KW["num_inference_steps"]))   # once per step, step 0 included
    channels = story_pipe.transformer.config.in_channels
    tokens = (32 // story_pipe.vae_scale_factor // 2) ** 2
    for s in seen:
        assert s["latents"].shape == s["x0"].shape == (3, tokens, channels)     # every image, packed
        assert s["batch"].images == (0, 1, 2) and (s["batch"].height, s["batch"].width) == (32, 32)
        assert s["batch"].step == s["step"] and s["batch"].steps == KW["num_inference_steps"]
    assert story_pipe.step_batch is None                                        # only during a call
    assert seen[-1]["batch"].sigma == 0.0
    torch.testing.assert_close(seen[-1]["x0"], seen[-1]["latents"])            # sigma 0: x0 is the latents
    for s in seen:
        if s["noise_pred"] is not None:   # x0 = latents - sigma_next * v
            torch.testing.assert_close(s["x0"], s["latents"] - s["batch"].sigma * s["noise_pred"])
    if method == "characonsist":      # step 0 is taken over from the layout pre-run: its x0 was kept, no velocity
        assert seen[0]["noise_pred"] is None and seen[0]["x0"] is not None
    else:
        assert all(s["noise_pred"] is not None for s in seen)
    # the x0 estimates approach the final latents
    final = seen[-1]["latents"]
    errors = [float((s["x0"] - final).abs().mean()) for s in seen]
    assert errors[-1] == 0 and errors[1] < errors[0] * 1.01 and errors[-2] < errors[1]


def test_latents_it_returns_still_replace_the_batchs(story_pipe):
    def zero(pipe, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == KW["num_inference_steps"] - 1 else {}

    out = story_pipe(IDENTITY, FRAMES, method="vanilla", callback_on_step_end=zero, **{**KW, "output_type": "latent"})
    assert all(float(im.abs().max()) == 0 for im in out.images)


def test_images_of_other_sizes_come_in_their_own_call(story_pipe):
    seen = []
    wide = StoryImage("on a beach", "a red cat", "jumping", height=32, width=48)
    story_pipe(IDENTITY, [FRAMES[0], wide], method="vanilla", callback_on_step_end=_reader(seen),
               callback_on_step_end_tensor_inputs=["x0"], **KW)
    assert [s["step"] for s in seen] == [k for k in range(KW["num_inference_steps"]) for _ in range(2)]
    assert [s["batch"].images for s in seen[:2]] == [(0, 1), (2,)]
    cell = story_pipe.vae_scale_factor * 2                   # pixels per packed token
    assert seen[1]["batch"].width == 48 and seen[1]["x0"].shape[:2] == (1, (32 // cell) * (48 // cell))


def test_unknown_tensor_inputs_are_refused(story_pipe):
    with pytest.raises(ValueError, match="'prompt_embeds' not available; valid: 'latents', 'x0', 'noise_pred'"):
        story_pipe(IDENTITY, FRAMES, callback_on_step_end=lambda *a: {},
                   callback_on_step_end_tensor_inputs=["prompt_embeds"], **KW)


def test_switched_off_with_a_reading_callback_still_equals_flux(story_pipe, tiny_pipe):
    steps = KW["num_inference_steps"]
    off = dict(share_start=steps, schedule_steps=None, use_token_merge=False)      # CharaConsist never shares
    out = story_pipe(IDENTITY, FRAMES, method="characonsist", callback_on_step_end=_reader([]),
                     callback_on_step_end_tensor_inputs=TENSORS, **off, **KW)
    prompts = [StoryImage.coerce(i).prompt for i in [IDENTITY, *FRAMES]]
    gens = [torch.Generator("cpu").manual_seed(2025) for _ in prompts]
    ref = tiny_pipe(prompts, generator=gens, guidance_scale=3.5, **KW).images
    assert np.array_equal(np.stack(out.images), ref)
