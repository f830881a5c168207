"""Per-step token masks from a grammar: the tokenizer adapter, the compile cache, the per-request matcher.

Engine: llguidance (``LLMatcher``: Earley parser + lexer over the tokenizer's token trie; computing a mask
for a 49k vocabulary takes tens of µs). One :class:`GrammarCompiler` per tokenizer compiles each
:class:`~polymodal.constrained.grammars.Grammar` once (LRU cache keyed by the grammar's canonical text,
bounded by :class:`~polymodal.constrained.grammars.ConstraintLimits`) into a template matcher; each request
gets a :class:`GrammarConstraint`, a cheap copy of the template, that the decode loop drives:

    c = compiler.matcher(grammar)
    for each step:
        logits = model(...)            # (V,) float, V >= the tokenizer's size (padded embedding rows)
        c.mask(logits)                 # disallowed ids -> -inf, in place
        tid = sample(logits)
        if tid in eos_ids: stop        # only offered when c.allows_eos()
        c.accept(tid)                  # raises TokenRejected if tid was masked
        if c.is_done(): stop           # finish_reason "stop"

The tokenizer's special added tokens (chat-template tokens, signal tokens ``<IMG0>``..., markers) other
than EOS are never allowed under a grammar, and neither are embedding rows beyond the tokenizer.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from polymodal.constrained.errors import CompileTimeout, ConstraintError, InvalidSchema, TokenRejected
from polymodal.constrained.grammars import ConstraintLimits, Grammar, _engine_message, blame


@runtime_checkable
class TokenConstraint(Protocol):
    """What the decode loop needs from a per-request constraint (one step = mask, sample, accept)."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of disallowed token ids to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token; raises :class:`TokenRejected` if it was not allowed."""

    def is_done(self) -> bool:
        """The output is complete and nothing may follow: end with ``finish_reason="stop"``."""

    def allows_eos(self) -> bool:
        """The output so far is complete (EOS may end it now)."""


# --------------------------------------------------------------------------------------------------
# Tokenizer adapter


@dataclass(frozen=True)
class TokenizerAdapter:
    """llguidance's view of a transformers fast tokenizer, built once per tokenizer (~0.4 s for 49k tokens).

    Attributes:
        llg: the ``llguidance.LLTokenizer``.
        vocab_size: ids the grammar knows (the tokenizer's length, added tokens included); logits rows at
            and beyond it are never allowed.
        eos_ids: ids that end the answer; allowed when the grammar accepts.
        banned_ids: special added tokens other than EOS (never allowed under a grammar).
        keep_words: (W,) int32, W = ceil(vocab_size / 32): all bits set except the banned ids' (ANDed
            into every mask).
    """

    llg: object
    vocab_size: int
    eos_ids: tuple[int, ...]
    banned_ids: tuple[int, ...]
    keep_words: torch.Tensor


_ADAPTERS: "weakref.WeakKeyDictionary[object, dict[tuple, TokenizerAdapter]]" = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def tokenizer_adapter(tokenizer, eos_ids: Iterable[int] | None = None) -> TokenizerAdapter:
    """The (cached) :class:`TokenizerAdapter` of ``tokenizer`` with these EOS ids.

    Cached per tokenizer object and keyed by its length and the EOS ids, so tokens added later (the engine
    adds signal tokens after loading) give a fresh adapter.

    Args:
        tokenizer: a transformers fast tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``).
        eos_ids: ids that may end a constrained answer (the engine's EOS set: EOS plus chat stop tokens);
            default the tokenizer's ``eos_token_id``.
    Raises:
        ValueError: a slow tokenizer (llguidance needs the Rust ``tokenizers`` serialisation), or no EOS.
    """
    import llguidance.hf

    wanted = eos_ids if eos_ids is not None else [tokenizer.eos_token_id]
    eos = tuple(sorted({int(i) for i in wanted if i is not None}))
    if not eos:
        raise ValueError("a constrained decode needs at least one EOS id; the tokenizer has no eos_token_id")
    key = (len(tokenizer), eos)
    with _ADAPTERS_LOCK:
        hit = _ADAPTERS.get(tokenizer, {}).get(key)
    if hit is not None:
        return hit
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(f"constrained decoding needs a fast tokenizer; got {type(tokenizer).__name__}")
    llg = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos))
    vocab = int(llg.vocab_size)
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    banned = tuple(sorted(i for i in special if i not in eos and i < vocab))
    words = (vocab + 31) // 32
    bits = torch.ones(words * 32, dtype=torch.bool)
    bits[list(banned)] = False
    adapter = TokenizerAdapter(llg, vocab, eos, banned, _pack(bits))
    with _ADAPTERS_LOCK:
        _ADAPTERS.setdefault(tokenizer, {})[key] = adapter
    return adapter


# (256, 8) float32: row b holds, for bit j of byte b, -inf where the bit is set (banned) else 0
_BIAS_BY_BYTE = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, np.float32(-np.inf),
                         np.float32(0)).astype(np.float32)
_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit j of a byte


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """(32 W,) bool -> (W,) int32, bit i of the vocabulary at word i // 32, bit i % 32 (llguidance's layout)."""
    if bits.numel() % 32:
        raise ValueError(f"bit vector length {bits.numel()} is not a multiple of 32")
    b = bits.view(-1, 8).to(torch.uint8) << _SHIFTS  # bytes in little-endian order, bits disjoint: sum = or
    return b.sum(1, dtype=torch.uint8).view(torch.int32).clone()


def unpack_bitmask(words: torch.Tensor, n: int) -> torch.Tensor:
    """(W,) int32 bitmask -> (n,) bool, n <= 32 W, on ``words``' device (vectorised, no Python loop).

    CPU: numpy's ``unpackbits`` (~10 µs for a 49k vocabulary); other devices: shifts on the device.
    """
    if words.device.type == "cpu":
        bits = np.unpackbits(words.contiguous().numpy().view(np.uint8), bitorder="little")[:n]
        return torch.from_numpy(bits).view(torch.bool)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    return ((words.contiguous().view(torch.uint8).unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


# --------------------------------------------------------------------------------------------------
# Compiler with an LRU cache

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled for one tokenizer: a template matcher that requests copy.

    Attributes:
        keep_words: (W,) int32 ANDed into every mask: the adapter's, with the grammar's own special ids
            (``Grammar.special_ids``) let through.
    """

    grammar: Grammar
    template: object  # llguidance.LLMatcher, never advanced
    keep_words: torch.Tensor
    banned: frozenset[int]


class GrammarCompiler:
    """Compiles grammars for one tokenizer, caching them (LRU, ``limits.max_entries``).

    Args:
        tokenizer: a transformers fast tokenizer (after the engine added its tokens).
        eos_ids: see :func:`tokenizer_adapter`.
        limits: cache size, compile time bound (schema size is bounded when the grammar is built).
    Attributes:
        compiles: grammars compiled so far (cache misses that ran the engine); ``hits``: cache hits.
    """

    def __init__(self, tokenizer, *, eos_ids: Iterable[int] | None = None,
                 limits: ConstraintLimits = ConstraintLimits()):
        self.adapter = tokenizer_adapter(tokenizer, eos_ids)
        self.limits = limits
        self._cache: OrderedDict[str, CompiledGrammar | ConstraintError] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _build(self, grammar: Grammar):
        import llguidance

        m = llguidance.LLMatcher(
            self.adapter.llg,
            llguidance.LLMatcher.grammar_from_lark(grammar.text),
            log_level=0,
            limits=llguidance.LLParserLimits(verbose_errors=False),
        )
        if not m.is_error():
            m.deep_copy().compute_bitmask()  # builds the lexer's first states (the template stays unadvanced)
        return m

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """The compiled ``grammar`` (from the cache when its text was compiled before).

        Raises:
            InvalidSchema: the engine refuses the grammar (cached: the same input fails fast again); the
                ``param`` names the request field (for tools, the offending tool's parameters).
            CompileTimeout: longer than ``limits.compile_timeout_s`` (not cached).
        """
        with self._lock:
            hit = self._cache.get(grammar.text)
            if hit is not None:
                self._cache.move_to_end(grammar.text)
                self.hits += 1
        if hit is not None:
            if isinstance(hit, ConstraintError):
                raise hit
            return hit
        fut = _EXECUTOR.submit(self._build, grammar)
        try:
            m = fut.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise CompileTimeout(f"compiling the schema took over {self.limits.compile_timeout_s:g} s",
                                 param=grammar.param) from None
        self.compiles += 1
        if m.is_error():
            msg = m.get_error()
            out: CompiledGrammar | ConstraintError = InvalidSchema(_engine_message([msg]), param=blame(grammar, [msg]))
        else:
            keep, banned = self.adapter.keep_words, frozenset(self.adapter.banned_ids)
            if grammar.special_ids:
                bits = unpack_bitmask(keep, keep.numel() * 32).clone()
                bits[[i for i in grammar.special_ids if i < self.adapter.vocab_size]] = True
                keep, banned = _pack(bits), banned - set(grammar.special_ids)
            out = CompiledGrammar(grammar, m, keep, banned)
        with self._lock:
            self._cache[grammar.text] = out
            self._cache.move_to_end(grammar.text)
            while len(self._cache) > self.limits.max_entries:
                self._cache.popitem(last=False)
        if isinstance(out, ConstraintError):
            raise out
        return out

    def matcher(self, grammar: Grammar) -> "GrammarConstraint":
        """A fresh per-request :class:`GrammarConstraint` (compiles or hits the cache).

        Raises:
            ConstraintError: see :meth:`compile`.
        """
        return GrammarConstraint(self.compile(grammar), self.adapter)


_COMPILERS: "weakref.WeakKeyDictionary[object, dict[tuple, GrammarCompiler]]" = weakref.WeakKeyDictionary()


def compiler_for(tokenizer, *, eos_ids: Iterable[int] | None = None,
                 limits: ConstraintLimits = ConstraintLimits()) -> GrammarCompiler:
    """The shared :class:`GrammarCompiler` of a tokenizer (one cache per tokenizer, EOS set and limits)."""
    key = (len(tokenizer), tuple(sorted(set(eos_ids))) if eos_ids is not None else None, limits)
    with _ADAPTERS_LOCK:
        c = _COMPILERS.get(tokenizer, {}).get(key)
    if c is None:
        c = GrammarCompiler(tokenizer, eos_ids=eos_ids, limits=limits)
        with _ADAPTERS_LOCK:
            c = _COMPILERS.setdefault(tokenizer, {}).setdefault(key, c)
    return c


# --------------------------------------------------------------------------------------------------
# Per-request matcher


class GrammarConstraint:
    """One request's grammar state; implements :class:`TokenConstraint`.

    Not thread-safe (one decode loop drives it). Build with :meth:`GrammarCompiler.matcher`.
    """

    def __init__(self, compiled: CompiledGrammar, adapter: TokenizerAdapter):
        self.grammar = compiled.grammar
        self.adapter = adapter
        self._m = compiled.template.deep_copy()
        self._words = torch.zeros((1, adapter.keep_words.numel()), dtype=torch.int32)  # llguidance writes here
        self._keep = compiled.keep_words
        self._banned = compiled.banned
        self.tokens: list[int] = []

    # ---------------------------------------------------------------------------------------------
    def _fill(self) -> torch.Tensor:
        if self._m.is_error():
            raise TokenRejected(f"the grammar matcher is in an error state: {self._m.get_error()[:300]}")
        v = self._words[0]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
        v &= self._keep
        return v

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the ids allowed next (a copy; for tests and debugging)."""
        return unpack_bitmask(self._fill(), self.adapter.vocab_size).clone()

    def mask(self, logits: torch.Tensor) -> None:
        """Disallowed ids of ``logits`` (V,) -> -inf in place; rows ``>= vocab_size`` (padding) always.

        The bitmask is computed on the CPU (llguidance) and unpacked where ``logits`` lives (a 6 KB copy
        for a 49k vocabulary on a GPU).

        Raises:
            ValueError: ``logits`` is not 1-D or has fewer rows than the tokenizer.
            TokenRejected: the matcher is in an error state.
        """
        n = self.adapter.vocab_size
        if logits.dim() != 1 or logits.shape[0] < n:
            raise ValueError(f"logits must be (V,) with V >= {n} (the tokenizer's size), got {tuple(logits.shape)}")
        banned = ~self._fill()  # bits set = disallowed
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            # branch-free: each bitmask byte selects 8 additive biases (0 or -inf); ~40 µs for 49k ids
            # whatever the mask's density, where masked_fill_ takes 60-800 µs (bench/constrained_mask.py)
            bias = np.take(_BIAS_BY_BYTE, banned.numpy().view(np.uint8), axis=0).reshape(-1)[:n]
            view = logits[:n].numpy()
            np.add(view, bias, out=view)
        else:
            logits[:n].masked_fill_(unpack_bitmask(banned.to(logits.device), n), float("-inf"))
        if logits.shape[0] > n:
            logits[n:] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id`` (EOS included: then the matcher stops).

        Raises:
            TokenRejected: the token is not allowed here (the matcher is then unusable).
        """
        tid = int(token_id)
        if tid < 0 or tid >= self.adapter.vocab_size or tid in self._banned:
            raise TokenRejected(f"token {tid} is never allowed under a grammar (special token or padding row)")
        if not self._m.consume_token(tid):
            raise TokenRejected(f"token {tid} does not fit the grammar here: {self._m.get_error()[:300]}")
        self.tokens.append(tid)

    def is_done(self) -> bool:
        """The grammar is complete and admits nothing more (only EOS): end the answer."""
        return self._m.is_stopped() and not self._m.is_error()

    def allows_eos(self) -> bool:
        return self._m.is_accepting() and not self._m.is_error()

    def free_text_end(self, text: str) -> int:
        """How much of the answer ``text`` is free text, where a chat template's stop strings may end it: up to
        the first ``Grammar.free_text_until`` (an ``auto`` tool-call answer's opening tag), or none of it (JSON,
        forced calls). See :mod:`polymodal.llm`."""
        until = self.grammar.free_text_until
        if until is None:
            return 0
        at = text.find(until)
        return len(text) if at < 0 else at

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here (e.g. the rest of ``"arguments": ``); may be empty."""
        return list(self._m.compute_ff_tokens())


def constraint_for(tokenizer, grammar: Grammar | None, *, eos_ids: Sequence[int] | None = None,
                   limits: ConstraintLimits = ConstraintLimits()) -> GrammarConstraint | None:
    """Convenience: a per-request constraint from the tokenizer's shared compiler (``None`` for no grammar).

    Raises:
        ConstraintError: see :meth:`GrammarCompiler.compile`.
    """
    if grammar is None:
        return None
    return compiler_for(tokenizer, eos_ids=eos_ids, limits=limits).matcher(grammar)
