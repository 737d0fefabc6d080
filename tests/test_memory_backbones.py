"""Memory modes and weight formats on Chroma and FLUX.2 [klein] (tiny random pipelines saved and reloaded, CPU), as
tests/test_memory.py checks them on FLUX.1: ``memory.load_pipeline`` loads the story pipeline and the stock pipeline
(``ChromaPipeline``, ``Flux2KleinPipeline``) the same way (model offload and group offload with their hooks from the
CPU to the CPU; float8 storage; torchao int8 through ``from_pretrained``), and then vanilla and every method switched
off equal the stock pipeline byte for byte, under real classifier-free guidance. Sequential offload is not run here:
accelerate's hooks with the CPU as execution device fail inside T5's and Qwen3's embeddings on FLUX.1 as well."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, StoryImage, memory
from characonsist.methods import method_class
from characonsist.methods.base import story_seeds
from conftest import FRAMES, IDENTITY, effects_off  # the shared story (conftest.py)

KW = {"chroma": dict(height=32, width=32, num_inference_steps=4, max_sequence_length=32, guidance_scale=4.0,
                     output_type="np"),
      "klein": dict(height=32, width=32, num_inference_steps=4, max_sequence_length=64, guidance_scale=4.0,
                    output_type="np")}
OFF = effects_off(4)
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")

LOADS = {   # how both pipelines are loaded (memory.load_pipeline's arguments), and what shows the mode took effect
    "model-offload": dict(memory="model-offload"),
    "group-offload": dict(memory="group-offload"),
    "fp8-storage": dict(quantize="fp8-storage"),
    "int8": dict(quantize="int8"),
}


@pytest.fixture(scope="module", params=["chroma", "klein"])
def folder(request, tmp_path_factory):
    from characonsist.testing import tiny_chroma_pipeline, tiny_klein_pipeline

    path = tmp_path_factory.mktemp("memory_backbones") / request.param
    (tiny_chroma_pipeline if request.param == "chroma" else tiny_klein_pipeline)(seed=3).save_pretrained(path)
    return request.param, path


def _pair(folder, **load):
    from diffusers import ChromaPipeline, Flux2KleinPipeline

    name, path = folder
    stock_class = ChromaPipeline if name == "chroma" else Flux2KleinPipeline
    ours = memory.load_pipeline(CharaConsistPipeline, str(path), torch.float32, **load)
    stock = memory.load_pipeline(stock_class, str(path), torch.float32, **load)
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    assert ours.backbone.name == name and type(stock) is stock_class
    return ours, stock


def _stock(stock, kw, seeds):
    prompts = [StoryImage.coerce(i).prompt for i in (IDENTITY, *FRAMES)]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return stock(prompt=prompts, generator=gens, **kw).images


def _check_every_method(ours, stock, kw):
    """vanilla == the stock pipeline exactly; every method switched off == the stock pipeline from its own noise;
    CharaConsist switched on changes the frames and stays finite."""
    vanilla = ours(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3], **kw)
    assert np.array_equal(np.stack(vanilla.images), _stock(stock, kw, [1, 2, 3]))
    for method, off in OFF.items():
        seeds = story_seeds(2025, 3, method_class(method).seeding)
        out = ours(IDENTITY, FRAMES, method=method, **off, **kw)
        assert out.seeds == seeds
        assert np.array_equal(np.stack(out.images), _stock(stock, kw, seeds)), method
    on = ours(IDENTITY, FRAMES, method="characonsist", **kw)
    assert np.isfinite(np.stack(on.images)).all()
    assert any(np.abs(f - p).max() > 1e-4 for f, p in zip(on.frames, _stock(stock, kw, [2025] * 3)[1:], strict=True))


def _took_effect(mode: str, pipe) -> None:
    if mode == "model-offload":
        assert {type(getattr(pipe, n)._hf_hook).__name__ for n in ("transformer", "text_encoder", "vae")} == \
            {"CpuOffload"}
    elif mode == "group-offload":
        assert any(getattr(m, "_diffusers_hook", None) is not None for m in pipe.transformer.modules())
    elif mode == "fp8-storage":
        for name in ("transformer", "text_encoder"):   # the large text encoder is the only one (T5 / Qwen3)
            assert torch.float8_e4m3fn in {p.dtype for p in getattr(pipe, name).parameters()}, name
    elif mode == "int8":
        from torchao.utils import TorchAOBaseTensor

        for name in ("transformer", "text_encoder"):
            linears = [m for n, m in getattr(pipe, name).named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head"]
            assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears), name


@pytest.mark.parametrize("mode", ["model-offload", "group-offload", pytest.param("fp8-storage", marks=pytest.mark.slow),
                                  pytest.param("int8", marks=[needs_torchao, pytest.mark.slow])])
def test_every_method_off_equals_the_stock_pipeline_loaded_the_same_way(folder, mode):
    ours, stock = _pair(folder, **LOADS[mode])
    _took_effect(mode, ours)
    _took_effect(mode, stock)
    _check_every_method(ours, stock, KW[folder[0]])


def test_fp8_storage_keeps_a_tied_embedding_in_the_compute_dtype(tmp_path):
    """A Qwen3 whose output head shares the token embedding's weight (``tie_word_embeddings``, as the tiny one here):
    float8 storage skips the head (``lm_head``, unused by klein), else the embedding would be stored in float8 too and
    the first norm fails on float8 inputs."""
    from characonsist.testing import tiny_klein_pipeline

    tiny_klein_pipeline(seed=3).save_pretrained(tmp_path)
    pipe = memory.load_pipeline(CharaConsistPipeline, str(tmp_path), torch.float32, quantize="fp8-storage")
    encoder = pipe.text_encoder
    assert encoder.lm_head.weight is encoder.get_input_embeddings().weight
    assert encoder.get_input_embeddings().weight.dtype == torch.float32
    assert encoder.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    text = pipe.backbone.encode(pipe, ["park a cat sitting"], 64, "cpu", 1.0)
    assert torch.isfinite(text.embeds).all()


@pytest.mark.slow
def test_a_picture_identity_under_model_offload(folder):
    """The picture's encoding and inversion run through the offload hooks (the VAE and the text encoder are moved in
    when called): the same identity and frames as without offload."""
    rng = np.random.default_rng(0)
    picture = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    kw = KW[folder[0]]
    plain, _ = _pair(folder)
    offloaded, _ = _pair(folder, **LOADS["model-offload"])
    plain.vae.enable_slicing()     # as every offload mode decodes (one image at a time: 1e-6 from a batched decode)
    a = plain(IDENTITY, FRAMES[:1], identity_image=picture, inversion="euler", **kw)
    b = offloaded(IDENTITY, FRAMES[:1], identity_image=picture, inversion="euler", **kw)
    if folder[0] == "chroma":
        assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    else:   # the stock Flux2KleinPipeline itself, one image a call (as the inversion runs), differs by 2e-6 between
        # model offload and none on the CPU (0 with two images a call): the inverted path and the frame by 5e-7
        for x, y in zip(a.images, b.images, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        assert np.array_equal(a.identity, b.identity)
