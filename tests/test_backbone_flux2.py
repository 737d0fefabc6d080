"""FLUX.2 [klein] as a backbone (``characonsist.backbones.klein``): a tiny random Flux2KleinPipeline saved and reloaded,
every method with its effect off equal to the stock Flux2KleinPipeline byte for byte, as on FLUX.1 and Chroma."""

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, StoryImage
from conftest import FRAMES, IDENTITY, effects_off  # the shared story (conftest.py)

# klein wraps each prompt in Qwen3's chat template (about 20 tokens of the tiny tokenizer): 64 text tokens
KW = dict(height=32, width=32, num_inference_steps=6, max_sequence_length=64, output_type="np")
OFF = {"vanilla": {}, **effects_off(KW["num_inference_steps"])}


def _load(folder):
    from diffusers import Flux2KleinPipeline

    story = CharaConsistPipeline.from_pretrained(folder)
    stock = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
    for pipe in (story, stock):
        pipe.set_progress_bar_config(disable=True)
    return story, stock


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(story pipeline loaded from a saved folder by CharaConsistPipeline, the stock Flux2KleinPipeline of it): the
    base kind (``is_distilled`` false: real classifier-free guidance)."""
    from characonsist.testing import tiny_klein_pipeline

    folder = tmp_path_factory.mktemp("tiny_klein")
    tiny_klein_pipeline().save_pretrained(folder)
    return _load(folder)


def _stock(stock, images, seeds, guidance_scale, **kw):
    prompts = [StoryImage.coerce(i).prompt for i in images]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return stock(prompt=prompts, generator=gens, guidance_scale=guidance_scale, **{**KW, **kw}).images


def test_backbone_is_found_from_the_transformer_class(klein):
    from characonsist import Flux2KleinStoryPipeline
    from characonsist.backbones import backbone_of

    story, stock = klein
    assert isinstance(story, Flux2KleinStoryPipeline) and backbone_of(story).name == "klein"
    assert type(CharaConsistPipeline.from_pipe(stock)) is Flux2KleinStoryPipeline
    assert story.prompt_tokenizer is story.tokenizer
    # base checkpoint (is_distilled false): Flux2KleinPipeline's own defaults
    assert story.story_defaults()["num_inference_steps"] == 50 and story.story_defaults()["guidance_scale"] == 4.0


def test_spans_count_the_chat_templates_first_tokens_with_the_background(klein):
    """Qwen3's template puts ``<|im_start|>user\\n`` before the prompt: those tokens count with the background; the
    spans end exactly where each field's tokens end in the sequence the text encoder reads."""
    from characonsist.backbones.klein import _template

    story, _ = klein
    tok = story.tokenizer
    image = StoryImage.parse(IDENTITY)                    # in the park # a red cat # sitting
    bg, real, char = story.token_spans(image, 64)
    pieces = [tok.decode([i]) for i in tok(_template(tok, image.prompt)).input_ids]
    assert pieces[:3] == ["<|im_start|>", "user", "\n"]
    assert "".join(pieces[3:bg]) == "in the park"
    assert "".join(pieces[bg:bg + char]) == " a red cat"
    assert "".join(pieces[bg:real]) == " a red cat sitting" and pieces[real] == "<|im_end|>"
    assert story.token_spans(StoryImage("user", "a red cat", "sitting"), 64) == (4, 8, 3)   # not the template's "user"
    no_bg = story.token_spans(StoryImage("", "a red cat", "sitting"), 64)
    assert no_bg[0] == 3 and no_bg[2] == len(tok(" a red cat".strip()).input_ids)
    tok.padding_side = "left"   # a tokenizer padding on the left: the same tokens, after the padding
    try:
        padded = tok(_template(tok, image.prompt), padding="max_length", max_length=64).input_ids
        left = story.token_spans(image, 64)
        assert [tok.decode([i]) for i in padded[left[0] - (bg - 3):left[1] + 1]] == pieces[3:real + 1]
        assert left[2] == char
    finally:
        tok.padding_side = "right"


def test_a_prompt_that_fits_only_without_the_chat_template_is_refused(klein):
    """The prompt's own 7 tokens fit 16, the templated ~27 do not: refused before any work, naming both counts
    (the stock pipeline would cut the prompt's end silently)."""
    from characonsist.inputs import InputError

    story, _ = klein
    with pytest.raises(InputError, match=r"Qwen3 tokens with klein's chat template \(\d+ of them the template's\), "
                                         r"but the text encoder takes at most 16 \(max_sequence_length\)"):
        story(IDENTITY, FRAMES, **{**KW, "max_sequence_length": 16})


@pytest.mark.parametrize("guidance", [4.0, 1.0])   # with the negative pass (CFG) and without it
def test_vanilla_equals_flux2_klein_pipeline_exactly(klein, guidance):
    story, stock = klein
    out = story(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3], guidance_scale=guidance, **KW)
    assert np.array_equal(np.stack(out.images), _stock(stock, [IDENTITY, *FRAMES], [1, 2, 3], guidance))


@pytest.mark.parametrize("method", ["characonsist", "consistory", "storysync", "storydiffusion"])
def test_every_method_switched_off_equals_flux2_klein_pipeline(klein, method):
    story, stock = klein
    out = story(IDENTITY, FRAMES, method=method, guidance_scale=4.0, **OFF[method], **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], out.seeds, 4.0)
    assert np.array_equal(np.stack(out.images), ref)


def test_latents_and_other_sizes_equal_the_stock_pipeline(klein):
    """``output_type="latent"`` gives the stock pipeline's unpacked latents; a frame of another size (its own group,
    its own position ids and schedule) equals the stock pipeline at that size."""
    story, stock = klein
    out = story(IDENTITY, FRAMES[:1], method="vanilla", seed=[1, 2], guidance_scale=4.0, **{**KW, "output_type": "latent"})
    ref = _stock(stock, [IDENTITY, *FRAMES[:1]], [1, 2], 4.0, output_type="latent")
    assert torch.equal(torch.stack(out.images), ref)
    wide = StoryImage("in the park", "a red cat", "running", height=48, width=80)
    out = story(IDENTITY, [wide], method="vanilla", seed=[1, 2], guidance_scale=4.0, **KW)
    assert np.array_equal(out.frames[0], _stock(stock, [wide], [2], 4.0, height=48, width=80)[0])


def test_distilled_klein_ignores_guidance_as_the_stock_pipeline(tmp_path):
    """klein 4B / 9B are step-distilled (``is_distilled``): one pass per step whatever ``guidance_scale`` says, and
    their model card's defaults (4 steps, guidance 1.0)."""
    from characonsist.inputs import model_defaults
    from characonsist.testing import tiny_klein_pipeline

    tiny_klein_pipeline(seed=1, is_distilled=True).save_pretrained(tmp_path)
    story, stock = _load(tmp_path)
    assert story.story_defaults()["num_inference_steps"] == 4 and story.story_defaults()["guidance_scale"] == 1.0
    assert model_defaults(tmp_path)["num_inference_steps"] == 4        # the CLI reads the folder alone
    out = story(IDENTITY, FRAMES, method="characonsist", guidance_scale=4.0, **OFF["characonsist"], **KW)
    assert np.array_equal(np.stack(out.images), _stock(stock, [IDENTITY, *FRAMES], out.seeds, 4.0))


def test_the_single_block_processor_equals_diffusers_with_plain_attention(klein):
    """``KleinSingleProcessor`` (fused q/k/v + MLP projection split, method attention, fused output) with plain
    attention reproduces ``Flux2ParallelSelfAttnProcessor`` on the same layer exactly."""
    from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

    from characonsist.backbones.klein import KleinSingleProcessor
    from characonsist.engine import AttnCall, Run

    story, _ = klein
    attn = story.transformer.single_transformer_blocks[1].attn

    class Plain:
        run = Run([], [], 5, 1, 2, 1)

        def attention(self, kind, block, q, k, v, rotary, text_len, mask, backend, parallel):
            assert (kind, block, text_len) == ("single", 1, None)
            return AttnCall(kind, block, q, k, v, rotary, 5, self.run).plain()

    torch.manual_seed(0)
    x = torch.randn(2, 13, attn.query_dim)
    rotary = story.transformer.pos_embed(torch.randint(0, 9, (13, 4)))
    with torch.no_grad():
        ours = KleinSingleProcessor(Plain(), "single", 1)(attn, x, image_rotary_emb=rotary)
        stock = Flux2ParallelSelfAttnProcessor()(attn, x, image_rotary_emb=rotary)
    assert torch.equal(ours, stock)


def test_characonsist_leaves_the_identity_as_klein_draws_it(klein):
    """The lockstep batch: the identity's row attends plainly next to sharing frames, and equals the identity
    generated alone; chunks of one frame give the frames of the whole batch (each frame reads the identity only)."""
    story, stock = klein
    out = story(IDENTITY, FRAMES, guidance_scale=4.0, **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], [2025] * 3, 4.0)
    assert np.array_equal(out.identity, ref[0])
    assert [m.shape for m in out.masks] == [(8, 8)] * 3     # tiny VAE: 2x down, 2x2 patches
    alone = story(IDENTITY, [], guidance_scale=4.0, **KW)
    np.testing.assert_allclose(alone.identity, out.identity, atol=1e-5)
    chunked = story(IDENTITY, FRAMES, guidance_scale=4.0, batch_size=2, **KW)
    for x, y in zip(out.images, chunked.images, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.parametrize("method", ["characonsist", "consistory", "storysync", "storydiffusion"])
def test_every_method_acts_on_klein(klein, method):
    story, stock = klein
    out = story(IDENTITY, FRAMES, method=method, guidance_scale=4.0, **KW)
    ref = _stock(stock, [IDENTITY, *FRAMES], out.seeds, 4.0)
    assert all(np.isfinite(x).all() for x in out.images)
    assert any(np.abs(f - r).max() > 1e-4 for f, r in zip(out.frames, ref[1:], strict=True))


@pytest.mark.slow
def test_cli_generates_a_story_with_a_klein_folder(tmp_path):
    """``--model FOLDER`` of a saved Flux2KleinPipeline: the defaults are klein's, the images its story pipeline's."""
    import json

    from characonsist import cli
    from characonsist.inputs import model_defaults
    from characonsist.testing import tiny_klein_pipeline

    folder = tmp_path / "klein"
    tiny_klein_pipeline().save_pretrained(folder)
    assert model_defaults(folder)["num_inference_steps"] == 50     # a base folder
    story = tmp_path / "story.txt"
    story.write_text("park#a cat#sitting\npark#a cat#running\n")
    assert cli.main(["generate", str(story), "--model", str(folder), "--out", str(tmp_path / "out"), "--height", "32",
                     "--width", "32", "--steps", "2", "--max-sequence-length", "64", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["guidance_scale"] == 4.0
    assert len(list((tmp_path / "out").rglob("*.png"))) >= 2


@pytest.mark.slow
def test_backbone_bench_runs_klein_tiny_on_the_cpu(tmp_path):
    """bench/backbone_bench.py --backbone klein (the GPU figures' command, BENCHMARKS.md) at toy widths."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import backbone_bench

    result = backbone_bench.main(["--backbone", "klein", "--tiny", "--frames", "1", "--steps", "2", "--out",
                                  str(tmp_path)])
    assert result["backbone"] == "klein" and result["ours_s"] > 0 and result["stock_s"] > 0
    assert (tmp_path / "backbone_klein_tiny.json").is_file()


@pytest.mark.slow
def test_group_offload_keeps_every_method_exact_on_klein(tmp_path):
    """Group offload's hooks around klein's blocks (CPU to CPU here: the hooks run, no stream) leave the methods
    switched off equal to the stock pipeline under the same hooks."""
    from characonsist import memory
    from characonsist.testing import tiny_klein_pipeline

    tiny_klein_pipeline(seed=2).save_pretrained(tmp_path)
    story, stock = _load(tmp_path)
    for pipe in (story, stock):
        memory.apply_memory_mode(pipe, "group-offload", "cpu")
    assert any(getattr(m, "_diffusers_hook", None) is not None for m in story.transformer.modules())
    for method in ("characonsist", "storysync"):
        out = story(IDENTITY, FRAMES[:1], method=method, guidance_scale=4.0, **OFF[method], **KW)
        assert np.array_equal(np.stack(out.images), _stock(stock, [IDENTITY, *FRAMES[:1]], out.seeds, 4.0))


@pytest.mark.parametrize("distilled, steps", [(True, 4), (False, 50)])
def test_a_hub_klein_gets_its_kinds_defaults_from_the_cache(tmp_path, monkeypatch, distilled, steps):
    """A hub id (no folder): the command line reads ``model_index.json``'s ``is_distilled`` from the hub cache, so a
    klein base checkpoint gets 50 steps and guidance, a distilled one 4 steps. The real ``hf_hub_download``, offline,
    over a cache laid out as huggingface_hub writes it."""
    import json

    from characonsist.app.model import resolve_model
    from characonsist.testing import tiny_klein_pipeline

    saved = tmp_path / "saved"
    tiny_klein_pipeline(seed=1, is_distilled=distilled).save_pretrained(saved)
    snapshot = tmp_path / "hub" / "models--someone--klein-tiny" / "snapshots" / ("0" * 40)
    for name in ("model_index.json", "transformer/config.json", "vae/config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text((saved / name).read_text())
    (tmp_path / "hub" / "models--someone--klein-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--klein-tiny" / "refs" / "main").write_text("0" * 40)
    assert json.loads((snapshot / "model_index.json").read_text())["is_distilled"] is distilled
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = resolve_model("someone/klein-tiny")
    assert ref.kind == "hub" and ref.defaults["num_inference_steps"] == steps
