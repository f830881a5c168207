"""Running a :class:`~services.ingress.planning.ChatPlan` over the backend: the LLM stream, a render per signal
group started as soon as the group arrives (decoders work while the text still streams), the grounding overlay,
and the request's guards (timeout, client disconnect). Cancelling a run cancels the LLM and every render.

Every medium is stored: when its group closes an artifact is reserved in the store (its id can go into the answer
at once), fulfilled with the file when the render finishes, or failed with the reason (render error, cancelled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from polymodal.grounding.overlay import overlay_png
from polymodal.modality import Modality
from polymodal.types import LLMResult, SignalGroup, TextDelta

from services.errors import APIError
from services.ingress.error_map import stage_error
from services.ingress.planning import ChatPlan, input_images
from services.metrics import APIMetrics
from services.protocol import REQUEST_DEADLINE, Backend, EncodedMedium, RenderRequest
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
        """A pending artifact for a medium about to be rendered (it must be ready within the request timeout)."""
        ext = modality.spec.codec.ext
        return self.store.reserve(f"{modality.value}/{ext}", ext, self.settings.artifact_ttl_s,
                                  ready_within_s=self.settings.request_timeout_s)

    async def _render(self, plan: ChatPlan, group: SignalGroup, seed: int, art: Artifact) -> Stored:
        """Render one medium into its reserved artifact (failed with the reason if the render fails or is
        cancelled)."""
        options = plan.options.get(group.modality) or self.backend.preset.decoders[group.modality].defaults
        try:
            m = await self.backend.render(RenderRequest(plan.request_id, group, seed, options))
        except asyncio.CancelledError:
            self.store.fail(art, "the request was cancelled before this medium was ready")
            raise
        except Exception as e:
            self.store.fail(art, stage_error(e).message)
            raise
        return Stored(m, self.store.fulfil(art, m.data, m.mime_type, m.ext))

    async def events(self, plan: ChatPlan) -> AsyncIterator[tuple[str, Any]]:
        """Run a plan: yields ``("text", str)``; ``("reserved", Reserved)`` when a signal group closes (its
        render started, its artifacts reserved); ``("medium", Stored)`` as each medium is ready; and finally
        ``("done", (LLMResult, groups))``. Closing / cancelling it cancels the LLM and every render.

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

        async def produce() -> None:
            result = None
            try:
                async for item in self.backend.generate(plan.llm):
                    if isinstance(item, TextDelta):
                        queue.put_nowait(("text", item.text))
                    elif isinstance(item, SignalGroup):
                        if item.modality not in self.backend.output_modalities or (
                                plan.llm.allowed_modalities is not None and item.modality not in plan.allowed):
                            # never with our LLM stage (it masks what the request does not allow): a stage
                            # that ignores its ceiling must not cost a render
                            log.warning("%s: %s group %d is outside the answer's media (%s); not rendered",
                                        plan.request_id, item.modality.value, item.index,
                                        ", ".join(m.value for m in plan.allowed) or "text only")
                            continue
                        if only_first and (groups or item.modality not in plan.requested):
                            continue
                        groups.append(item)
                        seeds = plan.variant_seeds if only_first else (plan.base_seed + item.index,)
                        queue.put_nowait(("reserved", Reserved(item, tuple(start(item, s) for s in seeds))))
                    elif isinstance(item, LLMResult):
                        result = item
                queue.put_nowait(("llm", result))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait(("error", e))

        producer = asyncio.ensure_future(produce())
        result: LLMResult | None = None
        llm_done = False
        delivered = 0
        try:
            while not (llm_done and delivered == len(renders)):
                kind, value = await queue.get()
                if kind in ("text", "reserved"):
                    yield kind, value
                elif kind == "error":
                    raise stage_error(value)
                elif kind == "llm":
                    llm_done, result = True, value
                    if result is None:
                        raise APIError(500, "the LLM stage ended without a result", type="server_error")
                    produced = {g.modality for g in groups}
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
                    yield "medium", value.result()
            if plan.on_complete is not None:
                plan.on_complete()
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

    async def collect(self, plan: ChatPlan) -> ChatOutcome:
        """Run a plan to the end (and draw its overlay when asked)."""
        text: list[str] = []
        media: list[Stored] = []
        result, groups = None, []
        async for kind, value in self.events(plan):
            if kind == "text":
                text.append(value)
            elif kind == "medium":
                media.append(value)
            elif kind == "done":
                result, groups = value
        overlay = await self.overlay(plan, result) if plan.box_overlay else None
        return ChatOutcome(result.text if result is not None and result.text else "".join(text), media, result,
                           groups, overlay)

    async def media_items(self, plan: ChatPlan, request: Request) -> tuple[str, list[Stored]]:
        """A one-medium plan (images / audio endpoints), guarded: (the LLM's text, the media by seed)."""
        out: ChatOutcome = await self.guarded(request, self.collect(plan))
        return out.text, sorted(out.media, key=lambda s: s.medium.seed)

    async def overlay(self, plan: ChatPlan, result: LLMResult) -> tuple[Stored, int]:
        """The answer's boxes drawn on the image they refer to (the last image when there are none), as a stored
        PNG placed at the end of the text."""
        images = input_images(plan.llm.turns)
        k = result.boxes[0].image_index if result.boxes else len(images) - 1
        mine = [b for b in result.boxes if b.image_index == k]
        png = await asyncio.to_thread(overlay_png, images[k].data, mine)
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
