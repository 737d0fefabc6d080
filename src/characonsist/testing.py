"""Tiny random FLUX pipelines for tests and examples: built from configs, offline, in about a second.

The architecture is FLUX's (double and single blocks, 3-axis RoPE, 16-channel VAE latents packed 2x2); only
the widths and depths are tiny. Every module is put in eval mode: modules built from a config start in
training mode, and T5's dropout would make runs differ.
"""

from __future__ import annotations

import torch

from .tokenizers import make_clip_tokenizer, make_qwen_tokenizer, make_t5_tokenizer

WORDS = (
    "a an the in on at of with and photo cat dog man woman girl boy robot knight wizard fox bear rabbit red blue "
    "green yellow hat scarf coat park forest beach city street room kitchen castle desert snow night day sitting "
    "standing running walking jumping reading eating sleeping waving left right center small big dancing playing "
    "guitar book cup garden river mountain space ship old young tall short smiling happy sad looking"
).split()

CORPUS = [
    "a photo of a cat in the park", "a young woman with red hair reading a book in a garden",
    "a robot standing on a beach at night", "a knight walking in a forest", "an old wizard sitting in a castle",
    "a small fox running in the snow", "a boy playing guitar on a city street", "a girl with a blue hat dancing",
]


# FLUX.1-dev's scheduler_config.json (Chroma1-HD ships the same)
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)


def _tiny_t5(tok):
    """A random 2-layer T5 encoder of toy width for the tokenizer ``tok`` (draws from torch's global generator)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _tiny_vae():
    """A random 16-channel ``AutoencoderKL`` of toy width, scale factor 2, with FLUX's latent shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)


def tiny_flux_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2, max_length: int = 77,
                       dtype: torch.dtype = torch.float32):
    """A random-weight ``FluxPipeline`` with FLUX's architecture at toy width (deterministic for ``seed``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel


    torch.manual_seed(seed)
    tok1 = make_clip_tokenizer(WORDS, model_max_length=max_length)
    tok2 = make_t5_tokenizer(CORPUS * 20, vocab_size=160)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok1), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=max_length, projection_dim=32, bos_token_id=tok1.bos_token_id,
        eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id, hidden_act="quick_gelu"))
    t5, vae = _tiny_t5(tok2), _tiny_vae()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    for module in (clip, t5, vae, transformer):
        module.eval()
        if dtype != torch.float32:
            module.to(dtype)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok1, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)


def tiny_chroma_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2, max_length: int = 77):
    """A random-weight ``ChromaPipeline`` (FLUX.1 blocks, Chroma's distilled modulation; T5 only) at toy width."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler


    torch.manual_seed(seed)
    tok = make_t5_tokenizer(CORPUS * 20, vocab_size=160, model_max_length=max_length)
    t5, vae = _tiny_t5(tok), _tiny_vae()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    for module in (t5, vae, transformer):
        module.eval()
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=tok, transformer=transformer)


# FLUX.2's scheduler_config.json (the klein checkpoints ship FLUX.2 [dev]'s): dynamic shifting, here with the mu of
# ``compute_empirical_mu`` that Flux2KleinPipeline passes.
FLUX2_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096, time_shift_type="exponential")


def tiny_klein_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2, max_length: int = 128,
                        is_distilled: bool = False):
    """A random-weight ``Flux2KleinPipeline`` at toy width: FLUX.2's blocks (fused single blocks, 4-axis RoPE),
    a 27-layer Qwen3 causal LM (klein reads its hidden states 9, 18 and 27) of width 16, a 2-block FLUX.2 VAE
    (scale factor 2, 8 latent channels patched 2x2). ``is_distilled=False`` keeps real classifier-free guidance."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = make_qwen_tokenizer(CORPUS * 20 + ["user assistant"] * 20, model_max_length=max_length)
    hidden = 16
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=max_length, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=8,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():   # latent statistics other than 0/1, so decoding's de-normalisation is exercised
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 1.5)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    for module in (qwen, vae, transformer):
        module.eval()
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer,
                              is_distilled=is_distilled)
