"""An offline tokenizer for tiny presets and toy decoders (no hub access needed).

A byte-level BPE trained, deterministically and in milliseconds, on a small built-in English corpus with
the ``tokenizers`` library. Any text round-trips (byte-level), so it serves as the tokenizer of the tiny
LLM and of the tiny diffusion text encoders (CLIP-style, padded to ``model_max_length``).
"""

from __future__ import annotations

import copy
import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


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


def tiny_tokenizer(vocab_size: int = 512, model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Return a fresh offline tokenizer (``eos``/``bos`` ``<|endoftext|>``, ``pad`` ``<|pad|>``).

    Args:
        vocab_size: BPE vocabulary size before any added tokens.
        model_max_length: padding length used by diffusion text encoders (77 as CLIP).
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_trained(vocab_size)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=model_max_length,
    )
    return tok
