"""Tiny random FLUX pipelines for tests and examples: built from configs, offline, in about a second.

The architecture is FLUX's (double and single blocks, 3-axis RoPE, 16-channel VAE latents packed 2x2); only
the widths and depths are tiny. Every module is put in eval mode: modules built from a config start in
training mode, and T5's dropout would make runs differ.
"""

from __future__ import annotations

import torch

from .tokenizers import make_clip_tokenizer, make_t5_tokenizer

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
