"""Streaming (``stream: true``): the SSE driver and its response class.

:func:`sse` runs the plan in its own task feeding a queue, so a disconnect (the generator cancelled) or the
request timeout cancels that task, which cancels the LLM stream and every render; the frames themselves come
from :class:`services.ingress.responses.StreamChunks`. :class:`SSEResponse` stops as soon as the client
disconnects and releases the admission slot however the response ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from services.errors import APIError
from services.ingress.admission import Slot
from services.ingress.error_map import stage_error
from services.ingress.planning import ChatPlan
from services.ingress.responses import Responses, StreamChunks
from services.ingress.running import Runner
from services.metrics import APIMetrics


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (cancelling the producer) as soon as the client disconnects, whatever
    ASGI spec version the server speaks, and release the admission slot however the response ends."""

    def __init__(self, content, slot: Slot, **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kw.pop("headers", {})},
                         **kw)
        self._slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._slot.release()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def sse(runner: Runner, responses: Responses, metrics: APIMetrics, timeout_s: float, plan: ChatPlan,
              base_url: str) -> AsyncIterator[bytes]:
    """The SSE body of a streamed chat answer (see the contract, "Streaming"); honours ``timeout_s``.

    Args:
        runner: runs the plan. responses: builds the frames. metrics: ``rejected{reason="timeout"}``.
        timeout_s: the request timeout; past it the work is cancelled and a 504 error event ends the stream.
    """
    loop = asyncio.get_running_loop()
    chunks = StreamChunks(responses, plan, base_url)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for ev in runner.events(plan):
                queue.put_nowait(("event", ev))
            queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - sent as an error event
            queue.put_nowait(("error", stage_error(e)))

    task = asyncio.ensure_future(pump())

    def on_timeout() -> None:
        if not task.done():
            task.cancel()
            metrics.rejected.labels("timeout").inc()
            queue.put_nowait(("error", APIError(
                504, f"the request did not finish within {timeout_s:g} s and was cancelled", type="server_error",
                code="timeout")))

    timer = loop.call_later(timeout_s, on_timeout)
    try:
        yield chunks.opening()
        while True:
            what, payload = await queue.get()
            if what == "end":
                break
            if what == "error":
                yield chunks.error(payload)
                return
            kind, value = payload
            if kind == "text":
                frames = chunks.text(value)
            elif kind == "reserved":
                frames = chunks.reserved(value)
            elif kind == "medium":
                frames = chunks.medium(value)
            else:
                result, _ = value
                frames = chunks.overlay(await runner.overlay(plan, result), result) if plan.box_overlay else []
                frames += chunks.finish(result)
            for frame in frames:
                yield frame
        yield chunks.done()
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
