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
from services.ingress.payloads import Payload, stream_pieces
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
    spoken = runner.spoken_answer(plan)  # audio.voice: the text spoken as it arrives, delta.audio per sentence
    speech_art = runner.reserve_speech() if spoken is not None else None
    said: list = []

    async def pump() -> None:
        try:
            async for ev in runner.events(plan):
                if spoken is not None:
                    spoken.on_event(*ev)
                queue.put_nowait(("event", ev))
            queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - sent as an error event
            queue.put_nowait(("error", stage_error(e)))

    async def speak() -> None:
        try:
            async for c in spoken.chunks():
                queue.put_nowait(("speech", c))
            queue.put_nowait(("speech_end", None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - sent as an error event
            queue.put_nowait(("error", stage_error(e)))

    task = asyncio.ensure_future(pump())
    speaker = asyncio.ensure_future(speak()) if spoken is not None else None

    def on_timeout() -> None:
        if not task.done() or (speaker is not None and not speaker.done()):
            task.cancel()
            if speaker is not None:
                speaker.cancel()
            metrics.rejected.labels("timeout").inc()
            queue.put_nowait(("error", APIError(
                504, f"the request did not finish within {timeout_s:g} s and was cancelled", type="server_error",
                code="timeout")))

    timer = loop.call_later(timeout_s, on_timeout)
    ended, spoken_all = False, spoken is None
    held: list[bytes] = []  # the closing frames, held until the last sentence is spoken
    try:
        yield chunks.opening()
        while not (ended and spoken_all):
            what, payload = await queue.get()
            if what == "end":
                ended = True
                continue
            if what == "error":
                yield chunks.error(payload)
                return
            if what == "speech":
                said.append(payload)
                frames = chunks.speech(payload, speech_art)
            elif what == "speech_end":
                spoken_all = True
                runner.store_speech(speech_art, said, spoken.text, plan.speech.sample_rate_hz)
                frames, held = held, []
            else:
                kind, value = payload
                if kind == "text":
                    frames = chunks.text(value)
                elif kind == "logprobs":
                    frames = chunks.logprobs(value)
                elif kind == "tool_call":
                    frames = chunks.tool_call(value)
                elif kind == "reserved":
                    frames = chunks.reserved(value)
                elif kind == "medium":
                    frames = chunks.medium(value)
                elif kind == "skill_call":
                    frames = chunks.skill_call(value)
                else:
                    result, _ = value
                    frames = (chunks.overlay(await runner.overlay(plan, result, chunks.skill_calls), result)
                              if plan.box_overlay else [])
                    frames += chunks.finish(result)
                    if spoken is not None:
                        spoken.finish()
                        if not spoken_all:
                            held, frames = frames, []
            for frame in frames:
                if isinstance(frame, Payload):  # a large medium's base64, encoded in pieces
                    async for piece in stream_pieces([frame]):
                        yield piece
                else:
                    yield frame
        yield chunks.done()
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
        if spoken is not None:
            await spoken.aclose()
            if speaker is not None and not speaker.done():
                speaker.cancel()
            if (now := runner.store.lookup(speech_art.id)) is not None and now.state == "pending":
                runner.store.fail(speech_art, "the answer's speech did not finish")
