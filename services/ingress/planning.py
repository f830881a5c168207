"""Request planning: a validated request -> a :class:`ChatPlan` ready to run.

Turns from messages (media decoded by :class:`services.ingress.media_input.MediaReader`; an assistant message's
references to our own artifacts resolved by :class:`services.ingress.history.AssistantTurn`), the system prompt,
the requested modalities, decoder options merged over the preset's defaults and checked against the server's
limits, grounding tasks, seeds (medium k of an answer gets ``seed + k``; the one-medium endpoints render
one group with seeds ``seed + k`` for k < n), and the output formats (``response_format``, ``tools``,
``tool_choice``, ``logprobs``: :mod:`services.ingress.formats` builds and checks their grammar without a
tokenizer, so a bad schema is a 400 before any model work). Every refusal here is a 4xx naming the field.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from polymodal.config import DecoderDefaults, PresetConfig
from polymodal.modality import Modality
from polymodal.types import EditSource, MediaPart, TextPart, ToolCall, Turn, input_images

from services.errors import APIError, bad_request
from services.ingress.edit_sources import check_edit_options, decoder_edit_options, resolve_edit
from services.ingress.edit_sources import edit_source as edit_source_of
from services.ingress.formats import history_tool_calls, output_format, tool_turn
from services.ingress.history import AssistantTurn
from services.ingress.media_input import MediaReader
from services.ingress.spoken import SpeechPlan, plan_speech
from services.ingress.spoken_input import InputTranscript, SpokenInput
from services.ingress.skill_loop import SkillPlan, plan_skills
from services.protocol import Backend, LLMRequest
from services.schemas import ChatCompletionRequest, TextContent
from services.settings import ServerSettings

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# The images / audio / videos endpoints only need the LLM's short lead-in (returned as revised_prompt) and
# the group it emits or that is then forced: more text would only delay the medium. At most this many
# tokens, and at most the preset's generation.prompt_lead_in_tokens.
PROMPT_ENDPOINT_MAX_NEW_TOKENS = 32
SPOKEN_ANSWER_SLOT = "audio"
"""OpenAI's message field a spoken answer fills (``message.audio``): the medium whose spec names this
``message_slot`` is the one ``audio.voice`` satisfies with speech instead of a generated medium."""


def new_id(prefix: str) -> str:
    """``{prefix}-{32 hex}``: a request id (``chatcmpl``, ``img``, ``aud``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def request_kind(endpoint: str, modalities: list[str] | None = None) -> str:
    """What admission estimates latency by: the endpoint and the media asked for (``chat``, ``chat:image``,
    ``chat:audio,image``, ``img``, ``aud``)."""
    media = sorted({str(m).lower() for m in modalities or () if str(m).lower() != "text"})
    return f"{endpoint}:{','.join(media)}" if media else endpoint


@dataclass
class ChatPlan:
    """A validated chat request, ready to run."""

    request_id: str
    llm: LLMRequest
    options: dict[Modality, DecoderDefaults]
    base_seed: int
    requested: tuple[Modality, ...]
    media_format: str
    include_usage: bool = False
    variant_seeds: tuple[int, ...] = ()  # one-medium endpoints: render the first group once per seed
    box_overlay: bool = False
    allowed: tuple[Modality, ...] = ()  # the ceiling: media the answer may contain (the LLM masks the others)
    json_content: bool = False  # response_format JSON: content is the JSON alone (media only in the arrays)
    deadline: float | None = None  # time.monotonic() by which the answer is due (retries stop before it)
    started_s: float = field(default_factory=time.monotonic)  # time.monotonic() when it was planned (metrics)
    on_complete: Callable[[], None] | None = None  # called once the plan ran to its end (admission's estimate)
    edit_source: EditSource | None = None  # edits: the groups of its modality render from it (issue #27)
    speech: SpeechPlan | None = None  # the answer spoken (``audio.voice``), or not
    skills: SkillPlan = SkillPlan()  # server-side skills enabled (issue #23: the loop, services.ingress.skill_loop)
    input_transcripts: tuple[InputTranscript, ...] = ()  # what was heard in the spoken input (spoken_input)
    lead_in_budget: bool = False  # a chat edit whose token budget is the preset's lead-in, not the client's max_tokens

    def finish_reason(self, reason: str) -> str:
        """The LLM's finish ``reason`` as OpenAI's ``finish_reason``: ``stop``, ``length``, ``tool_calls``; any other
        (``signal_loop``) is ``stop``, and so is ``length`` under a lead-in budget (the edited medium's group closed
        the answer where the server set its end; nothing the client asked for was cut)."""
        if reason == "length" and self.lead_in_budget:
            return "stop"
        return reason if reason in ("stop", "length", "tool_calls") else "stop"


class Planner:
    """Validates requests against the model and the server's limits and plans them.

    Args:
        backend: the model (preset, input / output modalities).
        settings: limits and defaults.
        media: reads the request's media parts.
        model_name: the ``model`` id this server answers to.
    """

    def __init__(self, backend: Backend, settings: ServerSettings, media: MediaReader, model_name: str):
        self.backend = backend
        self.settings = settings
        self.limits = settings.limits
        self.media = media
        self.model_name = model_name
        self.edit_options_cache: dict[Modality, tuple[str, ...]] = {}  # edit_sources.decoder_edit_options

    # ---- model / modalities ----------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is None or model == self.model_name:
            return
        raise APIError(400, f"unknown model {model!r}; this server serves {self.model_name!r} (see /v1/models)",
                       param="model", code="model_not_found")

    def require_output(self, modality: Modality, param: str) -> None:
        if modality not in self.backend.output_modalities:
            served = ", ".join(m.value for m in self.backend.output_modalities) or "none"
            raise bad_request(f"this model cannot produce {modality.value} (it produces text and: {served})",
                              param=param, code="unsupported_modality")

    # ---- options ---------------------------------------------------------------------------------
    def decoder_options(self, modality: Modality, overrides: dict[str, Any], prefix: str) -> DecoderDefaults:
        """The preset's defaults with the fields the request set; each checked against the limits.

        Raises:
            APIError: 400 naming ``prefix + field``.
        """
        lim = self.limits
        bounds = {
            "num_inference_steps": lim.max_inference_steps, "height_px": lim.max_height_px,
            "width_px": lim.max_width_px, "num_frames": lim.max_num_frames, "fps": lim.max_fps,
            "duration_s": lim.max_duration_s,
        }
        for k, v in overrides.items():
            if k in bounds and v is not None and v > bounds[k]:
                raise bad_request(f"{prefix}{k} must be <= {bounds[k]} on this server, got {v}",
                                  param=f"{prefix}{k}", code="invalid_value")
        defaults = self.backend.preset.decoders[modality].defaults
        applies = modality.spec.option_fields  # the DecoderDefaults fields of this medium
        merged = {**defaults.model_dump(), **{k: v for k, v in overrides.items() if k in applies}}
        try:
            return DecoderDefaults.model_validate(merged)
        except ValidationError as e:
            err = e.errors()[0]
            param = prefix + ".".join(str(x) for x in err["loc"])
            raise bad_request(f"{param}: {err['msg']}", param=param, code="invalid_value") from None

    def parse_size(self, size: str | None, param: str = "size") -> dict[str, int]:
        """``"WxH"`` -> ``{"width_px", "height_px"}`` (``None`` / ``"auto"``: ``{}``).

        Raises:
            APIError: 400 for a malformed size, one not a multiple of 8 or over the limits.
        """
        if size is None or size.strip().lower() == "auto":
            return {}
        m = _SIZE.match(size)
        if not m:
            raise bad_request(f"size must be 'WIDTHxHEIGHT' (e.g. '256x256') or 'auto', got {size!r}", param=param)
        w, h = int(m.group(1)), int(m.group(2))
        for v, name in ((w, "width"), (h, "height")):
            if v < 8 or v % 8:
                raise bad_request(f"size: the {name} must be a multiple of 8 and >= 8, got {v}", param=param)
        if w > self.limits.max_width_px or h > self.limits.max_height_px:
            raise bad_request(f"size {w}x{h} exceeds the limit {self.limits.max_width_px}x{self.limits.max_height_px}",
                              param=param)
        return {"width_px": w, "height_px": h}

    # ---- turns -----------------------------------------------------------------------------------
    async def build_turns(self, req: ChatCompletionRequest,
                          spoken: SpokenInput | None = None) -> tuple[list[Turn], str | None]:
        """Messages -> turns (media decoded) and the system prompt (system/developer messages joined); each
        user medium is handed to ``spoken`` as soon as it is decoded (its transcription starts).

        Raises:
            APIError: 400 (bad conversation or medium), 413 (medium too large).
        """
        if len(req.messages) > self.limits.max_messages:
            raise bad_request(f"at most {self.limits.max_messages} messages", param="messages")
        system: list[str] = []
        turns: list[Turn] = []
        n_media = 0
        call_ids: set[str] = set()  # the tool_calls ids of the assistant messages so far
        for i, msg in enumerate(req.messages):
            p = f"messages[{i}]"
            content = msg.content
            if msg.tool_calls and msg.role != "assistant":
                raise bad_request(f"{p}.tool_calls: only an assistant message carries tool calls",
                                  param=f"{p}.tool_calls")
            if msg.tool_call_id is not None and msg.role != "tool":
                raise bad_request(f"{p}.tool_call_id: only a tool message answers a tool call",
                                  param=f"{p}.tool_call_id")
            if msg.role == "tool":
                turns.append(tool_turn(msg, p, call_ids))
                continue
            if msg.role in ("system", "developer"):
                if isinstance(content, list):
                    if any(not isinstance(c, TextContent) for c in content):
                        raise bad_request(f"{p}.content: a {msg.role} message may only hold text", param=f"{p}.content")
                    system.append("".join(c.text for c in content))
                elif content:
                    system.append(content)
                continue
            parts: list[TextPart | MediaPart] = []
            calls: tuple[ToolCall, ...] = ()
            if msg.role == "assistant":
                parts = await AssistantTurn(self.media, p, self.limits.max_media_inputs - n_media).read(msg)
                n_media += sum(isinstance(x, MediaPart) for x in parts)
                calls = history_tool_calls(msg, p, call_ids)
            elif isinstance(content, str):
                parts.append(TextPart(content))
            elif content:
                for j, c in enumerate(content):
                    pp = f"{p}.content[{j}]"
                    if isinstance(c, TextContent):
                        parts.append(TextPart(c.text))
                        continue
                    n_media += 1
                    if n_media > self.limits.max_media_inputs:
                        raise bad_request(f"at most {self.limits.max_media_inputs} media inputs per request",
                                          param=pp, code="too_many_media")
                    parts.append(await self.media.read_part(c, pp))
                    if spoken is not None:
                        spoken.heard(parts[-1], i, j)
            if not parts and not calls:
                article = "an" if msg.role == "assistant" else "a"
                raise bad_request(f"{p}.content: {article} {msg.role} message needs content", param=f"{p}.content")
            turns.append(Turn(msg.role, tuple(parts), tool_calls=calls))
        if not turns or turns[-1].role not in ("user", "tool"):
            raise bad_request("the last message must be the user's or a tool result (system messages aside)",
                              param="messages")
        return turns, ("\n".join(system) if system else None)

    # ---- plans -----------------------------------------------------------------------------------
    @staticmethod
    def seed(seed: int | None) -> int:
        """The request's seed, or a new random one."""
        return secrets.randbelow(2**31 - 1) if seed is None else int(seed)

    async def plan_chat(self, req: ChatCompletionRequest, request_id: str) -> ChatPlan:
        """``POST /v1/chat/completions`` -> its plan.

        Raises:
            APIError: 400 naming the field (unknown model, unsupported parameter, modality, option over a limit,
            bad conversation or medium), 413 (medium too large).
        """
        self.check_model(req.model)
        for name in ("functions", "function_call"):
            if getattr(req, name):
                raise bad_request(f"{name}: the legacy function-calling fields are not supported; use tools and "
                                  "tool_choice", param=name, code="unsupported_parameter")
        requested, allowed = self.modalities(req)
        edit = None
        if req.edit is not None and req.edit is not False:  # the edited medium: in the answer's floor and ceiling
            edit = await resolve_edit(self.media, req.edit, req.modalities)
            m = edit.modality
            self.require_output(m, "edit")
            if req.modalities is not None and m not in requested:
                raise bad_request(f"edit: this edit answers with the edited {m.value}; add \"{m.value}\" to "
                                  "modalities", param="edit", code="invalid_value")
            requested = tuple(dict.fromkeys((*requested, m)))
            allowed = tuple(dict.fromkeys((*allowed, m)))
        speech = await plan_speech(self.backend, req)
        if req.skills is None and self.settings.brain is not None:  # the brain's tools by default (services.brain)
            req = req.model_copy(update={"skills": self.backend.default_skills(allowed)})
        sp, req = plan_skills(self.backend, req, allowed, self.settings.max_skill_rounds)  # + the skills' tools
        formats = output_format(req, () if sp.forced else requested, self.limits,  # a forced skill call:
                                self.backend.preset.chat.tool_format)  # the floor applies after it
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is not None and max_new > self.limits.max_new_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{param} must be <= {self.limits.max_new_tokens} on this server, got {max_new}",
                              param=param, code="invalid_value")
        lead_in_budget = False
        if edit is not None and "response_format" not in formats and "tools" not in formats:
            # a free-text edit is planned as /v1/images/edits plans one: at most the preset's lead-in before the edited
            # medium's group (toy: 0, the group opens the answer as its edit dialogues train it; with a lead-in its
            # words led "make it a circle" astray: bench/editing.py --quality --path chat)
            lead_in = min(self.backend.preset.generation.prompt_lead_in_tokens, self.limits.max_new_tokens)
            lead_in_budget = max_new is None or lead_in < max_new
            max_new = lead_in if lead_in_budget else max_new
        options = {}
        for m in Modality:
            # the request's options field of this medium (its spec's option fields: services.schemas.MEDIUM_OPTIONS;
            # none for a modality registered after the schema was made: the preset's defaults)
            given: BaseModel | None = getattr(req, m.value, None)
            overrides = given.model_dump(exclude_unset=True, exclude_none=True) if given is not None else {}
            overrides = {k: v for k, v in overrides.items() if k not in ("voice", "format")}  # not decoder options
            if m in self.backend.output_modalities:
                options[m] = self.decoder_options(m, overrides, f"{m.value}.")
            elif overrides:  # options nothing would read: refused, never silently ignored
                served = ", ".join(x.value for x in self.backend.output_modalities) or "none"
                raise bad_request(f"{m.value}: this model cannot produce {m.value}, so its options "
                                  f"({', '.join(overrides)}) would not be read (it produces text and: {served})",
                                  param=f"{m.value}.{next(iter(overrides))}", code="unsupported_parameter")
        self.check_grounding(req)
        spoken = SpokenInput(self.backend, request_id)  # spoken input: transcribed while the rest is planned
        try:
            turns, system = await self.build_turns(req, spoken)
            if req.box_overlay and not input_images(turns):
                raise bad_request("box_overlay: the messages hold no image to draw the boxes on",
                                  param="box_overlay", code="invalid_value")
            if edit is not None:
                given = getattr(req, edit.modality.value, None)
                check_edit_options(await decoder_edit_options(self.backend, edit.modality, self.edit_options_cache),
                                   edit.modality, given.model_dump(exclude_none=True) if given is not None else {},
                                   options[edit.modality], f"{edit.modality.value}.")
            edit_source = None if edit is None else await edit_source_of(self.media, edit, turns,
                                                                         options[edit.modality])
            turns, heard = await spoken.apply(turns)
        finally:
            await spoken.aclose()
        base_seed = self.seed(req.seed)
        return ChatPlan(
            request_id=request_id,
            llm=LLMRequest(request_id, tuple(turns), () if sp.forced else requested, max_new, req.temperature,
                           req.top_p, base_seed, system, task=req.task, allowed_modalities=allowed, **formats,
                           stream_text=bool(req.stream) or speech is not None),
            options=options,
            base_seed=base_seed,
            requested=requested,
            media_format=req.media_format or self.settings.default_media_format,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            box_overlay=req.box_overlay,
            allowed=allowed,
            json_content=formats.get("response_format") is not None,
            deadline=time.monotonic() + self.settings.request_timeout_s,
            edit_source=edit_source, skills=sp,
            speech=speech, input_transcripts=heard, lead_in_budget=lead_in_budget,
        )

    # ---- output formats (issue #22) ----------------------------------------------------------------
    def server_skill_names(self) -> tuple[str, ...]:
        """Server-side skills a named ``tool_choice`` may also name (the skills issue, #23, fills this hook; none
        are callable through ``tool_choice`` yet)."""
        return ()

    def modalities(self, req: ChatCompletionRequest) -> tuple[tuple[Modality, ...], tuple[Modality, ...]]:
        """``modalities`` and ``audio`` -> (the media the answer must contain, the media it may contain).

        DESIGN.md's one rule: ``modalities``, when given, is the floor and the ceiling (``["text"]`` alone: no
        media at all); absent, nothing is required and the preset's ``generation.media_without_modalities``
        decides the ceiling (``model_decides``: every medium this server has a decoder for, as the model
        chooses; ``none``: text only). ``audio`` with a ``voice`` asks for the answer spoken: then "audio" in
        ``modalities`` is satisfied by speech (see :meth:`speech`), and no generated sound is asked for or allowed.

        Raises:
            APIError: 400 naming ``modalities`` (an unknown medium, one this server cannot produce; ``audio.voice``
            without "audio" in ``modalities``).
        """
        spoken = req.audio is not None and req.audio.voice is not None

        def by_speech(m: Modality) -> bool:  # the medium whose answer slot (message.audio) a spoken answer fills
            return spoken and m.spec.message_slot == SPOKEN_ANSWER_SLOT

        if req.modalities is None:
            return (), tuple(m for m in self.unasked_ceiling(self.backend.preset) if not by_speech(m))
        requested: list[Modality] = []
        satisfied = False
        for k, name in enumerate(req.modalities):
            if str(name).lower() == "text":
                continue
            try:
                m = Modality.parse(name)
            except ValueError:
                raise bad_request(f"modalities[{k}]: unknown modality {name!r}; choose from text, "
                                  + ", ".join(x.value for x in Modality), param="modalities") from None
            if by_speech(m):
                satisfied = True
                continue
            self.require_output(m, "modalities")
            if m not in requested:
                requested.append(m)
        if spoken and not satisfied:
            raise bad_request("modalities: audio.voice asks for the answer spoken; add \"audio\" to modalities "
                              "(or leave out audio.voice)", param="modalities", code="invalid_value")
        return tuple(requested), tuple(requested)

    def unasked_ceiling(self, preset: PresetConfig) -> tuple[Modality, ...]:
        """The media an answer may contain when the request sets no ``modalities`` (the preset's policy)."""
        if preset.generation.media_without_modalities == "none":
            return ()
        return tuple(self.backend.output_modalities)

    def check_grounding(self, req: ChatCompletionRequest) -> None:
        """``task`` / ``box_overlay`` need a grounding model (or ``skills``: the overlay of their boxes and masks).

        Raises:
            APIError: 400 naming the field (and the tasks to choose from).
        """
        grounding = self.backend.preset.grounding
        for param, asked in (("task", req.task is not None), ("box_overlay", req.box_overlay and not req.skills)):
            if asked and grounding is None:
                raise bad_request(f"{param}: this model has no grounding (its preset has no grounding tokens)",
                                  param=param, code="unsupported_parameter")
        if req.task is not None and req.task not in grounding.tasks:
            raise bad_request(f"task: unknown task {req.task!r}; choose from: {', '.join(grounding.tasks)}",
                              param="task", code="invalid_value")

    def plan_prompt(self, prompt: str, modality: Modality, options: DecoderDefaults, seed: int | None, n: int,
                    request_id: str, fmt: str, *, media: tuple[MediaPart, ...] = (),
                    edit_source: EditSource | None = None) -> ChatPlan:
        """A one-medium request (images / audio / videos endpoints): the prompt through the LLM with the
        modality's group required; the first group of that modality is rendered ``n`` times with seeds
        ``seed + k``. ``media``: input media placed before the prompt in the user's turn (an edit's source
        image, when the model reads images); ``edit_source``: every variant renders from it (``/v1/images/edits``)."""
        base_seed = self.seed(seed)
        llm = LLMRequest(request_id, (Turn("user", (*media, TextPart(prompt))),), (modality,),
                         min(PROMPT_ENDPOINT_MAX_NEW_TOKENS, self.backend.preset.generation.prompt_lead_in_tokens,
                             self.limits.max_new_tokens), None, None, base_seed, allowed_modalities=(modality,),
                         stream_text=False)
        return ChatPlan(request_id, llm, {modality: options}, base_seed, (modality,), fmt,
                        variant_seeds=tuple(base_seed + k for k in range(n)), allowed=(modality,),
                        deadline=time.monotonic() + self.settings.request_timeout_s, edit_source=edit_source)
