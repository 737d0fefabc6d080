"""Chroma (``ChromaTransformer2DModel``, ``ChromaPipeline``): FLUX.1's blocks and ``FluxAttention`` layers with a
distilled modulation path (no pooled CLIP embedding, no guidance embedding), T5 only, and real classifier-free
guidance with a negative prompt.

What differs from FLUX.1, and what this adapter does about it:

- **Text mask.** ChromaPipeline masks the T5 padding after the first pad token and passes the mask into every
  attention layer; diffusers 0.42 builds it as a float 0/1 tensor, so SDPA *adds* it to the logits (+1 on pairs of
  unmasked tokens) rather than excluding padding. The engine reproduces exactly that: ``AttnCall.plain`` and
  ``AttnCall.own`` pass the model's mask unchanged (bit-identical to the stock pipeline), and a method's shared
  attention gets the same bias on a row's own keys (``AttnCall.bias``; shared keys from other images count as
  unmasked image tokens).
- **Guidance.** With ``guidance_scale > 1`` every step has a second, negative-prompt pass (``""``, as the stock
  pipeline's default). The methods act on the conditional pass only; the negative pass is plain attention
  (``Engine.plain_pass``), so the guidance direction is (shared conditional) - (plain unconditional).
- Blocks, RoPE axes (3: 0, row, col), text spans (T5 tokens, no end token) and schedule are FLUX.1's: every method
  keeps its FLUX.1 layer and step settings unchanged.
- **Picture as identity.** The VAE (16 channels, FLUX's shift and scale) and the 2x2 packing are FLUX.1's, so the
  picture is encoded as on FLUX.1; its inversion (``characonsist.inversion``) calls ``velocity`` with the run's
  guidance, so with ``guidance_scale > 1`` every inversion step has the negative pass too (two model calls).
"""

from __future__ import annotations

from ..engine import sampler_schedule
from ..inputs import CHROMA_DEFAULTS
from .base import TextBatch
from .flux1 import Flux1


class Chroma(Flux1):
    """lodestones/Chroma1-HD and any checkpoint with a ``ChromaTransformer2DModel``."""

    name = "chroma"
    transformer_class = "ChromaTransformer2DModel"
    pipeline_class = "ChromaPipeline"
    licence = "Apache-2.0"

    def prompt_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer", None)

    def encode(self, pipe, prompts, max_sequence_length, device, guidance_scale) -> TextBatch:
        cfg = guidance_scale > 1
        embeds, ids, mask, neg, neg_ids, neg_mask = pipe.encode_prompt(
            prompt=prompts, negative_prompt=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length)
        negative = TextBatch(neg, neg_ids, mask=neg_mask) if cfg else None
        return TextBatch(embeds, ids, mask=mask, negative=negative)

    def schedule(self, scheduler, num_steps, image_seq_len, device):
        return sampler_schedule(scheduler, num_steps, image_seq_len, device)

    def velocity(self, engine, latents, t, text, img_ids, guidance_scale):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        cond = self._forward(engine, latents, timestep, text, img_ids)
        if text.negative is None:
            return cond
        with engine.plain_pass():
            neg = self._forward(engine, latents, timestep, text.negative, img_ids)
        return neg + guidance_scale * (cond - neg)

    @staticmethod
    def _forward(engine, latents, timestep, text: TextBatch, img_ids):
        pipe = engine.pipe
        mask = pipe._prepare_attention_mask(batch_size=latents.shape[0], sequence_length=latents.shape[1],
                                            dtype=latents.dtype, attention_mask=text.mask)
        return pipe.transformer(hidden_states=latents, timestep=timestep / 1000, encoder_hidden_states=text.embeds,
                                txt_ids=text.ids, img_ids=img_ids, attention_mask=mask, joint_attention_kwargs={},
                                return_dict=False)[0]

    def defaults(self, transformer_config):
        return dict(CHROMA_DEFAULTS)
