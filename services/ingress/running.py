"""Running a :class:`~services.ingress.planning.ChatPlan` over the backend: the LLM stream, a render per signal
group started as soon as the group arrives (decoders work while the text still streams), the grounding overlay,
and the request's guards (timeout, client disconnect). Cancelling a run cancels the LLM and every render.

Every medium is stored: when its group closes an artifact is reserved in the store (its id can go into the answer
at once), fulfilled with the file when the render finishes, or failed with the reason (render error, cancelled).

The skill loop (issue #23; a plan with ``skills``): generate until the model calls a skill, run the call(s) on the
skill's deployment (each within ``skill_timeout_s`` and what is left of the request's time), append the assistant's
call turn and a ``tool`` turn with each result, generate again; at most ````max_skill_rounds`` rounds offer the
skills, the next generation has only the client's tools (the model must answer). A skill that fails, times out or
whose deployment is down gives the model an error result; the request still answers. Calls of client-defined tools
end the loop and go back to the client. The rounds' texts join into one answer; media indices and text offsets of
later rounds are shifted so the answer reads as one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from polymodal.grounding.overlay import overlay_png
from polymodal.modality import Modality
from polymodal.types import LLMResult, MediaPart, SignalGroup, TextDelta, TextPart, ToolCall, Turn

from services.errors import APIError
from services.ingress.error_map import stage_error
from services.ingress.audio_formats import encode_chunks
from services.ingress.payloads import LARGE_PAYLOAD_BYTES
from services.ingress.planning import ChatPlan, input_images
from services.ingress.skill_loop import (Shift, SkillCall, merge, next_round, result_text, shown_answer, shown_media,
                                         skill_failure, unknown_call)
from services.ingress.spoken import SpokenAnswer
from services.metrics import APIMetrics, StreamLatencies
from services.protocol import REQUEST_DEADLINE, Backend, EncodedMedium, RenderRequest, SkillRequest, SpeechAudioChunk
from services.settings import ServerSettings
from services.store import Artifact, FileStore

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


@dataclass(frozen=True)
class Reserved:
    """A signal group that closed: its render started, one artifact reserved per seed (one, but for the
    one-medium endpoints' variants)."""

    group: SignalGroup
    artifacts: tuple[Artifact, ...]


@dataclass(frozen=True)
class Stored:
    """A rendered medium and its (ready) artifact."""

    medium: EncodedMedium
    artifact: Artifact


@dataclass
class ChatOutcome:
    """A whole (non-streamed) answer: its text, rendered media (stored), the LLM's result and groups."""

    text: str
    media: list[Stored]
    result: LLMResult
    groups: list[SignalGroup]
    overlay: tuple[Stored, int] | None = None  # (PNG, index of the image it was drawn on)
    spoken: SpokenAudio | None = None  # the answer spoken (``audio.voice``)
    skill_calls: list[SkillCall] = field(default_factory=list)


@dataclass(frozen=True)
class SpokenAudio:
    """A spoken answer: its WAV stored as ``artifact``; ``pcm16`` the samples (16-bit LE mono at
    ``sample_rate_hz``), ``transcript`` the text spoken, ``chunks`` how many sentences' chunks made it."""

    artifact: Artifact
    pcm16: bytes
    sample_rate_hz: int
    transcript: str
    chunks: int


SKILL_TIME_MARGIN_S = 1.0
"""A skill call ends this long before the request's deadline at the latest (the model still answers)."""


class Runner:
    """Runs plans over ``backend``.

    Args:
        backend: the stages.
        settings: ``request_timeout_s``, ``artifact_ttl_s``.
        metrics: ``rejected{reason="timeout"|"disconnect"}``.
        store: where every medium is stored.
    """

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: APIMetrics, store: FileStore):
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.store = store

    def reserve(self, modality: Modality) -> Artifact:
        """A pending artifact for a medium about to be rendered (it must be ready within the request timeout), named
        after the type its decoder writes (:meth:`services.protocol.Backend.output_mime_type`)."""
        mime = self.backend.output_mime_type(modality)  # the link's extension follows the type the decoder writes
        return self.store.reserve(mime, modality.spec.codec.extension(mime), self.settings.artifact_ttl_s,
                                  ready_within_s=self.settings.request_timeout_s)

    async def _render(self, plan: ChatPlan, group: SignalGroup, seed: int, art: Artifact) -> Stored:
        """Render one medium into its reserved artifact (failed with the reason if the render fails or is
        cancelled)."""
        options = plan.options.get(group.modality) or self.backend.preset.decoders[group.modality].defaults
        source = plan.edit_source if plan.edit_source is not None and plan.edit_source.modality is group.modality \
            else None
        try:
            m = await self.backend.render(RenderRequest(plan.request_id, group, seed, options, source))
        except asyncio.CancelledError:
            self.store.fail(art, "the request was cancelled before this medium was ready")
            raise
        except Exception as e:
            self.store.fail(art, stage_error(e).message)
            raise
        if len(m.data) >= LARGE_PAYLOAD_BYTES:  # a large file is written off the event loop (the write drops the GIL)
            return Stored(m, await asyncio.to_thread(self.store.fulfil, art, m.data, m.mime_type, m.ext))
        return Stored(m, self.store.fulfil(art, m.data, m.mime_type, m.ext))

    async def _run_skill(self, plan: ChatPlan, call: ToolCall, round_: int, shift: Shift) -> SkillCall:
        """Run one call of the loop: never raises for the skill's sake (a failure, a timeout, a deployment that is
        down: an error result); its media are stored and placed at the current end of the answer's text."""
        media = tuple(p for t in plan.llm.turns for p in t.parts if isinstance(p, MediaPart))
        timeout_s = self.settings.skill_timeout_s
        if plan.deadline is not None:
            timeout_s = min(timeout_s, plan.deadline - time.monotonic() - SKILL_TIME_MARGIN_S)
        req = SkillRequest(plan.request_id, call.name, call.arguments_json, media)
        if call.name not in plan.skills.names:
            out = unknown_call(call, plan.skills)
        elif timeout_s <= 0:
            out = skill_failure(call.name, "no time was left in this request to run the skill")
        else:
            try:
                out = await asyncio.wait_for(self.backend.run_skill(req), timeout_s)
            except asyncio.TimeoutError:
                out = skill_failure(call.name, f"the skill did not finish within {timeout_s:.1f} s")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the model reads it as the call's result
                out = skill_failure(call.name, stage_error(e).message)
        stored = []
        for m in out.media:
            if plan.llm.allowed_modalities is not None and m.modality not in plan.allowed:
                log.warning("%s: skill %s made %s, outside the answer's media; dropped", plan.request_id,
                            call.name, m.modality.value)
                continue
            placed = dataclasses.replace(m, index=shift.index_base, text_offset=shift.text_offset)
            shift.index_base += 1
            stored.append(Stored(placed, self.store.put(m.data, m.mime_type, m.ext, self.settings.artifact_ttl_s)))
        if not out.ok:
            log.info("%s: skill %s failed (%s): %s", plan.request_id, call.name, out.result.error_code,
                     out.result.error)
        return SkillCall(call, out, tuple(stored), round_, self.backend.skill_host(call.name))

    async def events(self, plan: ChatPlan) -> AsyncIterator[tuple[str, Any]]:
        """Run a plan: yields ``("text", str)``; ``("logprobs", entries)`` (the log-probabilities of the text that
        follows, when asked for); ``("tool_call", ToolCall)`` as each call's block closes (client tools only);
        ``("skill_call", SkillCall)`` as each skill call of the loop finishes; ``("reserved",
        Reserved)`` when a signal group closes (its render started, its artifacts reserved); ``("medium",
        Stored)`` as each medium is ready; and finally ``("done", (LLMResult, groups))``. Closing / cancelling it
        cancels the LLM and every render.

        Raises:
            APIError (RenderFailed, Overloaded, StageUnavailable, 400 for a conversation the model refuses).
        """
        if plan.deadline is not None:  # the renders and the LLM stream started below inherit it
            REQUEST_DEADLINE.set(plan.deadline)
        queue: asyncio.Queue = asyncio.Queue()
        renders: list[asyncio.Task] = []
        reserved: list[Artifact] = []
        groups: list[SignalGroup] = []
        only_first = bool(plan.variant_seeds)

        def start(group: SignalGroup, seed: int) -> Artifact:
            art = self.reserve(group.modality)
            t = asyncio.ensure_future(self._render(plan, group, seed, art))
            t.add_done_callback(lambda t: queue.put_nowait(("render", t)))
            renders.append(t)
            reserved.append(art)
            return art

        skill_modalities: set[Modality] = set()  # media the skills made (they count towards ``requested``)

        def take_group(item: SignalGroup) -> None:
            if item.modality not in self.backend.output_modalities or (
                    plan.llm.allowed_modalities is not None and item.modality not in plan.allowed):
                # never with our LLM stage (it masks what the request does not allow): a stage
                # that ignores its ceiling must not cost a render
                log.warning("%s: %s group %d is outside the answer's media (%s); not rendered",
                            plan.request_id, item.modality.value, item.index,
                            ", ".join(m.value for m in plan.allowed) or "text only")
                return
            if only_first and (groups or item.modality not in plan.requested):
                return
            groups.append(item)
            seeds = plan.variant_seeds if only_first else (plan.base_seed + item.index,)
            queue.put_nowait(("reserved", Reserved(item, tuple(start(item, s) for s in seeds))))

        async def one_round(llm) -> LLMResult | None:
            """One generation; skill calls are kept for the loop, client calls go to the client."""
            result = None
            async for item in self.backend.generate(llm):
                if isinstance(item, TextDelta):
                    if item.logprobs:
                        queue.put_nowait(("logprobs", item.logprobs))
                    if item.text:
                        queue.put_nowait(("text", item.text))
                elif isinstance(item, ToolCall):
                    if not plan.skills.runs(item.name):
                        queue.put_nowait(("tool_call", item))
                elif isinstance(item, SignalGroup):
                    take_group(shift.group(item))
                elif isinstance(item, LLMResult):
                    result = item
            return result

        shift = Shift()

        async def produce() -> None:
            try:
                if not plan.skills.names:
                    queue.put_nowait(("llm", await one_round(plan.llm)))
                    return
                llm, turns, rounds, results = plan.llm, list(plan.llm.turns), 0, []
                while True:
                    result = await one_round(llm)
                    if result is None:
                        queue.put_nowait(("llm", None))
                        return
                    results.append(shift.result(result))
                    shift.text_offset += len(result.text)
                    shift.index_base = max([g.index + 1 for g in groups] + [shift.index_base])
                    mine = [c for c in result.tool_calls if plan.skills.runs(c.name)]
                    theirs = [c for c in result.tool_calls if not plan.skills.runs(c.name)]
                    if not mine or rounds >= plan.skills.max_rounds:  # (a stage that ignores its tools: no more)
                        break
                    calls = await asyncio.gather(*(self._run_skill(plan, c, rounds, shift) for c in mine))
                    for c in calls:
                        skill_modalities.update(m.medium.modality for m in c.media)
                        queue.put_nowait(("skill_call", c))
                    rounds += 1
                    if theirs:  # the client's own calls end the loop: they go back to the client
                        break
                    turns.append(Turn("assistant", (TextPart(result.text),) if result.text else (),
                                      tool_calls=tuple(mine)))
                    turns.extend(Turn("tool", (TextPart(result_text(c)),), tool_call_id=c.call.id)
                                 for c in calls)
                    llm = next_round(plan.llm, plan.skills.names, tuple(turns), plan.requested,
                                     offer_skills=rounds < plan.skills.max_rounds)
                queue.put_nowait(("llm", merge(results, plan.llm.logprobs is not None, plan.skills)))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait(("error", e))

        producer = asyncio.ensure_future(produce())
        result: LLMResult | None = None
        llm_done = False
        delivered = 0
        clock = StreamLatencies(plan.started_s)
        try:
            while not (llm_done and delivered == len(renders)):
                kind, value = await queue.get()
                if kind == "text" and plan.llm.stream_text:  # a whole answer's text comes with its groups
                    clock.token()
                if kind in ("text", "reserved", "logprobs", "tool_call", "skill_call"):
                    yield kind, value
                elif kind == "error":
                    raise stage_error(value)
                elif kind == "llm":
                    llm_done, result = True, value
                    clock.llm_done()
                    if result is None:
                        raise APIError(500, "the LLM stage ended without a result", type="server_error")
                    produced = {g.modality for g in groups} | skill_modalities
                    missing = [m.value for m in plan.requested if m not in produced]
                    if missing:
                        raise APIError(500, f"the model did not produce the requested {', '.join(missing)}",
                                       type="server_error", code="generation_failed")
                elif kind == "render":
                    delivered += 1
                    if value.cancelled():
                        raise APIError(500, "a render was cancelled", type="server_error")
                    exc = value.exception()
                    if exc is not None:
                        raise stage_error(exc)
                    clock.medium(value.result().medium.modality)
                    yield "medium", value.result()
            if plan.on_complete is not None:
                plan.on_complete()
            clock.observe(self.metrics, result.completion_tokens if result is not None else 0)
            yield "done", (result, groups)
        finally:
            pending = [t for t in (producer, *renders) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
            for t in renders:  # a failure beside the one raised: retrieved here, never left unread
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.debug("%s: render outcome: %r", plan.request_id, t.exception())
            for t, art in zip(renders, reserved):  # cancelled before it ran: its artifact is failed here
                if t.cancelled() and (now := self.store.lookup(art.id)) is not None and now.state == "pending":
                    self.store.fail(art, "the request was cancelled before this medium was ready")

    def spoken_answer(self, plan: ChatPlan) -> SpokenAnswer | None:
        """The plan's spoken answer (``audio.voice``), fed the text as it arrives; ``None`` when not asked."""
        return None if plan.speech is None else SpokenAnswer(self.backend, plan.request_id, voice=plan.speech.voice,
                                                              tool_format=self.backend.preset.chat.tool_format)

    def reserve_speech(self) -> Artifact:
        """The artifact a spoken answer's WAV goes into (its id is ``message.audio.id`` / ``delta.audio.id``)."""
        return self.store.reserve("audio/wav", "wav", self.settings.artifact_ttl_s,
                                  ready_within_s=self.settings.request_timeout_s)

    def store_speech(self, art: Artifact, chunks: list[SpeechAudioChunk], transcript: str,
                     sample_rate_hz: int) -> SpokenAudio:
        """The spoken answer's chunks joined, stored as a WAV in ``art``."""
        pcm = b"".join(c.pcm16 for c in chunks)
        rate = chunks[0].sample_rate_hz if chunks else sample_rate_hz
        ready = self.store.fulfil(art, encode_chunks("wav", [pcm], rate), "audio/wav", "wav")
        return SpokenAudio(ready, pcm, rate, transcript, len(chunks))

    async def collect(self, plan: ChatPlan) -> ChatOutcome:
        """Run a plan to the end (and draw its overlay when asked; speak it when asked, sentence by sentence as
        the text arrives)."""
        text: list[str] = []
        media: list[Stored] = []
        calls: list[SkillCall] = []
        result, groups = None, []
        spoken = self.spoken_answer(plan)
        speech_art = self.reserve_speech() if spoken is not None else None
        heard: list[SpeechAudioChunk] = []

        async def read() -> None:
            async for c in spoken.chunks():
                heard.append(c)

        reader = asyncio.ensure_future(read()) if spoken is not None else None
        try:
            async for kind, value in self.events(plan):
                if spoken is not None:  # spoken as shown (SpokenAnswer.on_event)
                    spoken.on_event(kind, value)
                if kind == "text":
                    text.append(value)
                elif kind == "medium":
                    media.append(value)
                elif kind == "skill_call":
                    calls.append(value)
                    media.extend(value.media)
                elif kind == "done":
                    result, groups = value
            overlay = await self.overlay(plan, result, calls) if plan.box_overlay else None
            said = None
            if spoken is not None:
                spoken.finish()
                await reader
                said = self.store_speech(speech_art, heard, spoken.text, plan.speech.sample_rate_hz)
        except BaseException as e:
            if speech_art is not None and (now := self.store.lookup(speech_art.id)) is not None \
                    and now.state == "pending":
                self.store.fail(speech_art, "the request was cancelled before the speech was ready"
                                if isinstance(e, asyncio.CancelledError) else stage_error(e).message)
            raise
        finally:
            if spoken is not None:
                await spoken.aclose()
            if reader is not None and not reader.done():
                reader.cancel()
        answer = result.text if result is not None and result.text else "".join(text)
        shown, cut = shown_answer(answer, getattr(self.backend.preset.chat, "tool_format", ""))  # llava-plus: value
        return ChatOutcome(shown, shown_media(media, cut, shown), result, groups, overlay, spoken=said,
                           skill_calls=calls)

    async def media_items(self, plan: ChatPlan, request: Request) -> tuple[str, list[Stored]]:
        """A one-medium plan (images / audio endpoints), guarded: (the LLM's text, the media by seed)."""
        out: ChatOutcome = await self.guarded(request, self.collect(plan))
        return out.text, sorted(out.media, key=lambda s: s.medium.seed)

    async def overlay(self, plan: ChatPlan, result: LLMResult, calls=()) -> tuple[Stored, int]:
        """The answer's boxes (the model's, then the skills') and the skills' masks drawn on the image they refer
        to (the first one's image; the last image when there are none), as a stored PNG placed at the end of the
        text."""
        images = input_images(plan.llm.turns)
        boxes = [*result.boxes, *(b for c in calls for b in c.output.result.boxes)]
        masks = [m for c in calls for m in c.output.result.masks]
        first = boxes[0].image_index if boxes else (masks[0].image_index if masks else len(images) - 1)
        k = first if 0 <= first < len(images) else len(images) - 1
        mine = [b for b in boxes if b.image_index == k]
        shown = [m for m in masks if m.image_index == k and tuple(m.size_hw) == images[k].data.shape[:2]]

        def draw() -> bytes:
            base = images[k].data
            if shown:
                from skills.masks import draw_masks

                base = draw_masks(base, shown)
            return overlay_png(base, mine)

        png = await asyncio.to_thread(draw)
        m = EncodedMedium(Modality.IMAGE, png, "image/png", "png", seed=0, index=0, text_offset=len(result.text))
        return Stored(m, self.store.put(png, m.mime_type, m.ext, self.settings.artifact_ttl_s)), k

    async def guarded(self, request: Request, work: Awaitable[Any]) -> Any:
        """Run ``work`` under the request timeout, cancelling it if the client disconnects.

        Raises:
            APIError: 504 on timeout (the work is cancelled first). ClientGone on disconnect.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.metrics.rejected.labels("timeout").inc()
                    raise APIError(504, f"the request did not finish within {self.settings.request_timeout_s:g} s "
                                        "and was cancelled", type="server_error", code="timeout")
                done, _ = await asyncio.wait({task}, timeout=min(0.25, remaining))
                if task in done:
                    return task.result()
                if await request.is_disconnected():
                    self.metrics.rejected.labels("disconnect").inc()
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=10)
