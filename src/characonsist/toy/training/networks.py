"""The toy FLUX's parts: the VAE, transformer, text encoders' and scheduler's configurations, the pipeline built
from them (random frozen encoders, project-made tokenizers), and a run folder's pipeline saved and loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from ..._compat import dtype_kwarg
from ...tokenizers import make_clip_tokenizer, make_word_t5_tokenizer
from .. import world

                                     # recipe, both panels equally noised); see reference_noise


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128), layers_per_block=1,
    latent_channels=16, norm_num_groups=16, sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
)
# v3: 4 double + 8 single blocks, FLUX.1's 1:2 proportion (19 + 38); 9.7 M parameters, 19.5 MB in float16
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=32,
    num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
CLIP_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu")
# num_layers=0: the T5 stand-in is context free (each token's embedding, RMS-normed), so a word's token carries
# that word only and the image tokens must look it up where they need it (see ``build_pipeline``).
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=0, num_heads=4, relative_attention_num_buckets=16,
                 dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# FLUX.1-dev's resolution shift, mapped to the toy's sizes: its 1024 px images have 4096 tokens and mu = 1.15,
# 512 px 1024 tokens and mu = 0.5; the toy's 128 px (256 tokens) is its "1024 px" and 64 px (64 tokens) its
# "512 px", so the toy's sigma at every fraction of the run is FLUX.1-dev's at 1024x1024 (v2 used FLUX's own
# token counts, mu = 0.5 at 128 px: far less of the run at high noise than FLUX.1-dev).
SCHEDULER_CONFIG = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=64, max_image_seq_len=256)
# the scheduler of FLUX.1-dev (its scheduler_config.json), the reference of the schedule check
FLUX_DEV_SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                 base_image_seq_len=256, max_image_seq_len=4096)


# ------------------------------------------------------------------------------------------------ model parts

def _round_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Round the weights to float16 values (kept in float32): what ships is what was used."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def build_pipeline(seed: int = 0, transformer_config: dict | None = None, vae_config: dict | None = None,
                   clip_config: dict | None = None, t5_config: dict | None = None, null_pooled: bool = True):
    """A fresh seeded ``FluxPipeline`` of the toy architecture (text encoders random and frozen).

    The prompt reaches the image through the joint attention only, as the masks of CharaConsist, ConsiStory
    and StorySync assume: T5 is context free (``T5_CONFIG``) and, with ``null_pooled``, CLIP's pooled output
    is zero for every prompt (its final layer norm is zeroed), so FLUX's pooled-text modulation carries no
    prompt. The first toy model (v1) had a 2-layer random T5 and an informative pooled vector: its text-image
    attention did not localise the character (masks ~all foreground, BENCHMARKS.md).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel


    tok1 = make_clip_tokenizer(world.VOCAB_WORDS, model_max_length=77)
    tok2 = make_word_t5_tokenizer(world.VOCAB_WORDS)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok1), bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id,
        pad_token_id=tok1.pad_token_id, attention_dropout=0.0, **(clip_config or CLIP_CONFIG)))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
        decoder_start_token_id=tok2.pad_token_id, **(t5_config or T5_CONFIG)))
    vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
    transformer = FluxTransformer2DModel(**(transformer_config or TRANSFORMER_CONFIG))
    if null_pooled:
        with torch.no_grad():   # pooled output = final norm of the end token = 0 for every prompt
            norm = getattr(clip, "text_model", clip).final_layer_norm   # transformers 4 / 5 layouts
            norm.weight.zero_()
            norm.bias.zero_()
    for m in (clip, t5):
        _round_fp16(m.eval()).requires_grad_(False)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=tok1, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def load_run_pipeline(run: Path, device: str = "cpu"):
    """The run's pipeline, every part in float32 (the transformer's weights are the float32 masters)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(run / "pipeline"), **dtype_kwarg(torch.float32))
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval().requires_grad_(False)
    return pipe.to(device)


def _clear_weights(folder: Path) -> None:
    """Remove a model folder's weight files (a sharded save must not sit beside an older unsharded one)."""
    for f in folder.glob("diffusion_pytorch_model*.safetensors*"):
        f.unlink()


def save_transformer(transformer, folder: Path) -> None:
    """Save a copy of ``transformer``'s float32 weights in 15 MB shards, leaving the module where it is (moving a
    module that ``DistributedDataParallel`` wraps under it is not safe)."""
    from diffusers import FluxTransformer2DModel

    copy = FluxTransformer2DModel.from_config(transformer.config)
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in transformer.state_dict().items()})
    _clear_weights(folder)
    copy.save_pretrained(folder, safe_serialization=True, max_shard_size="15MB")


def save_run_pipeline(pipe, run: Path) -> None:
    """Save with the frozen parts in float16 (exact: their weights are float16 values) and the transformer in
    float32, in shards of at most 15 MB (files that come back from a GPU call must be under 16 MB)."""
    parts = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    for m in parts:
        m.to(torch.float16)
    _clear_weights(run / "pipeline" / "transformer")
    pipe.save_pretrained(run / "pipeline", safe_serialization=True, max_shard_size="15MB")
    for m in parts:
        m.to(torch.float32)
