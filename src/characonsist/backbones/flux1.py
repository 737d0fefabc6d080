"""FLUX.1 (``FluxTransformer2DModel``, ``FluxPipeline``): the first backbone, and the attention processor of every
backbone whose layers are diffusers' ``FluxAttention`` (FLUX.1, Chroma).

Token layout: T5 text tokens first (text position ids all zero), then the packed 2x2 latent patches with
(0, row, col) position ids; CLIP's pooled embedding conditions the modulation; guidance is distilled (one pass).
"""

from __future__ import annotations

import torch

from ..engine import AttnCall, sampler_schedule
from .base import Backbone, TextBatch, vae_device


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of FLUX's joint attention (text first), with the RMS norms, before RoPE (as ``FluxAttnProcessor``)."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k, v = attn.norm_q(_heads(attn, q)), attn.norm_k(_heads(attn, k)), _heads(attn, v)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
        eq, ek, ev = attn.norm_added_q(_heads(attn, eq)), attn.norm_added_k(_heads(attn, ek)), _heads(attn, ev)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    return q, k, v


class FluxLayerProcessor:
    """The engine's processor on a ``FluxAttention`` layer: the projections exactly as diffusers'
    ``FluxAttnProcessor``, the attention itself by the active method (``engine.AttnCall``), then the output
    projections. ``_attention_backend`` / ``_parallel_config`` are kept so ``set_attention_backend`` still works.

    A text mask the model passes (Chroma's: diffusers adds it to the logits) reaches the call as ``attn_mask``
    and ``token_mask``. Under ``torch.compile`` the method's attention is the one region left out of the graph
    (``_method_attention``): its query groups change size from step to step, the projections around it do not.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, engine, kind: str, block: int):
        self.engine, self.kind, self.block = engine, kind, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = project(attn, hidden_states, encoder_hidden_states)
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None
        out = self._method_attention(q, k, v, image_rotary_emb, text_len, attention_mask)
        if encoder_hidden_states is None:
            return out
        txt, img = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())

    @torch.compiler.disable
    def _method_attention(self, q, k, v, image_rotary_emb, text_len: int | None, attention_mask) -> torch.Tensor:
        """The method's attention for this layer, (B, S, H*D); always run eagerly (see the class docstring)."""
        return self.engine.attention(self.kind, self.block, q, k, v, image_rotary_emb, text_len, attention_mask,
                                     self._attention_backend, self._parallel_config)


class Flux1(Backbone):
    """FLUX.1-dev / -schnell and any checkpoint with a ``FluxTransformer2DModel``."""

    name = "flux1"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    licence = "FLUX.1-dev: non-commercial; FLUX.1-schnell: Apache-2.0"

    def prompt_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer_2", None)

    def encode(self, pipe, prompts, max_sequence_length, device, guidance_scale) -> TextBatch:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      num_images_per_prompt=1,
                                                      max_sequence_length=max_sequence_length)
        return TextBatch(embeds, text_ids, pooled)

    def schedule(self, scheduler, num_steps, image_seq_len, device):
        return sampler_schedule(scheduler, num_steps, image_seq_len, device)

    def velocity(self, engine, latents, t, text, img_ids, guidance_scale):
        transformer = engine.pipe.transformer
        batch = latents.shape[0]
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32).expand(batch)
        timestep = t.expand(batch).to(latents.dtype)
        return transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=text.pooled, encoder_hidden_states=text.embeds, txt_ids=text.ids,
                           img_ids=img_ids, return_dict=False)[0]

    def encode_picture(self, pipe, image, device):
        """FLUX's VAE latents of the picture: ``(z - shift) * scale``, packed in 2x2 patches (``_pack_latents``)."""
        vae = pipe.vae
        x = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
        latents = vae.encode(x.to(vae_device(pipe, device), vae.dtype)).latent_dist.mode()
        latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w).to(device)

    def decode(self, pipe, latents, height, width, output_type):
        if output_type == "latent":
            return list(latents)
        lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(lat.to(pipe._vae_device()), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    def processor(self, engine, name, original):
        kind, block = layer_of(name)
        return FluxLayerProcessor(engine, kind, block)

    def defaults(self, transformer_config):
        return None   # FLUX.1-dev's, or -schnell's without guidance embedding (``inputs.model_defaults``)

    def supports_picture(self) -> bool:
        return True


def layer_of(name: str) -> tuple[str, int]:
    """("single" | "double", block index) of an attention processor's name."""
    parts = name.split(".")
    kind = "single" if parts[0] == "single_transformer_blocks" else "double"
    return kind, int(parts[1])


__all__ = ["AttnCall", "Flux1", "FluxLayerProcessor", "layer_of", "project"]
