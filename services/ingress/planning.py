"""Request planning: a validated request -> a :class:`ChatPlan` ready to run.

Turns from messages (media decoded by :class:`services.ingress.media_input.MediaReader`; an assistant message's
references to our own artifacts resolved by :class:`services.ingress.history.AssistantTurn`), the system prompt,
the requested modalities, decoder options merged over the preset's defaults and checked against the server's
limits, grounding tasks, and seeds (medium k of an answer gets ``seed + k``; the one-medium endpoints render
one group with seeds ``seed + k`` for k < n). Every refusal here is a 4xx naming the field.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from polymodal.config import DecoderDefaults, PresetConfig
from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart, Turn, input_images

from services.errors import APIError, bad_request
from services.ingress.history import AssistantTurn
from services.ingress.media_input import MediaReader
from services.protocol import Backend, LLMRequest
from services.schemas import ChatCompletionRequest, TextContent
from services.settings import ServerSettings

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# The images / audio / videos endpoints only need the LLM's short lead-in (returned as revised_prompt) and
# the group it emits or that is then forced: more text would only delay the medium. At most this many
# tokens, and at most the preset's generation.prompt_lead_in_tokens.
PROMPT_ENDPOINT_MAX_NEW_TOKENS = 32


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
    deadline: float | None = None  # time.monotonic() by which the answer is due (retries stop before it)
    on_complete: Callable[[], None] | None = None  # called once the plan ran to its end (admission's estimate)


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
    async def build_turns(self, req: ChatCompletionRequest) -> tuple[list[Turn], str | None]:
        """Messages -> turns (media decoded) and the system prompt (system/developer messages joined).

        Raises:
            APIError: 400 (bad conversation or medium), 413 (medium too large).
        """
        if len(req.messages) > self.limits.max_messages:
            raise bad_request(f"at most {self.limits.max_messages} messages", param="messages")
        system: list[str] = []
        turns: list[Turn] = []
        n_media = 0
        for i, msg in enumerate(req.messages):
            p = f"messages[{i}]"
            content = msg.content
            if msg.role in ("system", "developer"):
                if isinstance(content, list):
                    if any(not isinstance(c, TextContent) for c in content):
                        raise bad_request(f"{p}.content: a {msg.role} message may only hold text", param=f"{p}.content")
                    system.append("".join(c.text for c in content))
                elif content:
                    system.append(content)
                continue
            parts: list[TextPart | MediaPart] = []
            if msg.role == "assistant":
                parts = await AssistantTurn(self.media, p, self.limits.max_media_inputs - n_media).read(msg)
                n_media += sum(isinstance(x, MediaPart) for x in parts)
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
            if not parts:
                article = "an" if msg.role == "assistant" else "a"
                raise bad_request(f"{p}.content: {article} {msg.role} message needs content", param=f"{p}.content")
            turns.append(Turn(msg.role, tuple(parts)))
        if not turns or turns[-1].role != "user":
            raise bad_request("the last message must be the user's (system messages aside)", param="messages")
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
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only {'type': 'text'} is supported", param="response_format",
                              code="unsupported_parameter")
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise bad_request(f"{name}: tool calling is not supported by this model", param=name,
                                  code="unsupported_parameter")
        if req.logprobs:
            raise bad_request("logprobs: not supported by this server", param="logprobs",
                              code="unsupported_parameter")
        requested, allowed = self.modalities(req)
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is not None and max_new > self.limits.max_new_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{param} must be <= {self.limits.max_new_tokens} on this server, got {max_new}",
                              param=param, code="invalid_value")
        options = {}
        for m in self.backend.output_modalities:
            # the request's options field of this medium (``image``, ``audio``, ``video``; none for a modality
            # the request schema has no field for: the preset's defaults)
            given: BaseModel | None = getattr(req, m.value, None)
            overrides = given.model_dump(exclude_unset=True, exclude_none=True) if given is not None else {}
            options[m] = self.decoder_options(m, overrides, f"{m.value}.")
        self.check_grounding(req)
        turns, system = await self.build_turns(req)
        if req.box_overlay and not input_images(turns):
            raise bad_request("box_overlay: the messages hold no image to draw the boxes on", param="box_overlay",
                              code="invalid_value")
        base_seed = self.seed(req.seed)
        return ChatPlan(
            request_id=request_id,
            llm=LLMRequest(request_id, tuple(turns), requested, max_new, req.temperature, req.top_p,
                           base_seed, system, task=req.task, allowed_modalities=allowed),
            options=options,
            base_seed=base_seed,
            requested=requested,
            media_format=req.media_format or self.settings.default_media_format,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            box_overlay=req.box_overlay,
            allowed=allowed,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )

    def modalities(self, req: ChatCompletionRequest) -> tuple[tuple[Modality, ...], tuple[Modality, ...]]:
        """``modalities`` and ``audio`` -> (the media the answer must contain, the media it may contain).

        DESIGN.md's one rule: ``modalities``, when given, is the floor and the ceiling (``["text"]`` alone: no
        media at all); absent, nothing is required and the preset's ``generation.media_without_modalities``
        decides the ceiling (``model_decides``: every medium this server has a decoder for, as the model
        chooses; ``none``: text only). ``audio.voice`` (a spoken answer) is not available yet.

        Raises:
            APIError: 400 naming ``modalities`` (an unknown medium, one this server cannot produce) or
            ``audio.voice``.
        """
        if req.audio is not None and req.audio.voice is not None:
            raise bad_request("audio.voice: a spoken answer (speech output) is not available yet on this server; "
                              "leave out audio.voice (\"audio\" in modalities asks for a generated sound)",
                              param="audio.voice", code="unsupported_parameter")
        if req.modalities is None:
            return (), self.unasked_ceiling(self.backend.preset)
        requested: list[Modality] = []
        for k, name in enumerate(req.modalities):
            if str(name).lower() == "text":
                continue
            try:
                m = Modality.parse(name)
            except ValueError:
                raise bad_request(f"modalities[{k}]: unknown modality {name!r}; choose from text, "
                                  + ", ".join(x.value for x in Modality), param="modalities") from None
            self.require_output(m, "modalities")
            if m not in requested:
                requested.append(m)
        return tuple(requested), tuple(requested)

    def unasked_ceiling(self, preset: PresetConfig) -> tuple[Modality, ...]:
        """The media an answer may contain when the request sets no ``modalities`` (the preset's policy)."""
        if preset.generation.media_without_modalities == "none":
            return ()
        return tuple(self.backend.output_modalities)

    def check_grounding(self, req: ChatCompletionRequest) -> None:
        """``task`` / ``box_overlay`` need a grounding model; ``task`` one of its tasks.

        Raises:
            APIError: 400 naming the field (and the tasks to choose from).
        """
        grounding = self.backend.preset.grounding
        for param, asked in (("task", req.task is not None), ("box_overlay", req.box_overlay)):
            if asked and grounding is None:
                raise bad_request(f"{param}: this model has no grounding (its preset has no grounding tokens)",
                                  param=param, code="unsupported_parameter")
        if req.task is not None and req.task not in grounding.tasks:
            raise bad_request(f"task: unknown task {req.task!r}; choose from: {', '.join(grounding.tasks)}",
                              param="task", code="invalid_value")

    def plan_prompt(self, prompt: str, modality: Modality, options: DecoderDefaults, seed: int | None, n: int,
                    request_id: str, fmt: str) -> ChatPlan:
        """A one-medium request (images / audio / videos endpoints): the prompt through the LLM with the
        modality's group required; the first group of that modality is rendered ``n`` times with seeds
        ``seed + k``."""
        base_seed = self.seed(seed)
        llm = LLMRequest(request_id, (Turn("user", (TextPart(prompt),)),), (modality,),
                         min(PROMPT_ENDPOINT_MAX_NEW_TOKENS, self.backend.preset.generation.prompt_lead_in_tokens,
                             self.limits.max_new_tokens), None, None, base_seed, allowed_modalities=(modality,))
        return ChatPlan(request_id, llm, {modality: options}, base_seed, (modality,), fmt,
                        variant_seeds=tuple(base_seed + k for k in range(n)), allowed=(modality,),
                        deadline=time.monotonic() + self.settings.request_timeout_s)
