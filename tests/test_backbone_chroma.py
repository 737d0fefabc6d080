"""Chroma as a backbone (``characonsist.backbones.chroma``): a tiny random ChromaPipeline saved and reloaded, every
method with its effect off equal to the stock ChromaPipeline byte for byte, as on FLUX.1 (tests/test_engine.py)."""

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, StoryImage
from conftest import FRAMES, IDENTITY, KW, effects_off  # the shared story (conftest.py)

OFF = {"vanilla": {}, **effects_off(KW["num_inference_steps"])}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    """(story pipeline loaded from a saved folder by CharaConsistPipeline, the stock ChromaPipeline of it)."""
    from diffusers import ChromaPipeline

    from characonsist.testing import tiny_chroma_pipeline

    folder = tmp_path_factory.mktemp("tiny_chroma")
    tiny_chroma_pipeline().save_pretrained(folder)
    story = CharaConsistPipeline.from_pretrained(folder)
    stock = ChromaPipeline.from_pretrained(folder, dtype=torch.float32)
    for pipe in (story, stock):
        pipe.set_progress_bar_config(disable=True)
    return story, stock


def _stock(stock, images, seeds, guidance_scale):
    prompts = [StoryImage.coerce(i).prompt for i in images]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return stock(prompts, generator=gens, guidance_scale=guidance_scale, **KW).images


def test_backbone_is_found_from_the_transformer_class(chroma):
    from characonsist import ChromaStoryPipeline
    from characonsist.backbones import backbone_of

    story, stock = chroma
    assert isinstance(story, ChromaStoryPipeline) and backbone_of(story).name == "chroma"
    assert type(CharaConsistPipeline.from_pipe(stock)) is ChromaStoryPipeline
    assert story.prompt_tokenizer is story.tokenizer
    assert story.story_defaults()["num_inference_steps"] == 35 and story.story_defaults()["guidance_scale"] == 5.0


@pytest.mark.parametrize("guidance", [4.0, 1.0])   # with the negative pass (CFG) and without it
def test_vanilla_equals_chroma_pipeline_exactly(chroma, guidance):
    story, stock = chroma
    out = story(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3], guidance_scale=guidance, **KW)
    assert np.array_equal(np.stack(out.images), _stock(stock, [IDENTITY, *FRAMES], [1, 2, 3], guidance))


@pytest.mark.parametrize("method", ["characonsist", "consistory", "storysync", "storydiffusion"])
def test_every_method_switched_off_equals_chroma_pipeline(chroma, method):
    story, stock = chroma
    out = story(IDENTITY, FRAMES, method=method, guidance_scale=4.0, **OFF[method], **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], out.seeds, 4.0)
    assert np.array_equal(np.stack(out.images), ref)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["characonsist", "consistory", "storysync", "storydiffusion"])
def test_every_method_acts_on_chroma(chroma, method):
    story, stock = chroma
    out = story(IDENTITY, FRAMES, method=method, guidance_scale=4.0, **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], out.seeds, 4.0)
    assert all(np.isfinite(x).all() for x in out.images)
    assert any(np.abs(f - r).max() > 1e-4 for f, r in zip(out.frames, ref[1:], strict=True))


def test_characonsist_leaves_the_identity_as_chroma_draws_it(chroma):
    """The lockstep batch: the identity's row attends plainly (with Chroma's text mask) next to sharing frames."""
    story, stock = chroma
    out = story(IDENTITY, FRAMES, guidance_scale=4.0, **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], [2025] * 3, 4.0)
    assert np.array_equal(out.identity, ref[0])
    assert [m.shape for m in out.masks] == [(8, 8)] * 3


def test_shared_attention_keeps_chromas_text_mask(chroma):
    """A frame's own keys keep the model's mask in shared attention (AttnCall.bias): the bias of a row equals the
    stock mask's on the own keys, and shared keys count as unmasked image tokens."""
    from characonsist.engine import AttnCall, Run

    B, S, H, D = 2, 6, 1, 4
    m = torch.tensor([[1.0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1]])
    stock_mask = (m[:, None, None, :] * m[:, None, :, None])
    q = torch.randn(B, S, H, D)
    call = AttnCall("single", 0, q, q, q, (torch.ones(S, D), torch.zeros(S, D)), 3,
                    Run([], [], 3, 1, 1, 1), attn_mask=stock_mask)
    bias = call.bias(1, torch.arange(S), S + 2)
    assert torch.equal(bias[0, 0, :, :S], stock_mask[1, 0]) and torch.equal(bias[0, 0, :, S:], m[1][:, None].expand(S, 2))
    assert torch.equal(call.own(slice(1, 2)), call.attend(q[1:2], q[1:2], q[1:2], bias=stock_mask[1:2]))


@pytest.mark.slow
def test_cli_generates_a_story_with_a_chroma_folder(tmp_path):
    """``--model FOLDER`` of a saved ChromaPipeline: the defaults are Chroma's, the images its story pipeline's."""
    import json

    from characonsist import cli
    from characonsist.inputs import model_defaults
    from characonsist.testing import tiny_chroma_pipeline

    folder = tmp_path / "chroma"
    tiny_chroma_pipeline().save_pretrained(folder)
    assert model_defaults(folder)["num_inference_steps"] == 35
    story = tmp_path / "story.txt"
    story.write_text("park#a cat#sitting\npark#a cat#running\n")
    assert cli.main(["generate", str(story), "--model", str(folder), "--out", str(tmp_path / "out"), "--height", "32",
                     "--width", "32", "--steps", "2", "--max-sequence-length", "32", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["guidance_scale"] == 5.0
    assert len(list((tmp_path / "out").rglob("*.png"))) >= 2


@pytest.mark.slow
def test_backbone_bench_runs_tiny_on_the_cpu(tmp_path):
    """bench/backbone_bench.py (the GPU figures' command, BENCHMARKS.md) parses its arguments and runs at toy widths."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import backbone_bench

    assert backbone_bench.parse(["--backbone", "chroma"]).frames == 4
    result = backbone_bench.main(["--tiny", "--frames", "1", "--steps", "2", "--out", str(tmp_path)])
    assert result["backbone"] == "chroma" and result["ours_s"] > 0 and result["stock_s"] > 0
    assert (tmp_path / "backbone_chroma_tiny.json").is_file()


def test_an_unsupported_transformer_class_is_one_line(tmp_path):
    from characonsist.inputs import InputError

    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline", "transformer": '
                                               '["diffusers", "QwenImageTransformer2DModel"]}')
    with pytest.raises(InputError, match="QwenImageTransformer2DModel, not a supported backbone"):
        CharaConsistPipeline.from_pretrained(tmp_path)
