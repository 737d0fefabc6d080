"""Offline tokenizers made by the project (no hub download).

FLUX uses a CLIP BPE tokenizer and a T5 sentencepiece tokenizer. Neither vocabulary can be downloaded here,
so models built by this project (tests, the toy world) use tokenizers made from a word list:

* ``make_clip_tokenizer``: a ``CLIPTokenizer`` over the 512 byte symbols (with and without the end-of-word
  mark) plus one BPE merge chain per known word, so every known word is a single token and unknown text
  still tokenizes (byte by byte).
* ``make_t5_tokenizer``: a ``T5Tokenizer`` over a unigram vocabulary trained in-process on a corpus.
* ``make_word_t5_tokenizer``: a ``T5Tokenizer`` whose known words are single pieces (no training; the toy
  model's).

Both round-trip through ``save_pretrained`` / ``from_pretrained`` like the real ones.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def make_clip_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """A CLIP tokenizer whose known ``words`` are single tokens (lower-case ASCII words)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen_tokens = set(vocab)
    for word in sorted({w.lower() for w in words if w.isascii() and w.isalpha()}):
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        left = chars[0]
        for right in chars[1:]:
            merged = left + right
            if merged not in seen_tokens:
                merges.append((left, right))
                vocab.append(merged)
                seen_tokens.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    return CLIPTokenizer(vocab=encoder, merges=merges, model_max_length=model_max_length)


def make_t5_tokenizer(corpus: Iterable[str], vocab_size: int = 256, model_max_length: int = 512):
    """A T5 tokenizer with a unigram vocabulary trained on ``corpus`` (deterministic for a given corpus)."""
    import tokenizers
    from transformers import T5Tokenizer

    trainer = tokenizers.SentencePieceUnigramTokenizer()
    trainer.train_from_iterator(
        list(corpus), vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False,
    )
    vocab = [tuple(x) for x in json.loads(trainer.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def make_word_t5_tokenizer(words, model_max_length: int = 512):
    """A T5 (unigram) tokenizer with every known word one piece, and single characters for anything else.

    ``make_t5_tokenizer`` trained on a corpus as small as the toy world's 72 prompts keeps only single
    characters (the unigram trainer finds no multi-character piece in so small a corpus): 43 tokens a prompt,
    and a 2-layer random T5 gives the transformer little to read words from. Here the word pieces outscore any
    spelling of them, so Viterbi picks whole words.
    """

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in sorted({w.lower() for w in words})]
    vocab += [("\u2581", -8.0)] + [(c, -10.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# A chat template in the shape of Qwen3's for one user turn: FLUX.2 [klein] wraps every prompt in it, with the
# generation prompt and ``enable_thinking=False`` (an empty think block).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def make_qwen_tokenizer(corpus: Iterable[str], vocab_size: int = 400, model_max_length: int = 512):
    """A ``Qwen2TokenizerFast`` (byte-level BPE trained in-process on ``corpus``) with Qwen's chat special tokens and
    a Qwen3-shaped chat template, padding on the right as Qwen3's: FLUX.2 [klein]'s tokenizer at toy size."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              bos_token=None, chat_template=QWEN_CHAT_TEMPLATE, model_max_length=model_max_length)
