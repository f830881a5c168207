"""Offline tokenizers (no hub access needed): the one module for the tiny presets and the toy decoders.

- :func:`tiny_tokenizer`: a byte-level BPE trained, deterministically and in milliseconds, on a small built-in
  English corpus with the ``tokenizers`` library. Any text round-trips (byte-level), so it serves as the
  tokenizer of the tiny LLM and (``wrap=True``: ``<|endoftext|> ... <|endoftext|>``, CLIP/Roberta-style begin
  and end tokens, so ``""`` has an embedding) of the tiny diffusion text encoders (:mod:`decoders.tiny`).
- :func:`word_level_tokenizer`: a ``WordLevel`` model over a fixed word list, lower-cased, split on whitespace
  and punctuation, unknown words -> ``<|unk|>``; the toy decoders' and the toy CLIP's tokenizer over the toy
  vocabulary (the offline wing's ``training.toyworld.data.toy_tokenizer``). Ids depend only on the word list.

Trained toy decoders save their tokenizer with the pipeline (``tokenizer/tokenizer.json``): serving them reads
that file and never calls this module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_WORDS = """
the a an of and to in is it that for on with as was at by be this are from or have not but what all were
when we there can your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my
made over did down only way find use may water long little very after words called just where most know
draw paint picture image photo sound audio music video clip song voice speech tone movie show me please
make generate create describe tell red green blue yellow black white orange purple circle square triangle
shape moving left right up down high low middle note cat dog bird car tree sky sea beach kite house city
person man woman child astronaut rocket coffee cup street mountain river forest sun moon night day rain
snow happy sad calm loud quiet fast slow big small answer question capital france paris london yes hello
thank you sure here is an of a the that sounds looks like playing singing running flying sitting walking
""".split()

_CORPUS = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 6)] + [
    "Hello! How can I help you today?",
    "Here is an image of a red circle.",
    "Sure, here is the sound you asked for.",
    "The capital of France is Paris.",
    "0123456789 .,;:!?'\"()[]{}<>/-_=+*&%$#@",
]

BOS_EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
TINY_SPECIAL_TOKENS = [BOS_EOS, PAD]


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def tiny_tokenizer(vocab_size: int = 512, model_max_length: int = 77, *, wrap: bool = False) -> PreTrainedTokenizerFast:
    """Return a fresh offline tokenizer (``eos``/``bos`` ``<|endoftext|>``, ``pad`` ``<|pad|>``).

    Args:
        vocab_size: BPE vocabulary size before any added tokens.
        model_max_length: padding length used by diffusion text encoders (77 as CLIP).
        wrap: every text becomes ``<|endoftext|> ... <|endoftext|>`` (the begin and end token are both
            ``<|endoftext|>``, as CLIP's end token): the tiny decoders' text encoders.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_trained(vocab_size)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=model_max_length,
    )
    if wrap:
        e = tok.eos_token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{e} $A {e}", pair=f"{e} $A {e} $B {e}", special_tokens=[(e, tok.eos_token_id)]
        )
    return tok


def word_level_tokenizer(words: Sequence[str], model_max_length: int = 16, *, begin: bool = True) -> PreTrainedTokenizerFast:
    """A ``WordLevel`` tokenizer over ``words`` (ids: ``<|endoftext|>`` 0, ``<|pad|>`` 1, ``<|unk|>`` 2, then
    ``words`` in the given order), padding with ``<|pad|>`` to ``model_max_length``.

    Args:
        words: the vocabulary, lower-case, no duplicates (pass it sorted so ids never depend on data order).
        model_max_length: padding length (Q positions of the text encoder).
        begin: every text becomes ``<|endoftext|> words <|endoftext|>`` (``bos_token`` set; the toy diffusion
            decoders); ``False``: ``words <|endoftext|>`` and no ``bos_token`` (CLIP's pooling convention: the toy
            image encoder's text tower pools at the end token).

    Raises:
        ValueError: a word repeats or collides with a special token.
    """
    vocab = {tok: i for i, tok in enumerate([BOS_EOS, PAD, UNK, *words])}
    if len(vocab) != len(words) + 3:
        raise ValueError("word_level_tokenizer: the words must be distinct and differ from the special tokens")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    lead = f"{BOS_EOS} " if begin else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{lead}$A {BOS_EOS}", pair=f"{lead}$A {BOS_EOS} $B {BOS_EOS}",
        special_tokens=[(BOS_EOS, vocab[BOS_EOS])],
    )
    specials = {"bos_token": BOS_EOS} if begin else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **specials, eos_token=BOS_EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length,
    )
