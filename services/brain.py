"""Zero-shot skill use (Visual ChatGPT; issue #25): an external OpenAI-compatible chat endpoint as the "brain".

Where it plugs in: one server setting, ``ServerSettings.brain`` (:class:`services.settings.BrainConfig`; the CLI's
``polymodal serve --brain-url URL --brain-model NAME [--brain-key-env VAR]``). With it, the ingress wraps its
backend in :class:`BrainBackend`: every chat generation goes to the brain instead of the preset's LLM; the
decoders, the skills, speech, the store stay the server's. The skill loop is the one of the skills issue
(:class:`services.ingress.running.Runner`): the brain's ``tool_calls`` are the loop's skill calls, each result goes
back to it as a ``tool`` message, until it answers in text; the answer has the chat shape (text, media, boxes, masks,
``message.skill_calls``). A request without ``skills`` gets the brain's default skills (:attr:`BrainConfig.skills`;
all the server runs whose media the answer may contain, the decoders as ``generate_image`` / ``_audio`` /
``_video`` among them).

The prompt manager (:func:`brain_body`): the system text :data:`BRAIN_SYSTEM` (or the config's) then the request's
own; each medium of the conversation written as a placeholder the brain can refer to (``[image 0: 64x64 px]``:
``image_index`` counts the images of the whole conversation, as the skills do); the skills as OpenAI ``tools``
(each skill's JSON schema as the function's parameters); ``tool_choice``, ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``response_format`` passed on.

Errors: a brain that cannot be reached (connection refused, timeout; after ``max_retries`` retries) or answers 429 /
503 -> 503 ``brain_unavailable`` (with ``Retry-After``); one that answers another error status or a body that is not a
chat completion -> 502 ``brain_error``. A call of an unknown tool or with bad arguments is not an HTTP error: the loop
gives the brain an error result (``unknown_skill`` / ``invalid_arguments``) and asks again, at most
``max_skill_rounds`` rounds (server setting, default 4; then the brain is asked once more without tools).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from polymodal.constrained.tools import new_call_id
from polymodal.modality import Modality
from polymodal.types import LLMResult, MediaPart, TextDelta, TextPart, ToolCall

from services.errors import APIError
from services.protocol import Backend, LLMEvent, LLMRequest, SkillOutput, SkillRequest
from services.settings import BrainConfig

log = logging.getLogger(__name__)

BRAIN_SYSTEM = (
    "You are the assistant of a service that can read and make images, sounds and videos through tools. You cannot "
    "see or hear media yourself: the user's media appear in the messages as placeholders such as "
    "[image 0: 64x64 px]; to look at one, call a tool with its index (image_index counts the images of the whole "
    "conversation from 0). To make an image, a sound or a video, call generate_image, generate_audio or "
    "generate_video with a short description in English. Each tool answers with a JSON result. Use the tools "
    "instead of guessing; when you have what you need, answer the user briefly in plain text from the results."
)
"""The prompt manager's default instructions (Visual ChatGPT's prefix, shortened for small brains)."""


def media_placeholder(part: MediaPart, index: int) -> str:
    """``[image 0: 64x64 px]``, ``[audio 0: 2.0 s]``, ``[video 0: 8 frames, 64x64 px]``: a medium as the brain
    reads it (``index``: its place among the conversation's media of its modality)."""
    m = Modality.parse(part.modality)
    shape = tuple(getattr(part.data, "shape", ()))
    if len(shape) == 1 and part.sample_rate_hz:  # a waveform (S,)
        return f"[{m.value} {index}: {shape[0] / part.sample_rate_hz:.1f} s]"
    if len(shape) == 4:  # frames (F, H, W, 3)
        return f"[{m.value} {index}: {shape[0]} frames, {shape[2]}x{shape[1]} px]"
    if len(shape) == 3:  # a picture (H, W, 3)
        return f"[{m.value} {index}: {shape[1]}x{shape[0]} px]"
    return f"[{m.value} {index}]"


def brain_messages(request: LLMRequest, system: str) -> list[dict[str, Any]]:
    """The conversation of ``request`` as OpenAI chat messages: ``system`` first (then the request's system text),
    media as placeholders (:func:`media_placeholder`), assistant ``tool_calls`` and ``tool`` results kept."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(
        s for s in (system, request.system or "") if s.strip())}]
    counts: dict[Modality, int] = {}
    for t in request.turns:
        pieces: list[str] = []
        for p in t.parts:
            if isinstance(p, TextPart):
                pieces.append(p.text)
            elif isinstance(p, MediaPart):
                m = Modality.parse(p.modality)
                pieces.append(media_placeholder(p, counts.get(m, 0)))
                counts[m] = counts.get(m, 0) + 1
        text = " ".join(x.strip() for x in pieces if x.strip())
        if t.role == "tool":
            msgs.append({"role": "tool", "tool_call_id": t.tool_call_id, "content": text})
        elif t.role == "assistant" and t.tool_calls:
            msgs.append({"role": "assistant", "content": text or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in t.tool_calls]})
        else:
            msgs.append({"role": t.role, "content": text})
    return msgs


def brain_body(request: LLMRequest, cfg: BrainConfig) -> dict[str, Any]:
    """The ``POST /chat/completions`` body the brain gets for one generation of the loop."""
    body: dict[str, Any] = {"model": cfg.model, "messages": brain_messages(request, cfg.system or BRAIN_SYSTEM),
                            "stream": False}
    if request.tools:
        body["tools"] = [t.openai_dict() for t in request.tools]
        c = request.tool_choice
        if c is not None and c.mode == "function":
            body["tool_choice"] = {"type": "function", "function": {"name": c.name}}
        elif c is not None:
            body["tool_choice"] = c.mode
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    for key, value in (("max_tokens", request.max_new_tokens), ("temperature", request.temperature),
                       ("top_p", request.top_p), ("seed", request.seed),
                       ("response_format", request.response_format)):
        if value is not None:
            body[key] = value
    return body


def parse_brain_answer(data: Any, url: str) -> LLMResult:
    """A chat completion -> :class:`LLMResult` (text, tool calls with the brain's ids or new ones, usage).

    Raises:
        APIError: 502 ``brain_error``: not a chat completion (no ``choices[0].message``).
    """
    try:
        choice = data["choices"][0]
        msg = choice["message"]
        content = msg.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        calls = []
        for c in msg.get("tool_calls") or ():
            fn = c.get("function") or {}
            args = fn.get("arguments", "{}")
            calls.append(ToolCall(id=str(c.get("id") or new_call_id()), name=str(fn.get("name", "")),
                                  arguments_json=args if isinstance(args, str) else json.dumps(args)))
        usage = data.get("usage") or {}
        finish = str(choice.get("finish_reason") or ("tool_calls" if calls else "stop"))
        return LLMResult(text=str(content or ""), groups=(), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0), finish_reason=finish,
                         tool_calls=tuple(calls))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise APIError(502, f"the brain at {url} did not answer with a chat completion ({type(e).__name__}: {e})",
                       type="server_error", code="brain_error") from None


class BrainBackend(Backend):
    """``inner`` with its chat generations answered by the brain (everything else is ``inner``'s).

    Args:
        inner: the server's backend (decoders, skills, speech).
        cfg: the brain. transport: an ``httpx`` transport (tests).

    Raises:
        ValueError: ``cfg.api_key_env`` names a variable that is not set.
    """

    def __init__(self, inner: Backend, cfg: BrainConfig, *, transport: Any = None):
        import httpx

        self.inner = inner
        self.cfg = cfg
        self.preset = inner.preset
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise ValueError(f"brain.api_key_env names {cfg.api_key_env!r} but that variable is not set")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._httpx = httpx
        self._client = httpx.AsyncClient(timeout=cfg.timeout_s, headers=headers, transport=transport)
        self.calls = 0

    # ---- the brain ---------------------------------------------------------------------------------------
    async def ask(self, request: LLMRequest) -> LLMResult:
        """One brain call (retried on connection errors and timeouts).

        Raises:
            APIError: 503 ``brain_unavailable`` / 502 ``brain_error`` (see the module's errors).
        """
        body = brain_body(request, self.cfg)
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                r = await self._client.post(self.url, json=body)
            except self._httpx.TransportError as e:  # connect errors and timeouts
                last = f"{type(e).__name__}: {e}".rstrip(": ")
                log.warning("%s: brain call failed (%s), attempt %d", request.request_id, last, attempt + 1)
                continue
            self.calls += 1
            if r.status_code in (429, 503):
                raise APIError(503, f"the brain at {self.url} is busy (HTTP {r.status_code}): {r.text[:300]}",
                               type="server_error", code="brain_unavailable",
                               headers={"Retry-After": r.headers.get("retry-after", "1")})
            if r.status_code != 200:
                raise APIError(502, f"the brain at {self.url} answered HTTP {r.status_code}: {r.text[:300]}",
                               type="server_error", code="brain_error")
            try:
                data = r.json()
            except ValueError:
                raise APIError(502, f"the brain at {self.url} answered with a body that is not JSON",
                               type="server_error", code="brain_error") from None
            return parse_brain_answer(data, self.url)
        raise APIError(503, f"the brain at {self.url} could not be reached ({last}; {self.cfg.max_retries + 1} "
                            "attempt(s))", type="server_error", code="brain_unavailable", headers={"Retry-After": "5"})

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMEvent]:
        result = await self.ask(request)
        if result.text:
            yield TextDelta(result.text)
        for c in result.tool_calls:
            yield c
        yield result

    def default_skills(self, allowed: tuple[Modality, ...]) -> list[str]:
        """The skills a request without ``skills`` enables: the config's (those the server runs), or every served
        skill whose media ``allowed`` holds."""
        specs = self.skill_specs()
        names = [n for n in (self.cfg.skills if self.cfg.skills is not None else specs) if n in specs]
        media = {m.value for m in Modality}
        return [n for n in names if all(Modality.parse(r) in allowed for r in specs[n].returns if r in media)]

    # ---- the rest is the server's --------------------------------------------------------------------------
    @property
    def output_modalities(self) -> tuple[Modality, ...]:
        return self.inner.output_modalities

    @property
    def input_modalities(self) -> tuple[Modality, ...]:
        return self.inner.input_modalities

    def output_mime_type(self, modality: Modality) -> str:
        return self.inner.output_mime_type(modality)

    async def render(self, request):
        return await self.inner.render(request)

    async def describe(self) -> dict[str, Any]:
        d = await self.inner.describe()
        d["brain"] = {"kind": self.cfg.kind, "base_url": self.cfg.base_url, "model": self.cfg.model,
                      "calls": self.calls}
        return d

    async def transcribe(self, request):
        return await self.inner.transcribe(request)

    async def synthesize(self, request):
        async for chunk in self.inner.synthesize(request):
            yield chunk

    async def speech_info(self) -> dict[str, Any]:
        return await self.inner.speech_info()

    @property
    def skills(self) -> tuple[str, ...]:
        return self.inner.skills

    def skill_host(self, name: str) -> str | None:
        return self.inner.skill_host(name)

    def skill_specs(self) -> dict[str, Any]:
        return self.inner.skill_specs()

    async def run_skill(self, request: SkillRequest) -> SkillOutput:
        return await self.inner.run_skill(request)

    async def stats(self) -> dict[str, dict[str, float]]:
        return await self.inner.stats()

    async def close(self) -> None:
        await self._client.aclose()
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # a backend's own extras (tests' fakes, RayBackend's handles)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


__all__ = ["BRAIN_SYSTEM", "BrainBackend", "brain_body", "brain_messages", "media_placeholder",
           "parse_brain_answer"]
