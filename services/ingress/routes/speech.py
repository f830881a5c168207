"""``POST /v1/audio/speech`` (OpenAI's text-to-speech) and ``GET /v1/audio/voices`` (ours: the voices).

The speech stage speaks sentence by sentence (:meth:`services.protocol.Backend.synthesize`); this route primes
the stream before answering, so a bad request (unknown voice: 400 listing the choices; nothing to speak; speed,
length, format, model) is a JSON error, never a broken stream. Then:

- no ``stream_format``: the whole file (``Content-Length``);
- ``stream_format: "audio"``: the file's bytes as each sentence is encoded (chunked transfer);
- ``stream_format: "sse"``: ``data: {"type": "speech.audio.delta", "audio": <base64 of the next bytes>}`` per piece,
  then ``data: {"type": "speech.audio.done", "usage": {"input_tokens", "output_tokens", "total_tokens"}}``
  (no tokenizer runs: ``input_tokens`` counts the input's words, ``output_tokens`` the audio's 20 ms frames).
  A failure after the first event is sent as ``data: {"error": {...}}`` and ends the stream.

Every response carries ``X-Request-Id`` and ``X-Sample-Rate`` (Hz of the audio, 24000). The request holds an
admission slot until its last byte; the request timeout applies to the whole stream; a client that disconnects
stops the synthesis before its next sentence.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.errors import APIError, bad_request
from services.ingress.admission import Slot
from services.ingress.audio_formats import SpeechEncoder, encode_chunks
from services.ingress.error_map import stage_error
from services.ingress.planning import new_id, request_kind
from services.ingress.running import ClientGone
from services.ingress.service import IngressService, get_service, require_api_key
from services.protocol import SpeechAudioChunk, SpeechRequest
from services.schemas import SpeechCreateRequest

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_api_key)])

TTS_MODEL_NAMES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
"""OpenAI's text-to-speech model names, accepted as aliases of this server's model (clients hard-code them)."""


def check_speech_model(svc: IngressService, model: str, aliases: tuple[str, ...]) -> None:
    """Raises:
        APIError: 400 ``model_not_found`` for a model that is neither this server's nor one of ``aliases``."""
    if model == svc.model_name or model in aliases:
        return
    raise APIError(400, f"unknown model {model!r}; use {svc.model_name!r} or one of: {', '.join(aliases)}",
                   param="model", code="model_not_found")


class SpeechStreamResponse(StreamingResponse):
    """A streamed body that stops (closing the speech stream) as soon as the client disconnects, and releases
    the admission slot however it ends."""

    def __init__(self, content, slot: Slot, media_type: str, headers: dict[str, str]):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
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


async def _chunks(first: SpeechAudioChunk, stream: AsyncIterator[SpeechAudioChunk],
                  deadline: float) -> AsyncIterator[SpeechAudioChunk]:
    """``first`` then the rest of ``stream``, each next chunk awaited until ``deadline`` (loop time).

    Raises:
        APIError: 504 past the deadline; the stage's errors.
    """
    loop = asyncio.get_running_loop()
    yield first
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), timeout=max(0.001, deadline - loop.time()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise APIError(504, "the speech did not finish within the request timeout and was cancelled",
                           type="server_error", code="timeout") from None
        yield chunk


async def _encoded(encoder: SpeechEncoder, chunks: AsyncIterator[SpeechAudioChunk]) -> AsyncIterator[bytes]:
    """The file's bytes as the chunks come (PyAV work in a thread)."""
    async def run(fn, *args) -> bytes:
        return await asyncio.to_thread(fn, *args) if encoder.blocking else fn(*args)

    head = await run(encoder.start)
    if head:
        yield head
    async for chunk in chunks:
        data = await run(encoder.add, chunk.pcm16)
        if data:
            yield data
    tail = await run(encoder.finish)
    if tail:
        yield tail


def _usage(text: str, num_samples: int, sample_rate_hz: int) -> dict[str, int]:
    words = len(text.split())
    frames = -(-num_samples * 50 // max(1, sample_rate_hz))  # 20 ms frames, rounded up
    return {"input_tokens": words, "output_tokens": frames, "total_tokens": words + frames}


async def _sse(encoded: AsyncIterator[bytes], counted: dict[str, int], text: str) -> AsyncIterator[bytes]:
    try:
        async for data in encoded:
            yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"\
                .encode()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - sent as an error event
        yield f"data: {json.dumps(stage_error(e).body())}\n\n".encode()
        return
    done = {"type": "speech.audio.done", "usage": _usage(text, counted["samples"], counted["rate"])}
    yield f"data: {json.dumps(done)}\n\n".encode()


async def _counting(chunks: AsyncIterator[SpeechAudioChunk], counted: dict[str, int]):
    async for c in chunks:
        counted["samples"] += c.num_samples
        counted["rate"] = c.sample_rate_hz
        yield c


async def _closing(body: AsyncIterator[bytes], stream, request_id: str, *, reraise: bool,
                   on_complete=None) -> AsyncIterator[bytes]:
    """``body``, then the speech stream closed at once however the response ends (a disconnect stops the synthesis
    before its next sentence). A streamed file cannot change its status once sent: with ``reraise`` a failure is
    logged and the connection dropped, so the client sees an incomplete transfer, never a silently short file.
    ``on_complete()`` once the body ran to its end (admission's estimate)."""
    try:
        async for data in body:
            yield data
        if on_complete is not None:
            on_complete()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.error("%s: speech stream failed: %r", request_id, e)
        if reraise:
            raise
    finally:
        await stream.aclose()


@router.post("/v1/audio/speech")
async def create_speech(body: SpeechCreateRequest, request: Request, svc: IngressService = Depends(get_service)):
    check_speech_model(svc, body.model, TTS_MODEL_NAMES)
    if body.instructions and body.instructions.strip():
        raise bad_request("instructions are not supported by this server's voices; leave the field out",
                          param="instructions", code="unsupported_parameter")
    if len(body.input) > svc.limits.max_speech_input_chars:
        raise bad_request(f"input: {len(body.input)} characters; the limit is {svc.limits.max_speech_input_chars}",
                          param="input", code="string_above_max_length")
    request_id = new_id("speech")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.settings.request_timeout_s
    stream = svc.backend.synthesize(SpeechRequest(request_id, body.input, body.voice_name(), body.speed))
    slot = svc.admission.acquire(request_kind("speech"))
    handed_over = False
    try:
        try:
            first = await svc.runner.guarded(request, anext(stream))
        except StopAsyncIteration:
            raise bad_request("input: nothing to speak", param="input", code="empty_input") from None
        except APIError:
            raise
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a stage's error as the API's
            raise stage_error(e) from None
        rate = first.sample_rate_hz
        headers = {"X-Request-Id": request_id, "X-Sample-Rate": str(rate)}
        chunks = _chunks(first, stream, deadline)
        encoder = SpeechEncoder(body.response_format, rate)
        if body.stream_format is None:
            collected = await svc.runner.guarded(request, _collect(chunks))
            slot.completed()
            data = await asyncio.to_thread(encode_chunks, body.response_format, [c.pcm16 for c in collected], rate)
            return Response(data, media_type=encoder.mime_type, headers=headers)
        if body.stream_format != "sse":  # "audio": the file's bytes as they are encoded
            content = _closing(_encoded(encoder, chunks), stream, request_id, reraise=True,
                               on_complete=slot.completed)
            media_type = encoder.mime_type
        else:
            counted = {"samples": 0, "rate": rate}
            content = _closing(_sse(_encoded(encoder, _counting(chunks, counted)), counted, body.input), stream,
                               request_id, reraise=False, on_complete=slot.completed)
            media_type = "text/event-stream"
        handed_over = True
        return SpeechStreamResponse(content, slot, media_type, headers)
    except ClientGone:
        return Response(status_code=499)
    finally:
        if not handed_over:
            slot.release()
            await stream.aclose()


async def _collect(chunks: AsyncIterator[SpeechAudioChunk]) -> list[SpeechAudioChunk]:
    return [c async for c in chunks]


@router.get("/v1/audio/voices")
async def list_voices(svc: IngressService = Depends(get_service)):
    """The voices ``/v1/audio/speech`` takes (OpenAI's names first), the default one and the output rate."""
    try:
        info = await asyncio.wait_for(svc.backend.speech_info(), timeout=10)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - a stage's error as the API's
        raise stage_error(e) from None
    return JSONResponse({"object": "list", "data": info["voices"], "default_voice": info["default_voice"],
                         "sample_rate_hz": info["sample_rate_hz"],
                         "unavailable": (info.get("tts") or {}).get("unavailable", {})})
