"""Weight formats, memory modes, LoRAs and attention backends with the engine (CPU, tiny pipelines), and the
``memory="auto"`` decision from given memory figures.

Every method must keep its effect-off equivalence with plain FLUX when the backbone is quantized (torchao int8
weight-only through ``from_pretrained``), stored in float8 (layerwise casting), offloaded in groups, carries a LoRA
(loaded or fused), or runs on another attention backend: the engine's processors call the same linears and the same
attention dispatch as diffusers' own.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, memory
from characonsist.methods import method_class
from characonsist.methods.base import story_seeds
from conftest import FRAMES, IDENTITY, KW, effects_off  # the shared story (conftest.py)

PROMPTS = ["in the park a red cat sitting", "in the park a red cat running", "on a beach a red cat jumping"]

# every method with its effects switched off (each method's own tests check these reproduce plain FLUX)
OFF = effects_off(6)

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")


@pytest.fixture(scope="module")
def saved(tiny_model):
    """A tiny FLUX pipeline saved as a diffusers folder (what a user loads): conftest's ``tiny_model``."""
    return tiny_model


def _plain(flux, seeds):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return flux(PROMPTS, generator=gens, guidance_scale=3.5, **KW).images


def _check_every_method(ours, flux):
    """vanilla == FluxPipeline exactly; every method switched off == plain FLUX from its own noise; switched on,
    frames change and stay finite."""
    vanilla = ours(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3], **KW)
    assert np.array_equal(np.stack(vanilla.images), _plain(flux, [1, 2, 3]))
    for method, off in OFF.items():
        seeds = story_seeds(2025, 3, method_class(method).seeding)
        plain = _plain(flux, seeds)
        out = ours(IDENTITY, FRAMES, method=method, **off, **KW)
        assert out.seeds == seeds
        assert np.array_equal(np.stack(out.images), plain), method
    on = ours(IDENTITY, FRAMES, method="characonsist", **KW)
    assert np.isfinite(np.stack(on.images)).all()
    assert any(np.abs(f - p).max() > 1e-4 for f, p in zip(on.frames, _plain(flux, [2025] * 3)[1:], strict=True))


def _pair(folder, **load):
    """Our pipeline and a plain FluxPipeline loaded the same way, each its own modules."""
    from diffusers import FluxPipeline

    ours = memory.load_pipeline(CharaConsistPipeline, str(folder), torch.float32, **load)
    flux = memory.load_pipeline(FluxPipeline, str(folder), torch.float32, **load)
    for p in (ours, flux):
        p.set_progress_bar_config(disable=True)
    return ours, flux


# ------------------------------------------------------------------ weight formats

@needs_torchao
def test_torchao_int8_backbone_through_from_pretrained_every_method(saved):
    from torchao.utils import TorchAOBaseTensor

    ours, flux = _pair(saved, quantize="int8")
    for name in memory.QUANTIZED_COMPONENTS:
        linears = [m for m in getattr(ours, name).modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears), name
    assert not isinstance(ours.vae.decoder.conv_in.weight, TorchAOBaseTensor)
    assert memory.settings(ours)["weights"]["transformer"] == "torchao"
    _check_every_method(ours, flux)
    _, full = _pair(saved)    # the weights really changed: int8 images differ from float32 ones
    assert np.abs(_plain(full, [1, 2, 3]) - _plain(flux, [1, 2, 3])).max() > 1e-5


def test_fp8_storage_layerwise_casting_every_method(saved):
    ours, flux = _pair(saved, quantize="fp8-storage")
    stored = {p.dtype for p in ours.transformer.transformer_blocks.parameters()}
    assert torch.float8_e4m3fn in stored
    t5 = {n: p.dtype for n, p in ours.text_encoder_2.named_parameters()}
    assert t5["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float8_e4m3fn
    assert t5["shared.weight"] == torch.float32 and t5["encoder.final_layer_norm.weight"] == torch.float32
    _check_every_method(ours, flux)


def test_group_offload_hooks_every_method(saved):
    """Group offload's hooks around the blocks (CPU to CPU here: the hooks run, no stream) leave every method exact."""
    ours, flux = _pair(saved)
    for p in (ours, flux):
        memory.apply_memory_mode(p, "group-offload", "cpu")
    assert any(getattr(m, "_diffusers_hook", None) is not None for m in ours.transformer.modules())
    _check_every_method(ours, flux)


def test_quantization_configs_and_problems():
    config = memory.quantization_config("int8-bnb", torch.bfloat16)
    assert set(config.quant_mapping) == set(memory.QUANTIZED_COMPONENTS)
    assert {type(c).__module__.split(".")[0] for c in config.quant_mapping.values()} == {"diffusers", "transformers"}
    assert memory.quantization_config("none", torch.bfloat16) is None
    assert memory.quantization_config("fp8-storage", torch.bfloat16) is None
    assert "unknown weight format 'int3'" in memory.check_quantization("int3")
    assert "needs a CUDA GPU" in memory.check_quantization("int8-bnb", cuda=False)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install bitsandbytes" in memory.check_quantization("nf4", cuda=True)
    assert memory.check_quantization("fp8-storage", cuda=False) is None
    assert "nf4" not in memory.available_quantizations(cuda=False)
    assert "fp8" not in memory.available_quantizations(cuda=True, capability=(8, 0))   # no fp8 matmuls on Ampere


# ------------------------------------------------------------------ LoRA

def _tiny_lora(folder, out_dir, seed=0):
    """A random rank-4 LoRA for the tiny transformer (peft), saved in diffusers' LoRA format."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out"])
    inject_adapter_in_model(config, transformer)
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out_dir / "pytorch_lora_weights.safetensors"


@needs_peft
def test_lora_loaded_and_fused_every_method(saved, tmp_path):
    path = _tiny_lora(saved, tmp_path)
    _, base = _pair(saved)
    ours, flux = _pair(saved, loras=[{"source": str(path), "scale": 0.7}])
    assert memory.settings(ours)["lora_adapters"] == ["lora_0"]
    assert type(ours.transformer.transformer_blocks[0].attn.to_q).__module__.startswith("peft")
    without = _plain(base, [1, 2, 3])
    assert np.abs(_plain(flux, [1, 2, 3]) - without).max() > 1e-4     # the LoRA acts
    _check_every_method(ours, flux)
    for p in (ours, flux):
        p.fuse_lora()
        p.unload_lora_weights()
    assert isinstance(ours.transformer.transformer_blocks[0].attn.to_q, torch.nn.Linear)
    assert not type(ours.transformer.transformer_blocks[0].attn.to_q).__module__.startswith("peft")
    _check_every_method(ours, flux)


# ------------------------------------------------------------------ attention backends

def test_attention_backend_reaches_every_attention_call(saved, monkeypatch):
    """``set_attention_backend`` on the transformer: every call of the engine's processors passes that backend to
    diffusers' dispatch (the masks' softmax, which needs the probabilities, is the documented exception)."""
    from characonsist import engine

    ours, flux = _pair(saved, attention_backend="_native_math")
    seen = []
    dispatch = engine.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(str(getattr(backend, "value", backend)))
        return dispatch(*args, backend=backend, **kwargs)

    monkeypatch.setattr(engine, "dispatch_attention_fn", spy)
    vanilla = ours(IDENTITY, FRAMES, method="vanilla", seed=[1, 2, 3], **KW)
    assert np.array_equal(np.stack(vanilla.images), _plain(flux, [1, 2, 3]))
    for method in OFF:
        ours(IDENTITY, FRAMES, method=method, **KW)
    assert seen and set(seen) == {"_native_math"}
    assert memory.settings(ours)["attention_backend"] == "_native_math"


# ------------------------------------------------------------------ sizes and the auto decision

def test_model_size_reads_safetensors_headers(saved):
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(saved)
    size = memory.model_size(saved)
    for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        assert size.params[name] == sum(p.numel() for p in getattr(flux, name).parameters())
    block = sum(p.numel() for p in flux.transformer.transformer_blocks[0].parameters())
    assert size.largest_block["transformer"] == block
    assert size.width == 32
    assert memory.model_size(None).params == memory.FLUX_DEV_PARAMS


def test_estimates_reproduce_the_measured_figures():
    """FLUX.1-dev in bf16, identity + 4 frames at 1024x1024 (BENCHMARKS.md: one GPU 34.39 GiB, model offload
    25.13 GiB allocated and 33.5 GiB host)."""
    one = memory.estimate_needs("none")
    assert abs(one.gpu_gib - 34.39) < 0.2 and "measured" in one.basis and one.measured
    offload = memory.estimate_needs("model-offload")
    assert abs(offload.gpu_gib - 25.13) < 0.3 and abs(offload.host_gib - 33.5) < 0.5
    assert memory.estimate_needs("none", "int8").gpu_gib < one.gpu_gib - 7      # weights halved
    fp8 = memory.estimate_needs("none", "fp8")
    assert "calibrated" in fp8.basis and not fp8.measured
    nine = memory.estimate_needs("none", images=9)
    assert nine.gpu_gib > one.gpu_gib      # activations grow with the images
    other = memory.ModelSize({k: v / 2 for k, v in memory.FLUX_DEV_PARAMS.items()}, 2048, source="a smaller model")
    small = memory.estimate_needs("group-offload", size=other)
    assert not small.measured and "calibrated" not in small.basis and "a smaller model" in small.basis


FORMATS = ["none", "int8", "fp8", "nf4", "int8-bnb", "fp8-storage"]


@pytest.mark.parametrize("gpu, host", [(139, 120), (79, 60), (31, 60), (23.5, 30), (15.5, 30), (11.5, 30),
                                       (7.5, 16), (23.5, 64), (5.0, 8.0)])
def test_auto_takes_the_fastest_plan_that_fits(gpu, host):
    plan = memory.choose_plan(gpu, host, FORMATS)
    fits = []
    for q in FORMATS:
        for m in ("none", "model-offload", "group-offload", "sequential-offload"):
            needs = memory.estimate_needs(m, q)
            if needs.gpu_reserved_gib + 0.5 <= gpu and needs.host_gib + 0.5 <= host:
                fits.append((needs.speed, q, m, needs.measured))
    fits = [f for f in fits if f[3]] or fits      # measured plans first
    if fits:
        assert plan.needs.gpu_reserved_gib + 0.5 <= gpu and plan.needs.host_gib + 0.5 <= host
        fastest = min(f[0] for f in fits)
        kept = min((f[0] for f in fits if f[1] == "none"), default=None)
        if kept is not None and kept <= 1.5 * fastest:     # the weights stay as they are
            assert plan.quantize == "none" and plan.needs.speed == kept
        else:
            assert plan.needs.speed == fastest
        assert "the fastest that fits" in plan.reason and f"{gpu:.1f} GiB free" in plan.reason
    else:
        assert "nothing fits" in plan.reason


def test_auto_on_the_cards_people_have():
    """A 24 GB card in a 32 GB workstation and a 16 GB card: bf16 fits neither, a smaller weight format does."""
    for gpu, host in ((23.5, 29.0), (15.5, 29.0)):
        bf16 = memory.choose_plan(gpu, host, ["none"])
        assert "nothing fits" in bf16.reason                  # FLUX.1-dev in bf16 needs ~31 GiB of host or GPU
        plan = memory.choose_plan(gpu, host, ["none", "int8", "nf4"])
        assert plan.quantize in ("int8", "nf4") and "fits" in plan.reason
        assert plan.needs.gpu_reserved_gib <= gpu and plan.needs.host_gib <= host
    big = memory.choose_plan(139.0, 120.0, ["none", "int8", "fp8"])
    assert (big.quantize, big.memory) == ("none", "none")        # fp8's estimated 5% do not change the weights
    table_first = memory.choose_plan(139.0, 120.0, ["none", "fp8"], keep_weights_within=1.0)
    assert (table_first.quantize, table_first.memory) == ("none", "none")   # fp8 is estimated, bf16 measured
    kept = memory.choose_plan(23.5, 64.0, ["none", "nf4"])                # measured: group offload 1.29x, nf4 1.12x
    assert (kept.quantize, kept.memory) == ("none", "group-offload")
    eager = memory.choose_plan(23.5, 64.0, ["none", "nf4"], keep_weights_within=1.0)
    assert (eager.quantize, eager.memory) == ("nf4", "model-offload")
    only = memory.choose_plan(23.5, 64.0, ["none"], modes=["model-offload", "sequential-offload"])
    assert only.memory == "sequential-offload"               # model offload needs ~28 GiB reserved
    two = memory.choose_plan(31.0, 29.0, ["none"], gpus=2)
    assert two.memory == "balanced"
    cpu = memory.choose_plan(None, 8.0, ["none"])
    assert (cpu.quantize, cpu.memory) == ("none", "none") and "no CUDA GPU" in cpu.reason
    assert cpu.describe().startswith("--quantize none --memory none")


def test_the_large_text_encoder_of_each_backbone_is_the_one_quantized(tmp_path):
    """FLUX.1 quantizes its T5 ``text_encoder_2`` (CLIP-L stays); Chroma (T5) and FLUX.2 [klein] (Qwen3) have one
    ``text_encoder``, the large one: it is quantized with the transformer."""
    from characonsist.testing import tiny_chroma_pipeline, tiny_klein_pipeline

    assert memory.quantized_components(None) == ("transformer", "text_encoder_2")
    for name, build, expected in (("chroma", tiny_chroma_pipeline, ("transformer", "text_encoder")),
                                  ("klein", tiny_klein_pipeline, ("transformer", "text_encoder"))):
        build(seed=1).save_pretrained(tmp_path / name)
        assert memory.quantized_components(memory.read_model_index(str(tmp_path / name))) == expected, name
    assert memory.read_model_index(str(tmp_path / "missing")) is None
    size = memory.model_size(tmp_path / "klein")      # the estimates count the Qwen3 encoder in the format too
    assert size.quantized == ("transformer", "text_encoder")
    bf16 = memory.estimate_needs("none", "none", size, images=0)
    int8 = memory.estimate_needs("none", "int8", size, images=0)
    weights = sum(size.params.values())
    quantized = size.params["transformer"] + size.params["text_encoder"]
    assert bf16.gpu_gib - int8.gpu_gib == pytest.approx(quantized * (2 - 1) / memory.GIB, rel=1e-6)
    assert quantized < weights


@needs_torchao
def test_torchao_int8_quantizes_klein_s_qwen3_encoder(tmp_path):
    from torchao.utils import TorchAOBaseTensor

    from characonsist.testing import tiny_klein_pipeline

    tiny_klein_pipeline(seed=1).save_pretrained(tmp_path)
    pipe = memory.load_pipeline(CharaConsistPipeline, str(tmp_path), torch.float32, quantize="int8")
    for name in ("transformer", "text_encoder"):   # transformers keeps a causal LM's lm_head (unused here) as is
        linears = [m for n, m in getattr(pipe, name).named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears), name
    assert memory.settings(pipe)["weights"]["text_encoder"] == "torchao"
