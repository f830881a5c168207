"""The toy decoders' offline tokenizer: a ``tokenizers`` WordLevel model over the toy vocabulary.

Lower-cased, split on whitespace and punctuation; every text becomes ``<|endoftext|> words <|endoftext|>``
(CLIP-style begin and end token, so ``""`` has an embedding), padded with ``<|pad|>`` to
``model_max_length``; words outside the vocabulary map to ``<|unk|>``. Deterministic: the vocabulary is
the sorted word set below, so ids never depend on training data. Saved with the pipeline
(``tokenizer/tokenizer.json``), so a trained toy decoder needs nothing from the hub.
"""

from __future__ import annotations

import re

from polymodal.toyworld.data import (
    AUDIO_TEMPLATES,
    COLOURS,
    DIRECTIONS,
    IMAGE_TEMPLATES,
    PITCHES_HZ,
    SHAPES,
    TIMBRES,
    VIDEO_TEMPLATES,
)

BOS_EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"

_EXTRA_WORDS = """
a an the of and in on at to with that this it is are me please can you i want make draw paint show create
generate render give play produce sketch picture image photo drawing painting video clip movie animation
sound audio tone note beep wave noise music pitch pitched high low middle medium some one shape shapes
colour color coloured colored moving moves move sliding going goes left right up down upward downward
here there sure small big large plain background frame short long sine square circle triangle red green
blue yellow black white grey gray orange purple round box
""".split()


def toy_vocabulary() -> list[str]:
    """Sorted words of every caption template, every attribute value and a few request words."""
    words = set(_EXTRA_WORDS) | set(SHAPES) | set(COLOURS) | set(PITCHES_HZ) | set(TIMBRES) | set(DIRECTIONS)
    for t in IMAGE_TEMPLATES + AUDIO_TEMPLATES + VIDEO_TEMPLATES:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t.lower())))
    return sorted(words)


def toy_tokenizer(model_max_length: int = 16):
    """A ``PreTrainedTokenizerFast`` (WordLevel over :func:`toy_vocabulary`) padding to ``model_max_length``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([BOS_EOS, PAD, UNK] + toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS} $A {BOS_EOS}", pair=f"{BOS_EOS} $A {BOS_EOS} $B {BOS_EOS}",
        special_tokens=[(BOS_EOS, vocab[BOS_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_EOS, eos_token=BOS_EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length,
    )
