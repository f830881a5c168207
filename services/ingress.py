"""The HTTP API: one FastAPI app over a :class:`services.protocol.Backend` (imports no torch).

Hosted by Ray Serve (:class:`services.deployments.IngressServer`, backend = DeploymentHandles) or by plain
uvicorn (``--no-ray``, backend = the in-process pipeline): same endpoints, schemas and errors.

Endpoints
---------
- ``POST /v1/chat/completions``: content parts ``text``, ``image_url`` (data URL), ``input_audio``
  {data, format}, ``audio_url`` / ``video_url`` (data URLs). Input media are decoded here with
  :mod:`polymodal.media_io` (numpy / Pillow / soundfile / PyAV, in a worker thread), so bad or oversized
  media are refused (400 / 413) before any model work, and the LLM stage receives arrays.
  A text-only answer has ``message.content`` as a string. An answer with media has ``message.content`` as
  the ordered list of parts (``text``, ``image_url``, ``audio_url``, ``video_url``; each medium part also
  carries ``mime_type``, ``seed`` and ``index``) and the first audio also as OpenAI's ``message.audio``
  {id, data (base64 WAV), format, expires_at, transcript}.

  Grounding (a model whose preset has ``grounding``; ``/v1/models`` lists its ``grounding.tasks``): request
  field ``task`` (e.g. ``"grounding"``, ``"refer"``; its identifier goes before the last user text; an
  unknown task, or any task on a model without grounding: 400 naming the choices) and ``box_overlay: true``
  (needs an input image). The answer's boxes come as ``message.boxes``: ``[{"phrase", "box": [x1, y1, x2,
  y2], "image_index", "text_span"}]`` with ``box`` in pixels of the image the user sent (after its EXIF
  orientation; 2 decimals, x right, y down), ``image_index`` the image among the request's images (in
  message order; boxes refer to the last one) and ``text_span`` [start, end) of the phrase in the answer
  text (or null); the grounding markup is removed from the text. With ``box_overlay`` the content list
  ends with ``{"type": "image_url", "image_url": {...}, "mime_type": "image/png", "index", "overlay": true,
  "image_index"}``: that image with the boxes drawn (Pillow). ``message.boxes`` is present (maybe empty)
  on every answer of a grounding model.
  Decoder options per output modality (all optional; defaults: the preset's): ``image`` / ``video``
  {num_inference_steps, guidance_scale, height_px, width_px}, ``audio`` {num_inference_steps, guidance_scale,
  duration_s}, ``video`` also {num_frames, fps, crf} (``crf``: libx264's constant rate factor of the returned
  MP4, 0-51, lower keeps the decoder's frames closer; presets default to 18, the toy preset to 12 for its
  16 px frames).
- ``POST /v1/images/generations``: the prompt goes through the LLM with the image group required; the
  ``n`` images are rendered from that group with seeds ``seed + k`` (one decoder batch).
- ``POST /v1/audio/generations``: the same for audio (WAV); ``data[k].b64_json`` or ``url``.
- ``POST /v1/videos`` (async job), ``GET /v1/videos/{id}``, ``GET /v1/videos/{id}/content`` (MP4).
- ``GET /v1/artifacts/{id}.{ext}``: stored media (``url`` response format), until they expire.
- ``GET /v1/models``, ``GET /health`` (process up), ``GET /ready`` (every stage loaded; 503 otherwise),
  ``GET /metrics`` (Prometheus, see :mod:`services.metrics`).

Streaming (``stream: true``) is Server-Sent Events of ``chat.completion.chunk`` objects:

1. ``delta: {"role": "assistant", "content": ""}``
2. text: ``delta: {"content": "<text>"}`` as the LLM writes it;
3. each medium as soon as its decoder finishes (decoders start while the text still streams):
   ``delta: {"media": <part>}`` where ``<part>`` is the same object as in the non-streaming content list
   plus ``text_offset`` (where it belongs in the text); the first audio also ``delta.audio``
   {id, data, format, expires_at, transcript}. Media chunks have no ``content`` so text-only clients
   ignore them;
4. with ``box_overlay``, the overlay as a ``delta: {"media": <part>}`` chunk; then ``delta: {}`` with
   ``finish_reason`` (a grounding model: ``delta: {"boxes": [...]}``, the boxes of the whole answer; the
   streamed text of our own format never shows grounding tokens, a format whose tags are plain text streams
   them as written); with ``stream_options.include_usage`` a chunk with ``usage``;
5. ``data: [DONE]``. A failure after the stream started is sent as ``data: {"error": {...}}`` (the OpenAI
   client raises it) and the stream ends.

Rules: a requested output modality is produced or the request is refused (400 upfront if no decoder; a
500 ``generation_failed`` if the medium could not be rendered, never dropped). Unknown ``model``: 400.
Out-of-range options: 400 naming the field. Body over ``limits.max_body_bytes`` or a medium over
``limits.max_media_bytes``: 413. Running past ``request_timeout_s``: 504 and the work is cancelled; a
client that disconnects cancels downstream work. More than ``max_concurrent_requests`` at once, or a full
stage queue: 503 with ``Retry-After``. API keys (if configured): 401. Remote URLs: refused unless the host
is in ``allowed_remote_hosts``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymodal import media_io
from polymodal.config import DecoderDefaults
from polymodal.grounding.overlay import overlay_png
from polymodal.modality import Modality
from polymodal.types import LLMResult, MediaPart, SignalGroup, TextDelta, TextPart, Turn

from services.errors import APIError, Overloaded, bad_request
from services.metrics import CONTENT_TYPE, APIMetrics
from services.protocol import Backend, EncodedMedium, LLMRequest, RenderRequest
from services.schemas import (
    AudioContent,
    AudioGenerationRequest,
    AudioURLContent,
    ChatCompletionRequest,
    ImageContent,
    ImageGenerationRequest,
    TextContent,
    VideoContent,
    VideoCreateRequest,
)
from services.settings import ServerSettings
from services.store import FileStore, VideoJob

log = logging.getLogger(__name__)

_PART_KEY = {Modality.IMAGE: "image_url", Modality.AUDIO: "audio_url", Modality.VIDEO: "video_url"}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_FINISH = {"stop": "stop", "length": "length"}
# The images / audio / videos endpoints only need the LLM's short lead-in (returned as revised_prompt) and
# the group it emits or that is then forced: more text would only delay the medium. At most this many
# tokens, and at most the preset's generation.prompt_lead_in_tokens.
PROMPT_ENDPOINT_MAX_NEW_TOKENS = 32


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


# ---- helpers ---------------------------------------------------------------------------------------
def _loc_to_param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "list[...]", 1, "image_url")`` -> ``messages[0].content[1].image_url``."""
    out = ""
    for item in loc:
        if item in ("body", "query", "path"):
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str) and (any(c in item for c in "[(-") or item in ("str", "int", "float", "bool")):
            continue  # union-member tags pydantic adds to the location
        else:
            out += f".{item}" if out else str(item)
    return out or None


def _validation_error(errors: list[dict]) -> APIError:
    if not errors:
        errors = [{"loc": (), "msg": "invalid request"}]
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    # for a union (content: str | list of parts) pydantic reports one error per member: the deepest
    # location names the part that is actually wrong
    first = bad_json[0] if bad_json else max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param, code="invalid_value")


def _medium_of_mime(mime: str) -> Modality | None:
    top = mime.split("/", 1)[0]
    return Modality(top) if top in ("image", "audio", "video") else None


def _images(turns) -> list[MediaPart]:
    """The input images of a conversation, in message order (what ``image_index`` counts)."""
    return [p for t in turns for p in t.parts if isinstance(p, MediaPart) and p.modality is Modality.IMAGE]


def _interleave(text: str, media: list[tuple[int, int, Any]]) -> list[Any]:
    """Split ``text`` at each medium's text offset; ``media``: (index, text_offset, part) in any order."""
    parts: list[Any] = []
    cursor = 0
    for _, off, part in sorted(media, key=lambda x: x[0]):
        off = min(max(off, cursor), len(text))
        if text[cursor:off].strip():
            parts.append({"type": "text", "text": text[cursor:off].strip()})
        parts.append(part)
        cursor = off
    if text[cursor:].strip():
        parts.append({"type": "text", "text": text[cursor:].strip()})
    return parts


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


@dataclass
class ChatOutcome:
    text: str
    media: list[EncodedMedium]
    result: LLMResult
    groups: list[SignalGroup]
    overlay: tuple[EncodedMedium, int] | None = None  # (PNG, index of the image it was drawn on)


class _Admission:
    """Bounded admission: at most ``limit`` generation requests at once, else :class:`Overloaded`."""

    def __init__(self, limit: int, retry_after_s: int, metrics: APIMetrics):
        self.limit, self.retry_after_s, self.metrics = limit, retry_after_s, metrics
        self.active = 0

    def acquire(self) -> "_Slot":
        if self.active >= self.limit:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"the server is at capacity ({self.limit} requests running); retry later",
                             self.retry_after_s)
        self.active += 1
        self.metrics.inflight.set(self.active)
        return _Slot(self)


class _Slot:
    def __init__(self, adm: _Admission):
        self._adm, self._held = adm, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._adm.active -= 1
            self._adm.metrics.inflight.set(self._adm.active)


class _SSEResponse(StreamingResponse):
    """Server-sent events that stop (cancelling the producer) as soon as the client disconnects, whatever
    ASGI spec version the server speaks, and release the admission slot however the response ends."""

    def __init__(self, content, slot: _Slot, **kw):
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


class _BodyLimit:
    """Pure ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int, metrics: APIMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.metrics.rejected.labels("too_large").inc()
            err = APIError(413, f"the request body is {int(declared)} bytes; the limit is {self.max_bytes} bytes",
                           code="request_too_large")
            return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    self.metrics.rejected.labels("too_large").inc()
                    raise StarletteHTTPException(413, f"the request body exceeds the limit of {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class _RequestMetrics:
    """Pure ASGI middleware counting requests by route template and status, and their latency."""

    def __init__(self, app, metrics: APIMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)


# ---- the service -----------------------------------------------------------------------------------
class IngressService:
    """Request handling shared by the routes; see the module docstring for the rules."""

    def __init__(self, backend: Backend, settings: ServerSettings, store: FileStore):
        self.backend = backend
        self.settings = settings
        self.limits = settings.limits
        self.store = store
        self.metrics = APIMetrics()
        self.admission = _Admission(settings.max_concurrent_requests, settings.retry_after_s, self.metrics)
        self.model_name = settings.model_name or backend.preset.name
        self.media_limits = media_io.MediaLimits(
            max_bytes=self.limits.max_media_bytes,
            max_video_frames_sampled=self.limits.max_input_video_frames,
        )
        self._video_sem = asyncio.Semaphore(settings.max_video_jobs)
        self._video_tasks: set[asyncio.Task] = set()
        self._api_keys = settings.effective_api_keys()

    # ---- auth / model --------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if not self._api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not any(
            hmac.compare_digest(token.encode(), k.encode()) for k in self._api_keys
        ):
            self.metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

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
        merged = {**defaults.model_dump(), **{k: v for k, v in overrides.items() if k in DecoderDefaults.model_fields}}
        try:
            return DecoderDefaults.model_validate(merged)
        except ValidationError as e:
            err = e.errors()[0]
            param = prefix + ".".join(str(x) for x in err["loc"])
            raise bad_request(f"{param}: {err['msg']}", param=param, code="invalid_value") from None

    def parse_size(self, size: str | None, param: str = "size") -> dict[str, int]:
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

    # ---- input media -----------------------------------------------------------------------------
    async def _media_bytes(self, url: str, param: str) -> tuple[str | None, bytes]:
        """(mime or None, bytes) of a data URL or an allow-listed remote URL."""
        if url.startswith("data:"):
            try:
                return media_io.parse_data_url(url, limits=self.media_limits)
            except media_io.MediaError as e:
                raise self._media_error(e, param) from None
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise bad_request(f"{param}: expected a data URL (data:<type>;base64,...)", param=param,
                              code="invalid_url")
        host = (parsed.hostname or "").lower()
        if host not in {h.lower() for h in self.settings.allowed_remote_hosts}:
            raise bad_request(f"{param}: remote URLs are not fetched by this server (host {host!r} is not "
                              "allow-listed); send the medium inline as a data URL", param=param,
                              code="remote_url_not_allowed")
        return await self._fetch(url, param)

    async def _fetch(self, url: str, param: str) -> tuple[str | None, bytes]:
        import httpx

        limit = self.limits.max_media_bytes
        try:
            async with httpx.AsyncClient(timeout=self.settings.remote_fetch_timeout_s, follow_redirects=False) as c:
                async with c.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise bad_request(f"{param}: fetching the URL gave HTTP {r.status_code}", param=param,
                                          code="fetch_failed")
                    buf = bytearray()
                    async for chunk in r.aiter_bytes():
                        buf += chunk
                        if len(buf) > limit:
                            raise APIError(413, f"{param}: the remote medium exceeds {limit} bytes", param=param,
                                           code="media_too_large")
                    mime = r.headers.get("content-type", "").split(";")[0].strip().lower() or None
                    return mime, bytes(buf)
        except httpx.HTTPError as e:
            raise bad_request(f"{param}: could not fetch the URL ({type(e).__name__})", param=param,
                              code="fetch_failed") from None

    def _media_error(self, e: media_io.MediaError, param: str) -> APIError:
        if e.http_status == 413:
            self.metrics.rejected.labels("too_large").inc()
        return APIError(e.http_status, f"{param}: {e}", param=param,
                        code="media_too_large" if e.http_status == 413 else f"media_{e.code}")

    async def _decode(self, modality: Modality, data: bytes, mime: str | None, param: str) -> MediaPart:
        if modality not in self.backend.input_modalities:
            accepted = ", ".join(m.value for m in self.backend.input_modalities) or "none"
            raise bad_request(f"{param}: this model does not read {modality.value} input (it reads: {accepted})",
                              param=param, code="unsupported_modality")
        if mime is not None and _medium_of_mime(mime) not in (None, modality):
            raise bad_request(f"{param}: expected {modality.value} data, got MIME type {mime!r}", param=param,
                              code="media_unsupported")
        try:
            return await asyncio.to_thread(
                media_io.decode_media, modality, data, limits=self.media_limits,
                sample_rate_hz=self.settings.input_audio_sample_rate_hz,
                num_frames=self.limits.max_input_video_frames,
            )
        except media_io.MediaError as e:
            raise self._media_error(e, param) from None

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
            if isinstance(content, str):
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
                    if isinstance(c, ImageContent):
                        mime, data = await self._media_bytes(c.image_url.url, f"{pp}.image_url.url")
                        parts.append(await self._decode(Modality.IMAGE, data, mime, f"{pp}.image_url.url"))
                    elif isinstance(c, AudioContent):
                        data = self._b64(c.input_audio.data, f"{pp}.input_audio.data")
                        parts.append(await self._decode(Modality.AUDIO, data, f"audio/{c.input_audio.format}",
                                                        f"{pp}.input_audio.data"))
                    elif isinstance(c, AudioURLContent):
                        mime, data = await self._media_bytes(c.audio_url.url, f"{pp}.audio_url.url")
                        parts.append(await self._decode(Modality.AUDIO, data, mime, f"{pp}.audio_url.url"))
                    elif isinstance(c, VideoContent):
                        mime, data = await self._media_bytes(c.video_url.url, f"{pp}.video_url.url")
                        parts.append(await self._decode(Modality.VIDEO, data, mime, f"{pp}.video_url.url"))
            if not parts:
                raise bad_request(f"{p}.content: {'an' if msg.role[0] in 'aeiou' else 'a'} {msg.role} message needs content", param=f"{p}.content")
            turns.append(Turn(msg.role, tuple(parts)))
        if not turns or turns[-1].role != "user":
            raise bad_request("the last message must be the user's (system messages aside)", param="messages")
        return turns, ("\n".join(system) if system else None)

    def _b64(self, data: str, param: str) -> bytes:
        limit = self.limits.max_media_bytes
        if len(data) * 3 // 4 > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise APIError(413, f"{param}: about {len(data) * 3 // 4} bytes; the limit is {limit} bytes",
                           param=param, code="media_too_large")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: not valid base64", param=param, code="media_corrupt") from None

    # ---- planning ----------------------------------------------------------------------------------
    def _seed(self, seed: int | None) -> int:
        return secrets.randbelow(2**31 - 1) if seed is None else int(seed)

    async def plan_chat(self, req: ChatCompletionRequest, request_id: str) -> ChatPlan:
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
        requested: list[Modality] = []
        for k, name in enumerate(req.modalities or []):
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
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is not None and max_new > self.limits.max_new_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{param} must be <= {self.limits.max_new_tokens} on this server, got {max_new}",
                              param=param, code="invalid_value")
        options = {}
        for m in self.backend.output_modalities:
            given: BaseModel | None = getattr(req, m.value)
            overrides = given.model_dump(exclude_unset=True, exclude_none=True) if given is not None else {}
            options[m] = self.decoder_options(m, overrides, f"{m.value}.")
        self.check_grounding(req)
        turns, system = await self.build_turns(req)
        if req.box_overlay and not _images(turns):
            raise bad_request("box_overlay: the messages hold no image to draw the boxes on", param="box_overlay",
                              code="invalid_value")
        base_seed = self._seed(req.seed)
        return ChatPlan(
            request_id=request_id,
            llm=LLMRequest(request_id, tuple(turns), tuple(requested), max_new, req.temperature, req.top_p,
                           base_seed, system, task=req.task),
            options=options,
            base_seed=base_seed,
            requested=tuple(requested),
            media_format=req.media_format or self.settings.default_media_format,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            box_overlay=req.box_overlay,
        )

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
        base_seed = self._seed(seed)
        llm = LLMRequest(request_id, (Turn("user", (TextPart(prompt),)),), (modality,),
                         min(PROMPT_ENDPOINT_MAX_NEW_TOKENS, self.backend.preset.generation.prompt_lead_in_tokens,
                             self.limits.max_new_tokens), None, None, base_seed)
        return ChatPlan(request_id, llm, {modality: options}, base_seed, (modality,), fmt,
                        variant_seeds=tuple(base_seed + k for k in range(n)))

    # ---- running -----------------------------------------------------------------------------------
    async def _render(self, plan: ChatPlan, group: SignalGroup, seed: int) -> EncodedMedium:
        options = plan.options.get(group.modality) or self.backend.preset.decoders[group.modality].defaults
        return await self.backend.render(RenderRequest(plan.request_id, group, seed, options))

    async def events(self, plan: ChatPlan) -> AsyncIterator[tuple[str, Any]]:
        """Run a plan: yields ``("text", str)``, ``("medium", EncodedMedium)`` as each is ready, and finally
        ``("done", (LLMResult, groups))``. Closing / cancelling it cancels the LLM and every render.

        Raises:
            APIError (RenderFailed, Overloaded, StageUnavailable, 400 for a conversation the model refuses).
        """
        queue: asyncio.Queue = asyncio.Queue()
        renders: list[asyncio.Task] = []
        groups: list[SignalGroup] = []
        only_first = bool(plan.variant_seeds)

        def start(group: SignalGroup, seed: int) -> None:
            t = asyncio.ensure_future(self._render(plan, group, seed))
            t.add_done_callback(lambda t: queue.put_nowait(("render", t)))
            renders.append(t)

        async def produce() -> None:
            result = None
            try:
                async for item in self.backend.generate(plan.llm):
                    if isinstance(item, TextDelta):
                        queue.put_nowait(("text", item.text))
                    elif isinstance(item, SignalGroup):
                        if item.modality not in self.backend.output_modalities:
                            log.info("%s: no %s decoder; group %d skipped", plan.request_id, item.modality.value,
                                     item.index)
                            continue
                        if only_first and (groups or item.modality not in plan.requested):
                            continue
                        groups.append(item)
                        seeds = plan.variant_seeds if only_first else (plan.base_seed + item.index,)
                        for s in seeds:
                            start(item, s)
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
                if kind == "text":
                    yield "text", value
                elif kind == "error":
                    raise self._stage_error(value)
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
                        raise self._stage_error(exc)
                    yield "medium", value.result()
            yield "done", (result, groups)
        finally:
            pending = [t for t in (producer, *renders) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)

    def _stage_error(self, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, ValueError):  # the LLM stage refuses the conversation (caller's mistake)
            return bad_request(str(e).splitlines()[0] if str(e) else "invalid request", code="invalid_request")
        log.error("stage failure: %r", e, exc_info=e)
        return APIError(500, f"internal error in a model stage ({type(e).__name__})", type="server_error",
                        code="internal_error")

    async def collect(self, plan: ChatPlan) -> ChatOutcome:
        text: list[str] = []
        media: list[EncodedMedium] = []
        result, groups = None, []
        async for kind, value in self.events(plan):
            if kind == "text":
                text.append(value)
            elif kind == "medium":
                media.append(value)
            else:
                result, groups = value
        overlay = await self.overlay(plan, result) if plan.box_overlay else None
        return ChatOutcome(result.text if result is not None and result.text else "".join(text), media, result,
                           groups, overlay)

    async def overlay(self, plan: ChatPlan, result: LLMResult) -> tuple[EncodedMedium, int]:
        """The answer's boxes drawn on the image they refer to (the last image when there are none), as PNG."""
        images = _images(plan.llm.turns)
        k = result.boxes[0].image_index if result.boxes else len(images) - 1
        mine = [b for b in result.boxes if b.image_index == k]
        png = await asyncio.to_thread(overlay_png, images[k].data, mine)
        return EncodedMedium(Modality.IMAGE, png, "image/png", "png", seed=0, index=0,
                             text_offset=len(result.text)), k

    def overlay_part(self, overlay: tuple[EncodedMedium, int], index: int, fmt: str, base_url: str) -> dict[str, Any]:
        m, k = overlay
        return {"type": "image_url", "image_url": self.medium_ref(m, fmt, base_url), "mime_type": m.mime_type,
                "index": index, "overlay": True, "image_index": k}

    @staticmethod
    def boxes_json(result: LLMResult) -> list[dict[str, Any]]:
        """``message.boxes``: phrase, box (pixels of the sent image, 2 decimals), image_index, text_span."""
        return [{"phrase": b.phrase, "box": [round(float(v), 2) for v in b.box_px], "image_index": b.image_index,
                 "text_span": list(b.text_span) if b.text_span is not None else None} for b in result.boxes]

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

    # ---- output --------------------------------------------------------------------------------
    def base_url(self, request: Request) -> str:
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")

    def medium_ref(self, m: EncodedMedium, fmt: str, base_url: str) -> dict[str, Any]:
        """``{"url": data URL or artifact URL, ["expires_at"]}``."""
        if fmt == "url":
            art = self.store.put(m.data, m.mime_type, m.ext, self.settings.artifact_ttl_s)
            return {"url": f"{base_url}/v1/artifacts/{art.id}.{m.ext}", "expires_at": art.expires_at}
        return {"url": media_io.encode_data_url(m.data, m.mime_type)}

    def medium_part(self, m: EncodedMedium, fmt: str, base_url: str) -> dict[str, Any]:
        key = _PART_KEY[m.modality]
        self.metrics.media.labels(m.modality.value).inc()
        part = {"type": key, key: self.medium_ref(m, fmt, base_url), "mime_type": m.mime_type, "seed": m.seed,
                "index": m.index}
        if m.duration_s is not None:
            part["duration_s"] = m.duration_s
        return part

    def audio_message(self, m: EncodedMedium, transcript: str) -> dict[str, Any]:
        return {"id": f"audio_{uuid.uuid4().hex}", "data": base64.b64encode(m.data).decode("ascii"),
                "format": m.ext, "expires_at": int(time.time()) + self.settings.artifact_ttl_s,
                "transcript": transcript}

    def completion_body(self, plan: ChatPlan, out: ChatOutcome, base_url: str) -> dict[str, Any]:
        r = out.result
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.media:
            parts = [(m.index, m.text_offset, self.medium_part(m, plan.media_format, base_url)) for m in out.media]
            message["content"] = _interleave(out.text, parts)
            audio = next((m for m in sorted(out.media, key=lambda m: m.index) if m.modality is Modality.AUDIO), None)
            if audio is not None:
                message["audio"] = self.audio_message(audio, out.text)
        if out.overlay is not None:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content.strip()}] if content.strip() else []
            message["content"] = [*content, self.overlay_part(out.overlay, len(out.media), plan.media_format,
                                                              base_url)]
        if self.backend.preset.grounding is not None:
            message["boxes"] = self.boxes_json(r)
        return {
            "id": plan.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": f"polymodal-{self.backend.preset.name}",
            "seed": plan.base_seed,
            "choices": [{"index": 0, "message": message, "finish_reason": _FINISH.get(r.finish_reason, "stop"),
                         "logprobs": None}],
            "usage": self.usage(r),
        }

    @staticmethod
    def usage(r: LLMResult) -> dict[str, int]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def chunk(self, plan: ChatPlan, created: int, delta: dict | None, finish: str | None = None,
              usage: dict | None = None) -> bytes:
        import json

        body: dict[str, Any] = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "system_fingerprint": f"polymodal-{self.backend.preset.name}",
                                "choices": [] if delta is None else
                                [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def sse(self, plan: ChatPlan, base_url: str) -> AsyncIterator[bytes]:
        """The SSE body (see the module docstring); honours the request timeout.

        The plan runs in its own task feeding a queue, so a disconnect (this generator cancelled) or the
        timeout cancels that task, which cancels the LLM stream and every render.
        """
        import json

        loop = asyncio.get_running_loop()
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for ev in self.events(plan):
                    queue.put_nowait(("event", ev))
                queue.put_nowait(("end", None))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - sent as an error event
                queue.put_nowait(("error", self._stage_error(e)))

        task = asyncio.ensure_future(pump())

        def on_timeout() -> None:
            if not task.done():
                task.cancel()
                self.metrics.rejected.labels("timeout").inc()
                queue.put_nowait(("error", APIError(
                    504, f"the request did not finish within {self.settings.request_timeout_s:g} s and was "
                    "cancelled", type="server_error", code="timeout")))

        timer = loop.call_later(self.settings.request_timeout_s, on_timeout)
        first_audio = True
        text: list[str] = []
        n_media = 0
        try:
            yield self.chunk(plan, created, {"role": "assistant", "content": ""})
            while True:
                what, payload = await queue.get()
                if what == "end":
                    break
                if what == "error":
                    yield b"data: " + json.dumps(payload.body()).encode() + b"\n\n"
                    return
                kind, value = payload
                if kind == "text":
                    text.append(value)
                    yield self.chunk(plan, created, {"content": value})
                elif kind == "medium":
                    n_media += 1
                    part = self.medium_part(value, plan.media_format, base_url)
                    part["text_offset"] = value.text_offset
                    delta: dict[str, Any] = {"media": part}
                    if value.modality is Modality.AUDIO and first_audio:
                        first_audio = False
                        delta["audio"] = self.audio_message(value, "".join(text))
                    yield self.chunk(plan, created, delta)
                else:
                    result, _ = value
                    if plan.box_overlay:
                        part = self.overlay_part(await self.overlay(plan, result), n_media, plan.media_format,
                                                 base_url)
                        part["text_offset"] = len(result.text)
                        yield self.chunk(plan, created, {"media": part})
                    last = {"boxes": self.boxes_json(result)} if self.backend.preset.grounding is not None else {}
                    yield self.chunk(plan, created, last, _FINISH.get(result.finish_reason, "stop"))
                    if plan.include_usage:
                        yield self.chunk(plan, created, None, usage=self.usage(result))
            yield b"data: [DONE]\n\n"
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()

    # ---- one-medium endpoints --------------------------------------------------------------------
    async def media_items(self, plan: ChatPlan, request: Request) -> tuple[str, list[EncodedMedium]]:
        out: ChatOutcome = await self.guarded(request, self.collect(plan))
        return out.text, sorted(out.media, key=lambda m: m.seed)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def build_app(backend: Backend, settings: ServerSettings | None = None, *, store: FileStore | None = None) -> FastAPI:
    """The FastAPI app over ``backend`` (see the module docstring).

    Args:
        backend: the stages (:class:`services.local.LocalBackend`, :class:`services.ray_backend.RayBackend`
            or a test fake).
        settings: limits, timeouts, keys; defaults if ``None``.
        store: artifact / video-job store; default: ``FileStore(settings.store_dir or a new temp dir)``.
    """
    settings = settings or ServerSettings()
    if store is None:
        root = settings.store_dir or tempfile.mkdtemp(prefix="polymodal-store-")
        store = FileStore(root, ttl_s=settings.artifact_ttl_s)
        if not settings.store_dir:  # our own temp folder: removed with the store (or at exit)
            import shutil
            import weakref

            weakref.finalize(store, shutil.rmtree, root, ignore_errors=True)
    svc = IngressService(backend, settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for t in list(svc._video_tasks):
            t.cancel()

    app = FastAPI(title="polymodal", version="0.1.0", lifespan=lifespan,
                  description="Any-to-any generation (NExT-GPT style), OpenAI-compatible API.")
    app.state.service = svc

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = _validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status_code, "invalid_request_error")
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        err = APIError(e.status_code, str(e.detail), type=kind, code=code)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal server error ({type(e).__name__})", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    auth = Depends(svc.check_auth)

    # ---- chat -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        request_id = _new_id("chatcmpl")
        slot = svc.admission.acquire()
        streaming = False
        try:
            plan = await svc.guarded(request, svc.plan_chat(body, request_id))
            base = svc.base_url(request)
            if body.stream:
                streaming = True
                return _SSEResponse(svc.sse(plan, base), slot, headers={"X-Request-Id": request_id})
            out = await svc.guarded(request, svc.collect(plan))
            return JSONResponse(svc.completion_body(plan, out, base), headers={"X-Request-Id": request_id})
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                slot.release()

    # ---- images / audio ---------------------------------------------------------------------------
    async def _one_medium(request: Request, body, modality: Modality, overrides: dict, prefix_id: str):
        svc.check_model(body.model)
        svc.require_output(modality, "model")
        if body.n > svc.limits.max_n:
            raise bad_request(f"n must be <= {svc.limits.max_n} on this server, got {body.n}", param="n",
                              code="invalid_value")
        options = svc.decoder_options(modality, overrides, "")
        fmt = "url" if body.response_format == "url" else "inline"
        request_id = _new_id(prefix_id)
        slot = svc.admission.acquire()
        try:
            plan = svc.plan_prompt(body.prompt, modality, options, body.seed, body.n, request_id, fmt)
            text, media = await svc.media_items(plan, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            slot.release()
        base = svc.base_url(request)
        data = []
        for m in media:
            item: dict[str, Any] = {"revised_prompt": text, "seed": m.seed, "mime_type": m.mime_type}
            if fmt == "url":
                item.update(svc.medium_ref(m, "url", base))
            else:
                item["b64_json"] = base64.b64encode(m.data).decode("ascii")
            if m.duration_s is not None:
                item["duration_s"] = m.duration_s
            svc.metrics.media.labels(modality.value).inc()
            data.append(item)
        return JSONResponse({"created": int(time.time()), "id": request_id, "model": svc.model_name, "data": data},
                            headers={"X-Request-Id": request_id})

    @app.post("/v1/images/generations", dependencies=[auth])
    async def images_generations(body: ImageGenerationRequest, request: Request):
        overrides = svc.parse_size(body.size)
        overrides.update(body.model_dump(include={"num_inference_steps", "guidance_scale"}, exclude_none=True))
        return await _one_medium(request, body, Modality.IMAGE, overrides, "img")

    @app.post("/v1/audio/generations", dependencies=[auth])
    async def audio_generations(body: AudioGenerationRequest, request: Request):
        overrides = body.model_dump(include={"duration_s", "num_inference_steps", "guidance_scale"}, exclude_none=True)
        return await _one_medium(request, body, Modality.AUDIO, overrides, "aud")

    # ---- videos (async jobs) ----------------------------------------------------------------------
    @app.post("/v1/videos", dependencies=[auth])
    async def create_video(body: VideoCreateRequest):
        svc.check_model(body.model)
        svc.require_output(Modality.VIDEO, "model")
        overrides = svc.parse_size(body.size)
        overrides.update(body.model_dump(include={"num_frames", "fps", "num_inference_steps", "guidance_scale", "crf"},
                                         exclude_none=True))
        defaults = backend.preset.decoders[Modality.VIDEO].defaults
        fps = overrides.get("fps", defaults.fps)
        if body.seconds is not None and "num_frames" not in overrides:
            overrides["num_frames"] = max(1, round(body.seconds * fps))
            if overrides["num_frames"] > svc.limits.max_num_frames:
                raise bad_request(f"seconds: {body.seconds:g} s at {fps} fps is {overrides['num_frames']} frames; "
                                  f"the limit is {svc.limits.max_num_frames}", param="seconds", code="invalid_value")
        options = svc.decoder_options(Modality.VIDEO, overrides, "")
        running = sum(1 for t in svc._video_tasks if not t.done())
        if running >= settings.max_video_jobs + settings.max_video_queue:
            svc.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"{running} video jobs are queued or running; retry later", settings.retry_after_s)
        seed = svc._seed(body.seed)
        now = int(time.time())
        job = VideoJob(
            id=FileStore.new_id("video_"), model=svc.model_name, prompt=body.prompt, created_at=now,
            deadline_at=now + int(settings.video_job_timeout_s) + 5,
            seconds=f"{options.num_frames / options.fps:g}", size=f"{options.width_px}x{options.height_px}",
            num_frames=options.num_frames, fps=options.fps, seed=seed,
        )
        store.save_job(job)
        plan = svc.plan_prompt(body.prompt, Modality.VIDEO, options, seed, 1, job.id, "inline")
        task = asyncio.ensure_future(_run_video(job, plan))
        svc._video_tasks.add(task)
        task.add_done_callback(svc._video_tasks.discard)
        return JSONResponse(job.public())

    async def _run_video(job: VideoJob, plan: ChatPlan) -> None:
        try:
            async with svc._video_sem:
                job.status = "in_progress"
                job.progress = 1
                store.save_job(job)
                out = await asyncio.wait_for(svc.collect(plan), timeout=settings.video_job_timeout_s)
                video = out.media[0]
                art = store.put(video.data, video.mime_type, video.ext, settings.artifact_ttl_s)
                job.artifact_id, job.text = art.id, out.text
                job.status, job.progress = "completed", 100
                job.completed_at, job.expires_at = int(time.time()), art.expires_at
        except asyncio.TimeoutError:
            job.status = "failed"
            job.error = {"code": "timeout", "message": f"the video job exceeded {settings.video_job_timeout_s:g} s"}
        except APIError as e:
            job.status = "failed"
            job.error = {"code": e.code or "generation_failed", "message": e.message}
        except asyncio.CancelledError:
            job.status = "failed"
            job.error = {"code": "cancelled", "message": "the server stopped before the job finished"}
            store.save_job(job)
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the job
            log.exception("video job %s failed", job.id)
            job.status = "failed"
            job.error = {"code": "internal_error", "message": f"internal error ({type(e).__name__})"}
        store.save_job(job)

    def _job_or_404(video_id: str) -> VideoJob:
        job = store.load_job(video_id)
        if job is None:
            raise APIError(404, f"no video job {video_id!r}", type="not_found_error", param="video_id",
                           code="not_found")
        return job

    @app.get("/v1/videos/{video_id}", dependencies=[auth])
    async def get_video(video_id: str):
        return JSONResponse(_job_or_404(video_id).public())

    @app.get("/v1/videos/{video_id}/content", dependencies=[auth])
    async def get_video_content(video_id: str):
        job = _job_or_404(video_id)
        if job.status != "completed" or job.artifact_id is None:
            raise APIError(409, f"video {video_id!r} is {job.status}; its content is available once completed",
                           param="video_id", code="video_not_ready")
        got = store.get(job.artifact_id)
        if got is None:
            raise APIError(404, f"the content of video {video_id!r} has expired", type="not_found_error",
                           code="expired")
        art, data = got
        return Response(data, media_type=art.mime_type)

    # ---- artifacts --------------------------------------------------------------------------------
    @app.get("/v1/artifacts/{name}")
    async def get_artifact(name: str):
        got = store.get(name.split(".", 1)[0])
        if got is None:
            raise APIError(404, "unknown or expired artifact", type="not_found_error", code="not_found")
        art, data = got
        return Response(data, media_type=art.mime_type,
                        headers={"Cache-Control": f"private, max-age={max(0, art.expires_at - int(time.time()))}"})

    # ---- models / health / metrics -----------------------------------------------------------------
    async def _describe(timeout_s: float = 10.0) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(backend.describe(), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - reported as not ready
            return {"ready": False, "error": f"{type(e).__name__}: {e}"}

    def _model_card(parts: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": svc.model_name, "object": "model", "created": 0, "owned_by": "polymodal",
            "preset": backend.preset.name, "description": backend.preset.description,
            "input_modalities": ["text", *(m.value for m in backend.input_modalities)],
            "output_modalities": ["text", *(m.value for m in backend.output_modalities)],
            "decoder_defaults": {m.value: backend.preset.decoders[m].defaults.model_dump()
                                 for m in backend.output_modalities},
            "limits": settings.limits.model_dump(),
            "grounding": None if backend.preset.grounding is None else {
                "format": backend.preset.grounding.format, "tasks": list(backend.preset.grounding.tasks)},
            "parts": parts,
        }

    @app.get("/v1/models", dependencies=[auth])
    async def list_models():
        return {"object": "list", "data": [_model_card(await _describe())]}

    @app.get("/v1/models/{model_id}", dependencies=[auth])
    async def get_model(model_id: str):
        if model_id != svc.model_name:  # a missing resource: 404, as OpenAI answers
            raise APIError(404, f"model {model_id!r} not found; this server serves {svc.model_name!r}",
                           type="invalid_request_error", param="model_id", code="model_not_found")
        return _model_card(await _describe())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        parts = await _describe()
        ok = bool(parts.get("ready"))
        return JSONResponse({"status": "ready" if ok else "not_ready", "model": svc.model_name, "parts": parts},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        try:
            stats = await asyncio.wait_for(backend.stats(), timeout=5)
        except Exception:  # noqa: BLE001 - metrics never fail the scrape
            stats = {}
        return Response(svc.metrics.render(stats), media_type=CONTENT_TYPE)

    app.add_middleware(_BodyLimit, max_bytes=settings.limits.max_body_bytes, metrics=svc.metrics)
    app.add_middleware(_RequestMetrics, metrics=svc.metrics)
    return app
