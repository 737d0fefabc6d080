"""A FLUX.1-dev ``FluxPipeline`` with random weights, built directly on the target device (no download, no disk).

``size="full"`` is the real architecture at the real widths (transformer 11.9 B parameters, T5-XXL encoder 4.8 B,
CLIP-L, the 16-channel VAE), so timings and GPU memory match a real checkpoint's; the images are noise.
``size="tiny"`` is the same construction path at toy widths, so the whole benchmark runs on a CPU in seconds.

Parameters are created in ``dtype`` on ``device`` (default dtype switched while the modules are built), never
in float32 first: the full transformer would need 48 GB in float32. PyTorch's default initialisers (uniform
with std about 1/sqrt(3 fan_in) for linears) and transformers' T5/CLIP initialisers keep the activations finite
over 50 steps; ``gpu_bench.py`` checks every transformer output for NaN/inf anyway.
"""

from __future__ import annotations

import contextlib

import torch

# FLUX.1-dev: black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))

# vae/config.json (16 latent channels, 8x downsampling)
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
    norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159)

# text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (T5 v1.1 XXL encoder)
FLUX_DEV_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                     num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32, hidden_act="quick_gelu")
FLUX_DEV_T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128)
TINY_T5 = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Create parameters straight in ``dtype`` on ``device``; restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def transformer_flops_per_image_step(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward for one image (2 FLOPs per multiply-add).

    Per token, with D = heads * head_dim:
      double block (two streams, each token in one stream): qkv 3D^2 + out D^2 + MLP 8D^2 = 12 D^2
      single block: qkv 3D^2 + MLP-in 4D^2 + fused out (D + 4D) -> D = 5D^2          = 12 D^2
    Attention per block over L = text + image tokens: QK^T and AV, 2 L^2 D multiply-adds.
    Plus x_embedder (64 -> D per image token), context_embedder (4096 -> D per text token), proj_out (D -> 64).
    The per-image modulation linears (D -> 6D / 3D, once per image, not per token) are negligible (< 0.1%).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    length = image_tokens + text_tokens
    macs = blocks * (12 * d * d * length + 2 * length * length * d)
    macs += image_tokens * config["in_channels"] * d + text_tokens * config["joint_attention_dim"] * d
    macs += image_tokens * d * config["in_channels"]
    return 2.0 * macs


def build_random_flux(size: str = "full", device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0):
    """A ``FluxPipeline`` of FLUX.1-dev's architecture (``size="full"``) or toy widths (``"tiny"``), random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from characonsist.testing import CORPUS, WORDS
    from characonsist.tokenizers import make_clip_tokenizer, make_t5_tokenizer

    if size not in ("full", "tiny"):
        raise ValueError(f"size={size!r}: choose 'full' or 'tiny'")
    full = size == "full"
    device = torch.device(device)
    tok1 = make_clip_tokenizer(WORDS, model_max_length=77)
    tok2 = make_t5_tokenizer(CORPUS * 20, vocab_size=160, model_max_length=512)
    assert len(tok1) <= 49408 and len(tok2) <= 32128, "tokenizer vocabularies must fit the model vocabularies"
    torch.manual_seed(seed)
    with _building(device, dtype):
        clip = CLIPTextModel(CLIPTextConfig(
            **(FLUX_DEV_CLIP if full else TINY_CLIP), max_position_embeddings=77, bos_token_id=tok1.bos_token_id,
            eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id))
        t5 = T5EncoderModel(T5Config(
            **(FLUX_DEV_T5 if full else TINY_T5), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id, decoder_start_token_id=tok2.pad_token_id))
        vae = AutoencoderKL(**(FLUX_DEV_VAE if full else TINY_VAE))
        transformer = FluxTransformer2DModel(**(FLUX_DEV_TRANSFORMER if full else TINY_TRANSFORMER))
    for module in (clip, t5, vae, transformer):
        module.eval().requires_grad_(False)
        stray = {p.dtype for p in module.parameters()} - {dtype}
        assert not stray, f"{type(module).__name__} has parameters in {stray}, expected {dtype}"
    # FLUX.1-dev scheduler/scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok1, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)


# Chroma (lodestones/Chroma1-HD): FLUX.1's blocks and widths (ChromaTransformer2DModel's defaults), the distilled
# modulation approximator (64 channels, 5120 wide, 5 layers), T5-XXL only, FLUX.1's VAE.
CHROMA_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64, approximator_hidden_dim=5120,
    approximator_layers=5)
TINY_CHROMA_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
    approximator_layers=1)


def build_random_chroma(size: str = "full", device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0):
    """A ``ChromaPipeline`` of Chroma1-HD's architecture (``size="full"``) or toy widths (``"tiny"``), random
    weights, built as ``build_random_flux`` builds FLUX.1 (straight in ``dtype`` on ``device``)."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    from characonsist.testing import CORPUS
    from characonsist.tokenizers import make_t5_tokenizer

    if size not in ("full", "tiny"):
        raise ValueError(f"size={size!r}: choose 'full' or 'tiny'")
    full = size == "full"
    device = torch.device(device)
    tok = make_t5_tokenizer(CORPUS * 20, vocab_size=160, model_max_length=512)
    torch.manual_seed(seed)
    with _building(device, dtype):
        t5 = T5EncoderModel(T5Config(
            **(FLUX_DEV_T5 if full else TINY_T5), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
        vae = AutoencoderKL(**(FLUX_DEV_VAE if full else TINY_VAE))
        transformer = ChromaTransformer2DModel(**(CHROMA_TRANSFORMER if full else TINY_CHROMA_TRANSFORMER))
    for module in (t5, vae, transformer):
        module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=tok, transformer=transformer)


# FLUX.2 [klein]: transformer/config.json of black-forest-labs/FLUX.2-klein-4B (5 double + 20 single blocks, 24 heads
# x 128, Qwen3-4B's 3 x 2560 text channels) and of FLUX.2-klein-9B (8 + 24, 32 heads, Qwen3-8B's 3 x 4096); both 4
# RoPE axes of 32, theta 2000, 128 latent channels (32 x 2x2), no guidance embedding.
KLEIN_TRANSFORMER = {
    "4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False),
    "9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
               num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False),
}
TINY_KLEIN_TRANSFORMER = dict(
    patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False)
# text_encoder/config.json: Qwen3-4B and Qwen3-8B (the transformer reads hidden states 9, 18, 27 of 36 layers)
KLEIN_QWEN3 = {
    "4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000, rms_norm_eps=1e-6,
               max_position_embeddings=40960, tie_word_embeddings=True),
    "9b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000, rms_norm_eps=1e-6,
               max_position_embeddings=40960, tie_word_embeddings=False),
}
TINY_QWEN3 = dict(vocab_size=151936, hidden_size=16, intermediate_size=37, num_hidden_layers=27, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True)
# vae/config.json (AutoencoderKLFlux2: 32 latent channels, batch-norm statistics over the 2x2 patches)
KLEIN_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True,
                 use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=(2, 2))
TINY_KLEIN_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=8, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                      use_post_quant_conv=False)


def build_random_klein(size: str = "full", device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, variant: str = "4b", distilled: bool = True):
    """A ``Flux2KleinPipeline`` of FLUX.2 [klein] 4B's or 9B's architecture (``size="full"``, ``variant``) or toy
    widths (``"tiny"``), random weights, built straight in ``dtype`` on ``device``. ``distilled``: the step-distilled
    checkpoints (one pass a step) rather than the base ones (classifier-free guidance)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from characonsist.testing import CORPUS, FLUX2_SCHEDULER
    from characonsist.tokenizers import make_qwen_tokenizer

    if size not in ("full", "tiny"):
        raise ValueError(f"size={size!r}: choose 'full' or 'tiny'")
    if variant not in KLEIN_TRANSFORMER:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(KLEIN_TRANSFORMER)}")
    full = size == "full"
    device = torch.device(device)
    tok = make_qwen_tokenizer(CORPUS * 20 + ["user assistant"] * 20, model_max_length=4096)
    torch.manual_seed(seed)
    with _building(device, dtype):
        qwen = Qwen3ForCausalLM(Qwen3Config(**(KLEIN_QWEN3[variant] if full else TINY_QWEN3),
                                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        vae = AutoencoderKLFlux2(**(KLEIN_VAE if full else TINY_KLEIN_VAE))
        transformer = Flux2Transformer2DModel(**(KLEIN_TRANSFORMER[variant] if full else TINY_KLEIN_TRANSFORMER))
    for module in (qwen, vae, transformer):
        module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer,
                              is_distilled=distilled)


def parameter_counts(pipe) -> dict[str, float]:
    """Billions of parameters per module."""
    names = ("transformer", "text_encoder_2", "text_encoder", "vae")
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e9 for n in names}
