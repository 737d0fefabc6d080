"""What a story call takes and the rules it must meet: one place for every rule.

``CharaConsistPipeline.check_inputs`` applies them with the loaded model's limits; the application layer
(``characonsist.app``) applies the same functions before any model loads, with limits read from the model's
config files, so one mistake gets one message whichever front end made it. Nothing here imports torch.

Rules: sizes are positive multiples of 16 (FLUX: 8x VAE, 2x2 latent packing) and at most twice the model's own
size per side; steps are integers >= 1; numbers are finite; ``max_sequence_length`` is 1-512 (FLUX's T5); seeds
are 0 to 2**63-1; a model with a closed, word-level vocabulary (the toy model) takes only its words.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SIZE_MULTIPLE = 16          # FLUX: 8x VAE downsampling, then 2x2 latent packing
MAX_SEQUENCE_LENGTH = 512   # FLUX's T5 encoder
SEED_LIMIT = 2**63          # seeds go to torch.Generator.manual_seed
MAX_STEPS = 1000            # FLUX's flow-matching scheduler is trained on 1000 timesteps; more steps add nothing
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The group size rule (docs/API.md): a group's images run in lockstep, so its memory grows with images x tokens.
# One forward pass holds at most MAX_PASS_TOKENS image tokens (64 images of 1024x1024: FLUX.1-dev's activations
# are about 8.5 GiB per 64 K tokens, BENCHMARKS.md; the toy model's 128 px images are 64 tokens); a group's
# decoded images (3 bytes a pixel) are held until it is written: at most MAX_GROUP_PIXELS (about 3 GiB).
MAX_PASS_TOKENS = 2**18
MAX_GROUP_PIXELS = 2**30
DEFAULTS_FILE = "characonsist_defaults.json"
# Defaults of the official code for FLUX.1-dev; a model folder may override them with characonsist_defaults.json.
FLUX_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 3.5,
                 "max_sequence_length": 512}
# FLUX.1-schnell (a transformer without guidance embedding): 4 steps, no guidance, 256 T5 tokens (its model card)
SCHNELL_DEFAULTS = {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}
# Other backbones (characonsist.backbones), by transformer class: their stock pipeline's defaults.
# ChromaPipeline.__call__: 1024 px, 35 steps, guidance 5.0 (real CFG with the empty negative prompt), 512 tokens.
CHROMA_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 35, "guidance_scale": 5.0,
                   "max_sequence_length": 512}
# FLUX.2 [klein]: the distilled checkpoints' model card (4 steps, no guidance); the base checkpoints' are
# Flux2KleinPipeline.__call__'s (50 steps, real CFG at 4.0). Both 1024 px, 512 Qwen3 tokens.
KLEIN_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 4, "guidance_scale": 1.0,
                  "max_sequence_length": 512}
KLEIN_BASE_DEFAULTS = {**KLEIN_DEFAULTS, "num_inference_steps": 50, "guidance_scale": 4.0}
BACKBONE_DEFAULTS = {"ChromaTransformer2DModel": CHROMA_DEFAULTS, "Flux2Transformer2DModel": KLEIN_DEFAULTS}


class InputError(ValueError):
    """Bad input; ``problems`` lists every message (each names its place: field, file and line, option)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else ""))


_SHORT = reprlib.Repr()     # a bounded repr: a nested list or a shared structure is never written out whole
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 6, 6, 4, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 120, 120, 120


def excerpt(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (a 200 KB line is not echoed whole; a list or mapping is
    shown to a few levels and items only, so formatting it costs little whatever it holds)."""
    text = repr(value) if isinstance(value, str) else _SHORT.repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit - 10]}...{text[-6:]}{size}"


def show(name: str, value) -> str:
    """``name=value`` (API fields, options) or ``--flag value`` (command-line flags), value cut short."""
    return f"{name} {excerpt(value)}" if name.startswith("-") else f"{name}={excerpt(value)}"


# Characters a story's text may not hold: C0/C1 controls (a NUL ends up in the prompt, the manifest and the PNG's
# text), DEL and the Unicode line/paragraph separators; a tab is whitespace, a line break is allowed where a field
# may span lines (a YAML caption).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {0: "NUL", 0x1B: "ESC", 0x7F: "DEL", 0x0D: "carriage return", 0x0C: "form feed",
                  0x0B: "vertical tab", 0x2028: "line separator", 0x2029: "paragraph separator"}


def control_character(text: str, newlines: bool = True) -> int | None:
    """Index of the first control character of ``text`` (a tab is not one; a line break is unless ``newlines``)."""
    match = _CONTROL.search(text)
    first = match.start() if match else None
    if not newlines:
        lf = text.find("\n")
        if lf >= 0 and (first is None or lf < first):
            first = lf
    return first


def describe_character(char: str) -> str:
    """``U+0000 (NUL)``: a character as the messages name it."""
    code = ord(char)
    name = _CONTROL_NAMES.get(code, "line break" if char == "\n" else "a control character")
    return f"U+{code:04X} ({name})"


def text_problem(name: str, value, newlines: bool = True) -> str | None:
    """Why ``value`` cannot be a text field of a story (not a string, or a control character in it), or None."""
    if not isinstance(value, str):
        return f"{name} must be text, got {type(value).__name__} {excerpt(value)}"
    index = control_character(value, newlines)
    if index is not None:
        return (f"{name} holds {describe_character(value[index])} at character {index + 1}; remove it (story text "
                "may not hold control characters)")
    return None


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_problem(name: str, value, low: int | None = None, high: int | None = None) -> str | None:
    """Why ``value`` is not an integer in [low, high], or None."""
    if not is_int(value):
        return f"{show(name, value)} must be an integer"
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        return f"{show(name, value)} must be {bounds}"
    return None


def number_problem(name: str, value, low: float | None = None, high: float | None = None) -> str | None:
    """Why ``value`` is not a finite number in [low, high], or None."""
    if not is_number(value):
        return f"{show(name, value)} must be a number"
    if not math.isfinite(value):
        return f"{show(name, value)} must be a finite number"
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        return f"{show(name, value)} must be {bounds}"
    return None


def seed_problem(name: str, value) -> str | None:
    if not is_int(value):
        return f"{show(name, value)} must be an integer"
    if not 0 <= value < SEED_LIMIT:
        return f"{show(name, value)} is out of range (0 to 2**63-1)"
    return None


# ---------------------------------------------------------------------------------------------- model limits

@dataclass(frozen=True)
class ModelLimits:
    """What a model can take, read from its config files (no weights needed)."""

    multiple: int = SIZE_MULTIPLE           # sizes are multiples of this
    max_side: int | None = None             # largest height / width; None = unknown (not checked)
    native: int | None = None               # the model's own size (max_side is twice it)
    native_from: str = ""                   # where ``native`` was read, for messages
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    vocabulary: tuple[str, ...] | None = None   # a closed word vocabulary (word-level T5 tokenizer), else None


def model_limits(vae_config: dict | None, defaults: dict | None = None, tokenizer=None) -> ModelLimits:
    """Limits from the VAE's config (``sample_size``, number of blocks), the model's defaults and its T5 tokenizer.

    The native size is the larger of the VAE's ``sample_size`` and the model's default height/width
    (``model_defaults``: FLUX.1's 1024 unless the model folder says otherwise, the toy model's 128); a side may
    be at most twice it (FLUX.1 is trained up to about 2 megapixels; far beyond, images break up and memory
    runs out).
    """
    multiple, native, source = SIZE_MULTIPLE, None, ""
    if vae_config:
        blocks = vae_config.get("block_out_channels")
        if isinstance(blocks, list) and blocks:
            multiple = max(SIZE_MULTIPLE, 2 * 2 ** (len(blocks) - 1))
        if is_int(vae_config.get("sample_size")) and vae_config["sample_size"] > 0:
            native, source = int(vae_config["sample_size"]), "vae/config.json sample_size"
    for key in ("height", "width"):
        value = (defaults or {}).get(key)
        if is_int(value) and value > 0 and (native is None or value > native):
            native, source = int(value), f"its default {key}"
    vocabulary = closed_vocabulary(tokenizer) if tokenizer is not None else None
    return ModelLimits(multiple, None if native is None else 2 * native, native, source, MAX_SEQUENCE_LENGTH,
                       vocabulary)


def read_config(path: Path | None) -> dict | None:
    """A JSON config file as a dict, or None (missing or unreadable: the check that needs it is skipped)."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_defaults(folder: Path | None, transformer_config: dict | None = None, base: dict | None = None,
                   model_index: dict | None = None) -> dict:
    """Height, width, steps, guidance and ``max_sequence_length`` for a model: ``base`` (another backbone's stock
    defaults, ``characonsist.backbones``) or FLUX.1-dev's; FLUX.1-schnell's for a FLUX.1 transformer without
    guidance embedding; the model folder's ``characonsist_defaults.json`` wins. ``model_index``: the pipeline's
    ``model_index.json`` when there is no folder (a hub model): klein's ``is_distilled`` is read from it."""
    defaults = dict(FLUX_DEFAULTS)
    if base is None and transformer_config is None and folder is not None:
        transformer_config = read_config(Path(folder) / "transformer" / "config.json")
    if base is None and transformer_config:   # a saved config names its class: another backbone's defaults
        base = BACKBONE_DEFAULTS.get(transformer_config.get("_class_name"))
        if base is KLEIN_DEFAULTS and folder is not None:
            model_index = read_config(Path(folder) / "model_index.json")
        if base is KLEIN_DEFAULTS and model_index is not None and not model_index.get("is_distilled", False):
            base = KLEIN_BASE_DEFAULTS   # a klein base model (model_index.json's is_distilled false)
    if base is not None:
        defaults.update(base)
    if base is None and transformer_config and transformer_config.get("guidance_embeds") is False:
        defaults.update(SCHNELL_DEFAULTS)
    own = read_config(Path(folder) / DEFAULTS_FILE) if folder is not None else None
    defaults.update({k: v for k, v in (own or {}).items() if k in FLUX_DEFAULTS})
    return defaults


def closed_vocabulary(tokenizer) -> tuple[str, ...] | None:
    """The words of a word-level T5 tokenizer (every piece a whole word or a single character), or None.

    Such a tokenizer (the toy model's) spells any other word letter by letter: the model never saw those
    pieces as words, so a prompt with them gives noise. Real T5 vocabularies have sub-word pieces: None.
    """
    cached = getattr(tokenizer, "_characonsist_vocabulary", False)
    if cached is not False:
        return cached
    try:
        pieces = tokenizer.get_vocab()
        special = set(getattr(tokenizer, "all_special_tokens", []))
    except Exception:
        return None
    words = []
    for piece in pieces:
        if piece in special or len(piece) == 1:
            continue
        if not (piece.startswith("\u2581") and piece[1:].isalnum()):
            words = None
            break
        words.append(piece[1:])
    result = tuple(sorted(words)) if words else None
    try:
        tokenizer._characonsist_vocabulary = result
    except AttributeError:
        pass
    return result


# words a closed-vocabulary model takes although its tokenizer spells them out: the toy world's join of two characters
# (``a cat and a robot``, docs/TOY_WORLD.md), which a toy model trained on two-character images reads as its pieces
SPELLED_WORDS: tuple[str, ...] = ("and",)


def unknown_words(tokenizer, text: str, vocabulary: Iterable[str], spelled: Iterable[str] = SPELLED_WORDS
                  ) -> list[str]:
    """Words of ``text`` that the word-level tokenizer spells out instead of reading as one of ``vocabulary``.

    The tokenizer's own pieces are read: a word is known when its first piece is a vocabulary word and the
    rest are punctuation (``beach,`` is ``beach`` and ``,``), or when it is one of ``spelled`` (read as its
    pieces by design: :data:`SPELLED_WORDS`)."""
    known = {"\u2581" + w for w in vocabulary}
    spelled = {w.lower() for w in spelled}
    words: list[list[str]] = []
    for piece in tokenizer.tokenize(text):
        if piece.startswith("\u2581") or not words:
            words.append([piece])
        else:
            words[-1].append(piece)
    unknown = []
    for pieces in words:
        ok = pieces[0] in known and all(not p.isalnum() for p in pieces[1:])
        word = "".join(pieces).lstrip("\u2581")
        ok = ok or word.lower().rstrip(",.;:!?") in spelled
        if not ok and word and any(c.isalnum() for c in word) and word not in unknown:
            unknown.append(word)
    return unknown


# ---------------------------------------------------------------------------------------------- images

def setting_problems(*, height=None, width=None, num_inference_steps=None, guidance_scale=None,
                     max_sequence_length=None, batch_size=None, limits: ModelLimits | None = None,
                     names: dict[str, str] | None = None) -> list[str]:
    """Problems of the call-wide settings (None = not given, not checked). ``names`` renames fields in messages
    (the CLI says ``--steps``)."""
    names = names or {}
    limits = limits or ModelLimits()
    problems = []
    for key, value in (("height", height), ("width", width)):
        if value is not None:
            problems.append(size_problem(names.get(key, key), value, limits))
    if num_inference_steps is not None:
        problem = int_problem(names.get("num_inference_steps", "num_inference_steps"), num_inference_steps, 1,
                              MAX_STEPS)
        if problem and is_int(num_inference_steps) and num_inference_steps > MAX_STEPS:
            problem += f" (the scheduler has {MAX_STEPS} timesteps)"
        problems.append(problem)
    if guidance_scale is not None:
        problems.append(number_problem(names.get("guidance_scale", "guidance_scale"), guidance_scale, 0))
    if max_sequence_length is not None:
        problems.append(int_problem(names.get("max_sequence_length", "max_sequence_length"), max_sequence_length, 1,
                                    limits.max_sequence_length))
    if batch_size is not None:
        problem = int_problem(names.get("batch_size", "batch_size"), batch_size, 2)
        problems.append(problem and problem + " (a batch holds the identity and at least one frame)")
    return [p for p in problems if p]


def group_size_problems(sizes: Sequence[tuple[int, int]], batch_size: int | None = None,
                        names: dict[str, str] | None = None) -> list[str]:
    """The group size rule for one group of images of ``sizes`` (height, width; identity first), run in passes of
    at most ``batch_size`` images (None: the whole group in one): problems with what to do, or []. Counted before
    any model loads; image tokens are (height / 16) x (width / 16)."""
    names = names or {}
    n = len(sizes)
    if n < 2:
        return []
    tokens = [max(h // SIZE_MULTIPLE, 1) * max(w // SIZE_MULTIPLE, 1) for h, w in sizes]
    per_pass = n if not is_int(batch_size) or batch_size >= n else max(int(batch_size), 2)
    frames = sorted(tokens[1:], reverse=True)
    largest = tokens[0] + sum(frames[:per_pass - 1])
    problems = []
    if largest > MAX_PASS_TOKENS:
        fit = 1 + (MAX_PASS_TOKENS - tokens[0]) // max(frames[0], 1)
        flag = names.get("batch_size", "batch_size")
        how = f"{flag} {fit}" if flag.startswith("-") else f"{flag}={fit}"
        problems.append(f"{n} images in one group take {largest:,} image tokens in one pass (identity and "
                        f"{per_pass - 1} frames), more than {MAX_PASS_TOKENS:,} (the group size rule: images x "
                        f"tokens, docs/API.md); give {how} (at most {fit} images a pass) or split the group")
    pixels = sum(h * w for h, w in sizes)
    if pixels > MAX_GROUP_PIXELS:
        problems.append(f"{n} images in one group are {pixels:,} pixels, more than {MAX_GROUP_PIXELS:,} held until the "
                        "group is written (the group size rule, docs/API.md); split the group into smaller ones")
    return problems


def size_problem(name: str, value, limits: ModelLimits | None = None) -> str | None:
    """Why ``value`` cannot be an image height/width for the model, or None."""
    limits = limits or ModelLimits()
    if not is_int(value):
        return f"{show(name, value)} must be an integer (pixels)"
    if value <= 0 or value % limits.multiple:
        return (f"{show(name, value)} is not a positive multiple of {limits.multiple} (FLUX works on "
                f"{limits.multiple}-pixel patches)")
    if limits.max_side is not None and value > limits.max_side:
        return (f"{show(name, value)} is larger than this model takes: at most {limits.max_side} (twice its native "
                f"{limits.native}, {limits.native_from})")
    return None


def image_problems(images: Sequence, places: Sequence[str], limits: ModelLimits) -> list[str]:
    """Per-image size problems of ``images`` (``story.StoryImage``s) against the model's limits (StoryImage itself
    checks the multiple of 16)."""
    problems = []
    for image, place in zip(images, places, strict=True):
        for key in ("height", "width"):
            value = getattr(image, key)
            if value is not None:
                problem = size_problem(key, value, limits)
                if problem:
                    problems.append(f"{place}: {problem}")
    return problems


def prompt_problems(images: Sequence, places: Sequence[str], tokenizer, max_sequence_length: int,
                    vocabulary: Sequence[str] | None = None, model: str = "the model") -> list[str]:
    """Prompts the text encoder cannot take: words outside a closed vocabulary (reported instead of a length
    problem, which they cause), then prompts longer than ``max_sequence_length`` T5 tokens (end token included)."""
    problems, unknown_any = [], False
    for image, place in zip(images, places, strict=True):
        if vocabulary is not None:
            unknown = unknown_words(tokenizer, image.prompt, vocabulary)
            if unknown:
                unknown_any = True
                problems.append(f"{place}: {len(unknown)} word(s) {model} does not know: "
                                f"{', '.join(excerpt(w, 40) for w in unknown[:12])}"
                                f"{' ...' if len(unknown) > 12 else ''}")
                continue
        count = prompt_length(tokenizer, image.prompt)
        if count > max_sequence_length:
            problems.append(f"{place}: prompt is {count} T5 tokens, but the text encoder takes at most "
                            f"{max_sequence_length} (max_sequence_length); shorten it by "
                            f"{count - max_sequence_length} tokens")
    if unknown_any:   # once, first (a long list of places is cut short in the message)
        problems.insert(0, f"{model[0].upper()}{model[1:]} knows only these words (its tokenizer is word-level): "
                        f"{', '.join(vocabulary)}, and {', '.join(repr(w) for w in SPELLED_WORDS)} to join two characters "
                        "(docs/TOY_WORLD.md)")
    return problems


def prompt_length(tokenizer, text: str) -> int:
    """T5 tokens of ``text`` with the end token."""
    return len(tokenizer(text).input_ids)
