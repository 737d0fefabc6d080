"""FLUX.2 [klein] (``Flux2Transformer2DModel``, ``Flux2KleinPipeline``): klein 4B (5 double + 20 single blocks,
Apache-2.0) and 9B (8 + 24, non-commercial), distilled (4 steps, no guidance) or base (real classifier-free
guidance with the empty negative prompt).

What differs from FLUX.1, and what this adapter does about it:

- **Text.** One encoder, Qwen3: every prompt is wrapped in its chat template (``<|im_start|>user\\n`` ... then the
  assistant turn with an empty think block), padded on the right, and the transformer reads the hidden states of
  layers 9, 18 and 27 side by side. Text positions are 4-axis ids (0, 0, 0, token index); no text mask reaches the
  transformer (as FLUX.1). **Spans**: the methods take the background as the tokens [0, bg) and the foreground as
  [bg, real) (docs/API.md); here the template's leading tokens (``<|im_start|>``, ``user``, newline) come first,
  so they count with the background (so would left padding, were a tokenizer to pad on the left; Qwen3's pads
  on the right), and "real" ends where the prompt ends (the closing template tokens are left
  out of every text softmax, as FLUX.1 leaves out T5's end token). Spans are read from the tokenizer's character
  offsets of the templated prompt, so a BPE token is never split between two fields.
- **Blocks.** Double blocks (``Flux2Attention``: the projections and output layers of FLUX.1's double blocks, so
  the FLUX.1 processor serves them unchanged) and single blocks (``Flux2ParallelSelfAttention``: q, k, v and the
  MLP input come out of one fused projection, and the attention output and the MLP output go into one fused output
  projection). The single-block processor (``KleinSingleProcessor``) splits the fused projection as diffusers
  does, hands q, k, v (before RoPE) to the method, and runs the MLP half and the fused output unchanged: only the
  attention half of the block is the method's, as on FLUX.1's single blocks.
- **Where methods act.** Every method names blocks by kind ("single" / "double") and index within the kind, and
  counts them from the model (``Run.num_single_blocks``), so FLUX.1's settings map by kind: CharaConsist's
  foreground sharing on every 2nd single block and background sharing on all single blocks become klein 4B's
  single blocks 0, 2, ..., 18 and 0-19; its mask and match averages run over klein's 20 single blocks instead of
  38. Same rule for ConsiStory, StorySync and StoryDiffusion (their ``blocks`` option, "single" by default).
  Why by kind and not by depth: the single blocks are where text and image share one stream on both models, and
  they are the last and largest part of both (38 of 57 on FLUX.1, 20 of 25 on klein 4B); a depth rescale would
  put the first sharing layer into klein's 5 double blocks, where text keeps its own weights.
- **Steps.** The step options are written for 50 steps and rescaled to the run's (``schedule_steps``): on the
  distilled klein's 4 steps CharaConsist's mask step 10/50 becomes step 1 (as on FLUX.1-schnell).
- **RoPE.** 4 axes (time, row, column, token) of 32 dims each at 4B/9B; image tokens are (0, row, col, 0), so
  point tracking's re-encoding (rotating an identity key with a frame position's frequencies) is unchanged: it
  indexes the per-token (cos, sin) the model built.
- **Schedule.** The stock pipeline's: sigmas linspace(1, 1/N), shifted by ``compute_empirical_mu`` (a function of
  the image tokens *and* the step count), not FLUX.1's resolution shift.
- **Guidance.** Base models (``is_distilled`` false, ``guidance_scale`` > 1) run a second, negative-prompt pass
  (``""``) each step; the methods act on the conditional pass only (``Engine.plain_pass``), as on Chroma.
- **Picture as identity** (``characonsist.inversion``): the picture is encoded as Flux2KleinPipeline encodes its
  reference images (the VAE posterior's mode, 2x2 patches, the VAE's batch-norm statistics, packed), the inverse of
  ``decode``; the inversion calls ``velocity`` with the run's guidance (base: with the negative pass, two calls a
  step). The row it follows is in the generated images' place, never a reference-image token.
- klein's reference-image inputs (``image=``, the KV cache of ``Flux2KleinKVPipeline``) are not used.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..inputs import KLEIN_BASE_DEFAULTS, KLEIN_DEFAULTS, InputError, excerpt
from .base import Backbone, TextBatch, vae_device
from .flux1 import FluxLayerProcessor, layer_of


def _template(tokenizer, prompt: str) -> str:
    """The text Flux2KleinPipeline tokenizes for ``prompt`` (one user turn, generation prompt, no thinking)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


class KleinSingleProcessor:
    """The engine's processor on a ``Flux2ParallelSelfAttention`` layer (a single block): the fused projection
    split into q, k, v and the MLP input as diffusers' ``Flux2ParallelSelfAttnProcessor`` splits it, the
    attention by the active method (``engine.AttnCall``, text length from the run), then the SwiGLU MLP half and
    the fused output projection unchanged."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, engine, kind: str, block: int):
        self.engine, self.kind, self.block = engine, kind, block

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        out = self._method_attention(q, k, v, image_rotary_emb, attention_mask)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))

    @torch.compiler.disable
    def _method_attention(self, q, k, v, image_rotary_emb, attention_mask) -> torch.Tensor:
        return self.engine.attention(self.kind, self.block, q, k, v, image_rotary_emb, None, attention_mask,
                                     self._attention_backend, self._parallel_config)


class Klein(Backbone):
    """FLUX.2 [klein] 4B / 9B (distilled or base) and any checkpoint with a ``Flux2Transformer2DModel`` loaded by
    ``Flux2KleinPipeline`` (a Qwen3 text encoder)."""

    name = "klein"
    transformer_class = "Flux2Transformer2DModel"
    pipeline_class = "Flux2KleinPipeline"
    licence = "klein 4B: Apache-2.0; klein 9B: FLUX Non-Commercial"

    # ------------------------------------------------------------------ text
    def prompt_tokenizer(self, pipe):
        return getattr(pipe, "tokenizer", None)

    def token_spans(self, pipe, image, max_sequence_length: int | None = None) -> tuple[int, int, int]:
        """(background end, prompt end, character length) as positions in klein's text sequence: the chat
        template's leading tokens count with the background (see the module docstring). Raises InputError where
        the templated prompt does not fit ``max_sequence_length`` (Flux2KleinPipeline would cut it silently)."""
        tok = self.prompt_tokenizer(pipe)
        prompt = image.prompt
        text = _template(tok, prompt)
        prefix = _template(tok, "\x00").split("\x00")[0]   # the template's text before the prompt
        start = len(prefix) if text.startswith(prefix) else text.find(prompt)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        starts = [a for a, b in enc["offset_mapping"]]
        if max_sequence_length is not None and len(starts) > max_sequence_length:
            own = len(tok(prompt, add_special_tokens=False).input_ids)
            raise InputError(f"prompt {excerpt(image.spec())}: {len(starts)} Qwen3 tokens with klein's chat template "
                             f"({len(starts) - own} of them the template's), but the text encoder takes at most "
                             f"{max_sequence_length} (max_sequence_length); shorten the prompt by "
                             f"{len(starts) - max_sequence_length} tokens or raise max_sequence_length")
        bg_text, char_text = image.background.strip(), image.character.strip()

        def before(char_pos: int) -> int:
            """Tokens that start before the character ``char_pos`` of the templated text."""
            return sum(1 for a in starts if a < char_pos)

        real = before(start + len(prompt))
        bg = before(start + len(bg_text)) if bg_text else before(start)
        char_end = before(start + (len(bg_text) + 1 if bg_text else 0) + len(char_text)) if char_text else bg
        if getattr(tok, "padding_side", "right") == "left" and max_sequence_length is not None:
            pads = max_sequence_length - len(starts)   # left padding comes first: it counts with the background
            bg, real, char_end = bg + pads, real + pads, char_end + pads
        return bg, real, min(char_end, real) - bg

    def encode(self, pipe, prompts, max_sequence_length, device, guidance_scale) -> TextBatch:
        embeds, ids = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                         max_sequence_length=max_sequence_length)
        negative = None
        if self._cfg(pipe, guidance_scale):
            neg, neg_ids = pipe.encode_prompt(prompt=[""] * len(prompts), device=device, num_images_per_prompt=1,
                                              max_sequence_length=max_sequence_length)
            negative = TextBatch(neg, neg_ids)
        return TextBatch(embeds, ids, negative=negative)

    @staticmethod
    def _cfg(pipe, guidance_scale: float) -> bool:
        """Flux2KleinPipeline's ``do_classifier_free_guidance``."""
        return guidance_scale > 1 and not pipe.config.get("is_distilled", False)

    # ------------------------------------------------------------------ latents
    def schedule(self, scheduler, num_steps, image_seq_len, device):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        sched = copy.deepcopy(scheduler)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
        timesteps, _ = retrieve_timesteps(sched, num_steps, device, sigmas=sigmas, mu=mu)
        sched.set_begin_index(0)
        return sched, timesteps

    def encode_picture(self, pipe, image, device):
        """The picture as klein's latent tokens, as ``Flux2KleinPipeline._encode_vae_image`` encodes a reference
        image (posterior mode, 2x2 patches, normalised by the VAE's batch-norm statistics), packed row by row."""
        vae = pipe.vae
        x = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
        lat = vae.encode(x.to(vae_device(pipe, device), vae.dtype)).latent_dist.mode()
        lat = pipe._patchify_latents(lat.float())
        bn = vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
        return pipe._pack_latents((lat - mean) / std).to(device)

    def decode(self, pipe, latents, height, width, output_type):
        """As Flux2KleinPipeline ends: tokens back to the grid, the VAE's batch-norm statistics undone, 2x2 patches
        back to latent pixels; ``output_type="latent"`` gives those latents (B, C, H, W), as the stock pipeline."""
        rows, cols = height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2)
        ids = pipe._prepare_latent_ids(latents.new_empty(latents.shape[0], 1, rows, cols)).to(latents.device)
        lat = pipe._unpack_latents_with_ids(latents, ids, rows, cols)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(lat.device, lat.dtype)
        lat = pipe._unpatchify_latents(lat * std + mean)
        if output_type == "latent":
            return list(lat)
        image = pipe.vae.decode(lat.to(pipe._vae_device()), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    # ------------------------------------------------------------------ the transformer
    def velocity(self, engine, latents, t, text, img_ids, guidance_scale):
        transformer = engine.pipe.transformer
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with transformer.cache_context("cond"):
            cond = self._forward(transformer, latents, timestep, text, img_ids)
        if text.negative is None:
            return cond
        with engine.plain_pass(), transformer.cache_context("uncond"):
            neg = self._forward(transformer, latents, timestep, text.negative, img_ids)
        return neg + guidance_scale * (cond - neg)

    @staticmethod
    def _forward(transformer, latents, timestep, text: TextBatch, img_ids):
        return transformer(hidden_states=latents.to(transformer.dtype), timestep=timestep / 1000, guidance=None,
                           encoder_hidden_states=text.embeds, txt_ids=text.ids, img_ids=img_ids,
                           joint_attention_kwargs=None, return_dict=False)[0]

    def processor(self, engine, name, original):
        kind, block = layer_of(name)
        if kind == "single":
            return KleinSingleProcessor(engine, kind, block)
        return FluxLayerProcessor(engine, kind, block)

    def defaults(self, transformer_config):
        return dict(KLEIN_DEFAULTS)

    def pipeline_defaults(self, pipe) -> dict:
        """The distilled checkpoints' defaults, or the base checkpoints' where the pipeline is not distilled."""
        return dict(KLEIN_DEFAULTS if pipe.config.get("is_distilled", False) else KLEIN_BASE_DEFAULTS)

    def supports_picture(self) -> bool:
        return True
