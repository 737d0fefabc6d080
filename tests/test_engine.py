"""The engine end to end on tiny random FLUX pipelines (CPU)."""

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, StoryImage
from characonsist.methods import characonsist as cc_module
from conftest import IDENTITY  # the shared story (conftest.py)

KW = dict(height=32, width=32, num_inference_steps=12, max_sequence_length=32, output_type="np")

FRAMES = ["in the park#a red cat#running", "on a beach#a red cat#jumping", "in the park#a red cat#sleeping"]


def _plain(tiny_pipe, images, seeds, **kw):
    prompts = [StoryImage.coerce(i).prompt for i in images]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return tiny_pipe(prompts, generator=gens, guidance_scale=3.5, **kw).images


def test_vanilla_equals_flux_pipeline_exactly(story_pipe, tiny_pipe):
    out = story_pipe(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3, 4], **KW)
    ref = _plain(tiny_pipe, [IDENTITY, *FRAMES], [1, 2, 3, 4], **KW)
    assert np.array_equal(np.stack(out.images), ref)
    assert out.seeds == [1, 2, 3, 4]


def test_one_seed_follows_the_methods_official_convention(story_pipe):
    from characonsist.methods.base import story_seeds

    kw = {**KW, "num_inference_steps": 1}
    shared = story_pipe(IDENTITY, FRAMES, method="vanilla", seed=7, **kw)
    assert shared.seeds == [7] * 4 and shared.settings["seeding"] == "shared"
    peer = story_pipe(IDENTITY, FRAMES, method="storydiffusion", seed=7, **kw)     # official: one noise per image
    assert peer.seeds == story_seeds(7, 4, "per_image") and peer.seeds[0] == 7 and len(set(peer.seeds)) == 4
    assert peer.settings["seeding"] == "per_image"
    given = story_pipe(IDENTITY, FRAMES, method="storydiffusion", seed=[7] * 4, **kw)   # a list is used as given
    assert given.seeds == [7] * 4 and given.settings["seeding"] == "given"
    assert story_seeds(7, 3, "shared") == [7] * 3
    with pytest.raises(ValueError, match="seeding"):
        story_seeds(7, 3, "random")


def test_characonsist_switched_off_equals_flux_pipeline(story_pipe, tiny_pipe):
    off = dict(share_start=KW["num_inference_steps"], schedule_steps=None, use_token_merge=False)   # never shares
    out = story_pipe(IDENTITY, FRAMES, method="characonsist", **off, **KW)
    ref = _plain(tiny_pipe, [IDENTITY, *FRAMES], [2025] * 4, **KW)
    assert np.array_equal(np.stack(out.images), ref)


def test_characonsist_changes_frames_but_never_the_identity(story_pipe, tiny_pipe):
    out = story_pipe(IDENTITY, FRAMES, **KW)
    ref = _plain(tiny_pipe, [IDENTITY, *FRAMES], [2025] * 4, **KW)
    assert np.array_equal(out.identity, ref[0])
    assert any(np.abs(f - r).max() > 1e-4 for f, r in zip(out.frames, ref[1:], strict=True))
    alone = story_pipe(IDENTITY, [], **KW)
    np.testing.assert_allclose(alone.identity, out.identity, atol=1e-5)
    assert out.method == "characonsist" and out.settings["method_options"]["share_bg"] is True
    assert [m.shape for m in out.masks] == [(8, 8)] * 4     # tiny VAE: 2x down, 2x2 packing
    assert len(out.matches) == 3


def test_same_call_twice_is_identical(story_pipe):
    a = story_pipe(IDENTITY, FRAMES[:2], **KW)
    b = story_pipe(IDENTITY, FRAMES[:2], **KW)
    for x, y in zip(a.images, b.images, strict=True):
        assert np.array_equal(x, y)
    assert a.notes == b.notes


def test_chunks_give_the_same_frames(story_pipe):
    full = story_pipe(IDENTITY, FRAMES, **KW)
    chunked = story_pipe(IDENTITY, FRAMES, batch_size=2, **KW)
    for x, y in zip(full.images, chunked.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_mixed_scenes_take_background_from_the_scene_anchor(story_pipe):
    frames = ["on a beach#a red cat#running", "on a beach#a red cat#jumping", "in the park#a red cat#waving"]
    method = cc_module.CharaConsist()
    images = [StoryImage.parse(p) for p in [IDENTITY, *frames]]
    assert method.dependencies(images, 2) == {1} and method.dependencies(images, 3) == set()
    assert CharaConsistPipeline._chunks(images, method, 2) == [[0, 1], [0, 1, 2], [0, 3]]
    full = story_pipe(IDENTITY, frames, **KW)
    chunked = story_pipe(IDENTITY, frames, batch_size=2, **KW)
    for x, y in zip(full.images, chunked.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_frames_of_another_size(story_pipe):
    frames = [StoryImage("in the park", "a red cat", "running", height=48, width=80), FRAMES[1]]
    out = story_pipe(IDENTITY, frames, **KW)
    assert out.frames[0].shape == (48, 80, 3) and out.frames[1].shape == (32, 32, 3)
    assert out.masks[1].shape == (12, 20)
    assert any("background not shared" in n for n in out.notes[1])
    vanilla = story_pipe(IDENTITY, frames, method="vanilla", **KW)
    assert np.array_equal(vanilla.identity, out.identity)


def test_no_match_above_threshold_falls_back(story_pipe):
    out = story_pipe(IDENTITY, FRAMES[:1], sim_threshold=1.0, share_bg=False, use_token_merge=False, **KW)
    assert any("no match above" in n for n in out.notes[1]) or any("mask empty" in n for n in out.notes[1])
    assert len(out.matches[0]) == 0
    plain = story_pipe(IDENTITY, FRAMES[:1], method="vanilla", **KW)
    assert np.array_equal(out.frames[0], plain.frames[0])      # nothing shared: plain attention


def test_empty_and_full_masks_run_to_the_end(story_pipe, monkeypatch):
    monkeypatch.setattr(cc_module, "foreground_mask", lambda bg, fg, grid, *a: torch.zeros(bg.numel(), dtype=bool))
    empty = story_pipe(IDENTITY, FRAMES[:2], **KW)
    assert all(any("mask empty" in n for n in notes) for notes in empty.notes[1:])
    assert all(len(m) == 0 for m in empty.matches)
    assert all(np.isfinite(f).all() for f in empty.frames)
    monkeypatch.setattr(cc_module, "foreground_mask", lambda bg, fg, grid, *a: torch.ones(bg.numel(), dtype=bool))
    full = story_pipe(IDENTITY, FRAMES[:2], **KW)
    assert all(m.all() for m in full.masks)
    assert all(np.isfinite(f).all() for f in full.frames)


def test_single_match(story_pipe, monkeypatch):
    real = cc_module.match_points

    def one(*args):
        m = real(*args)
        return type(m)(m.frame_idx[:1], m.id_idx[:1], m.sim[:1])

    monkeypatch.setattr(cc_module, "match_points", one)
    out = story_pipe(IDENTITY, FRAMES[:1], use_mask=False, sim_threshold=-1.0, **KW)
    assert len(out.matches[0]) == 1
    assert np.isfinite(out.frames[0]).all()


def test_bad_input_is_reported(story_pipe):
    with pytest.raises(ValueError, match="valid methods"):
        story_pipe(IDENTITY, FRAMES, method="nope", **KW)
    with pytest.raises(ValueError, match="valid options"):
        story_pipe(IDENTITY, FRAMES, share_background=True, **KW)
    with pytest.raises(ValueError, match="exactly two"):
        story_pipe("park#cat", FRAMES, **KW)
    with pytest.raises(ValueError, match="multiple of"):
        story_pipe(IDENTITY, FRAMES, **{**KW, "height": 62})
    with pytest.raises(ValueError, match="T5 tokens"):
        story_pipe(IDENTITY + " and" * 40, FRAMES, **KW)


def test_callback_and_progress(story_pipe):
    seen = []

    def cb(pipe, step, t, kwargs):
        seen.append(step)
        return {}

    story_pipe(IDENTITY, FRAMES[:1], callback_on_step_end=cb, **KW)
    assert seen == list(range(KW["num_inference_steps"]))


def test_processors_are_restored(story_pipe):
    before = {k: type(v) for k, v in story_pipe.transformer.attn_processors.items()}
    story_pipe(IDENTITY, FRAMES[:1], **KW)
    assert {k: type(v) for k, v in story_pipe.transformer.attn_processors.items()} == before


def test_save_and_load_round_trip(tiny_pipe, story_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = CharaConsistPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    a = loaded(IDENTITY, FRAMES[:2], **KW)
    b = story_pipe(IDENTITY, FRAMES[:2], **KW)
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_vanilla_twins_reproduce_plain_flux(story_pipe):
    from characonsist.methods.base import Vanilla

    class Twins(Vanilla):
        seen_rows: list = []

        def twin_steps(self, phase):
            return 5

        def attention(self, call):
            self.seen_rows.append(call.query.shape[0])
            return call.plain()

    method = Twins()
    out = story_pipe(IDENTITY, FRAMES[:2], method=method, **KW)
    ref = story_pipe(IDENTITY, FRAMES[:2], method="vanilla", **KW)
    for x, y in zip(out.images, ref.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert 6 in method.seen_rows and 3 in method.seen_rows     # twins ran, then were dropped


@pytest.mark.parametrize("follow", [False, True])
def test_twins_follow_the_images_latents(story_pipe, follow):
    """Following twins are a plain forward on the images' *current* latents (ConsiStory's vanilla query pass): at the
    first layer their queries equal the images' at every step; free twins drift apart once the images change."""
    from characonsist.methods.base import Vanilla

    class Drift(Vanilla):
        def __init__(self):
            super().__init__()
            self.same: list[bool] = []

        def twin_steps(self, phase):
            return 4

        def twins_follow(self, phase):
            return follow

        def attention(self, call):
            out = call.plain()
            n = len(call.run.group.slots)
            if call.run.group.twins:
                if call.kind == "double" and call.block == 0:
                    self.same.append(torch.equal(call.query[:n], call.query[n:2 * n]))
                out[:n] = out[:n] * 1.5          # the images leave the plain trajectory, the twins stay plain
            return out

    method = Drift()
    out = story_pipe(IDENTITY, FRAMES[:1], method=method, **KW)
    assert np.isfinite(np.stack(out.images)).all() and len(method.same) == 4
    assert method.same[0]                                        # step 0: the same noise either way
    assert all(method.same) if follow else not any(method.same[1:])


def test_from_pipe_keeps_the_dtype():
    from characonsist.testing import tiny_flux_pipeline

    base = tiny_flux_pipeline(dtype=torch.bfloat16)
    pipe = CharaConsistPipeline.from_pipe(base)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.transformer is base.transformer


def test_main_run_takes_step0_over_from_the_prerun_bit_exactly(story_pipe):
    from characonsist.methods import get_method

    phases = get_method("characonsist").phases(KW["num_inference_steps"])
    assert [(p.name, p.start) for p in phases] == [("prerun", 0), ("main", 1)]
    assert get_method("characonsist", reuse_prerun_step0=False).phases(12)[1].start == 0
    assert get_method("characonsist", share_start=0, schedule_steps=None).phases(12)[1].start == 0
    forwards = []
    hook = story_pipe.transformer.register_forward_hook(lambda *a: forwards.append(1))
    try:
        reused = story_pipe(IDENTITY, FRAMES, **KW)
        n_reused = len(forwards)
        full = story_pipe(IDENTITY, FRAMES, reuse_prerun_step0=False, **KW)
    finally:
        hook.remove()
    assert n_reused == len(forwards) - n_reused - 1      # one forward of the chunk fewer
    for x, y in zip(reused.images, full.images, strict=True):
        assert np.array_equal(x, y)
    for x, y in zip(reused.masks, full.masks, strict=True):
        assert np.array_equal(x, y)
    for x, y in zip(reused.matches, full.matches, strict=True):
        assert torch.equal(x.frame_idx, y.frame_idx) and torch.equal(x.id_idx, y.id_idx)


def test_a_one_step_prerun_is_not_taken_over(story_pipe):
    """When the effective mask step is 0 (``mask_step=1`` rescaled to 3 steps), the pre-run is one step that stops
    at its prediction: the main run must not start from its unstepped latents (it did: images differed)."""
    from characonsist.methods import get_method
    from characonsist.methods.characonsist import step_schedule

    method = get_method("characonsist", mask_step=1)
    assert step_schedule(method.config, 3)["mask_step"] == 0
    assert [(p.name, p.steps, p.start) for p in method.phases(3)] == [("prerun", 1, 0), ("main", 3, 0)]
    kw = {**KW, "num_inference_steps": 3, "mask_step": 1}
    reused = story_pipe(IDENTITY, FRAMES[:1], **kw)
    full = story_pipe(IDENTITY, FRAMES[:1], reuse_prerun_step0=False, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(reused.images, full.images, strict=True))


def test_volatile_backend_option_is_checked(story_pipe):
    with pytest.raises(ValueError, match="volatile_backend"):
        story_pipe(IDENTITY, FRAMES[:1], volatile_backend="fast", **KW)
    a = story_pipe(IDENTITY, FRAMES[:1], **KW)
    b = story_pipe(IDENTITY, FRAMES[:1], volatile_backend="default", **KW)   # on the CPU: same kernels
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
