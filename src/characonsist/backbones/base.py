"""The backbone adapter interface (``Backbone``) and the text a chunk's rows are conditioned on (``TextBatch``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class TextBatch:
    """Encoded prompts of a batch of rows: what the transformer takes besides the latents.

    ``mask``: the model's text mask where it uses one (Chroma), (B, T); ``negative``: the same for the
    negative prompt where the model runs classifier-free guidance (Chroma, FLUX.2 [klein] base)."""

    embeds: torch.Tensor
    ids: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negative: TextBatch | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def rows(self, index: torch.Tensor) -> TextBatch:
        """The rows ``index`` (a 1-D index tensor)."""
        pick = lambda x: None if x is None else x.index_select(0, index.to(x.device))   # noqa: E731
        return replace(self, embeds=pick(self.embeds), pooled=pick(self.pooled), mask=pick(self.mask),
                       negative=None if self.negative is None else self.negative.rows(index))

    def doubled(self) -> TextBatch:
        """Every row twice (the rows, then their copies: the engine's vanilla twins)."""
        two = lambda x: None if x is None else torch.cat([x, x])   # noqa: E731
        return replace(self, embeds=two(self.embeds), pooled=two(self.pooled), mask=two(self.mask),
                       negative=None if self.negative is None else self.negative.doubled())


class Backbone:
    """What the engine needs of a model family. One subclass per backbone; see the package docstring."""

    name = "backbone"
    transformer_class = ""
    pipeline_class = ""          # diffusers' stock pipeline of this backbone
    licence = ""

    # ------------------------------------------------------------------ text
    def prompt_tokenizer(self, pipe):
        """The tokenizer whose tokens are the transformer's text tokens (spans and length checks use it)."""
        raise NotImplementedError

    def token_spans(self, pipe, image, max_sequence_length: int | None = None) -> tuple[int, int, int]:
        """(background end, real prompt end, character length) in the transformer's text sequence: background =
        [0, bg), character = [bg, bg + char), foreground = [bg, real); softmaxes over text run over [0, real).
        ``max_sequence_length``: for an adapter whose text encoder adds tokens of its own (klein's chat template);
        the prompt's own length is checked by ``inputs.prompt_problems``."""
        tok = self.prompt_tokenizer(pipe)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False).input_ids) if text else 0

        real = count(image.prompt)
        bg = min(count(image.background.strip()), real)
        return bg, real, min(count(image.character.strip()), real - bg)

    def encode(self, pipe, prompts: list[str], max_sequence_length: int, device,
               guidance_scale: float) -> TextBatch:
        raise NotImplementedError

    # ------------------------------------------------------------------ latents
    def latents(self, pipe, height: int, width: int, dtype, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed starting noise (1, N, C) of one image and its position ids, as the stock pipeline makes them."""
        channels = pipe.transformer.config.in_channels // 4
        return pipe.prepare_latents(1, channels, height, width, dtype, device, generator)[:2]

    def schedule(self, scheduler, num_steps: int, image_seq_len: int, device):
        raise NotImplementedError

    def encode_picture(self, pipe, image, device) -> torch.Tensor:
        """A fitted RGB picture's latents (1, N, C), float32, in the layout ``latents`` gives the starting noise and
        ``decode`` reads back (the VAE posterior's mode, then the backbone's normalisation and packing)."""
        raise NotImplementedError

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int, output_type: str) -> list:
        raise NotImplementedError

    # ------------------------------------------------------------------ the transformer
    def velocity(self, engine, latents: torch.Tensor, t: torch.Tensor, text: TextBatch, img_ids: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
        """The model output the scheduler steps with, for the batch ``latents`` at timestep ``t`` (guidance
        included). A negative-prompt pass runs inside ``engine.plain_pass()``: the methods act on the
        conditional pass only (docs/API.md, "Backbones")."""
        raise NotImplementedError

    def processor(self, engine, name: str, original):
        """The engine's attention processor for the layer ``name`` (whose stock processor is ``original``)."""
        raise NotImplementedError

    def defaults(self, transformer_config: dict | None) -> dict | None:
        """Height, width, steps, guidance and ``max_sequence_length`` of the stock pipeline for this model (None:
        FLUX.1's rule in ``inputs.model_defaults``)."""
        raise NotImplementedError

    def pipeline_defaults(self, pipe) -> dict | None:
        """``defaults`` for a loaded pipeline, where its own config matters (klein: distilled or base)."""
        transformer = getattr(pipe, "transformer", None)
        return self.defaults(dict(transformer.config) if transformer is not None else None)

    def supports_picture(self) -> bool:
        """Whether an identity picture (``identity_image``, ``characonsist.inversion``) can be used: the inversion
        needs ``encode_picture``, ``latents``, ``schedule``, ``encode`` and ``velocity``, nothing else."""
        return False


def vae_device(pipe, device):
    """Where the pipeline's VAE runs: its weights' device, or ``device`` while they wait on the host or on the meta
    device (an offload hook moves them)."""
    params = next(pipe.vae.parameters(), None)
    return device if params is None or params.device.type in ("meta", "cpu") else params.device
