"""Input media of a chat request: URL or base64 -> bytes -> decoded arrays, under the server's limits.

Data URLs are parsed strictly; ``http(s)://`` URLs are fetched only from ``allowed_remote_hosts``. Decoding uses
:mod:`polymodal.media_io` (numpy / Pillow / soundfile / PyAV, in a worker thread), so a bad or oversized medium
is refused (400 / 413) before any model work and the LLM stage receives arrays.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import urlparse

from polymodal import media_io
from polymodal.media_io import modality_of_mime
from polymodal.modality import Modality, modality_of_content_part
from polymodal.types import MediaPart

from services.errors import APIError, bad_request
from services.metrics import APIMetrics
from services.protocol import Backend
from services.schemas import AudioContent, AudioURLContent, ImageContent, VideoContent
from services.settings import ServerSettings


class MediaReader:
    """Reads the media parts of a request.

    Args:
        backend: what the model reads (``input_modalities``).
        settings: limits (``max_media_bytes``, ``max_input_video_frames``), remote hosts, input sample rate.
        metrics: ``rejected{reason="too_large"}``.
    """

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: APIMetrics):
        self.backend = backend
        self.settings = settings
        self.limits = settings.limits
        self.metrics = metrics
        self.media_limits = media_io.MediaLimits(
            max_bytes=self.limits.max_media_bytes,
            max_video_frames_sampled=self.limits.max_input_video_frames,
        )

    async def read_part(self, c: ImageContent | AudioContent | AudioURLContent | VideoContent, pp: str) -> MediaPart:
        """One content part (``pp``: its path in the request, e.g. ``messages[0].content[1]``) -> the decoded medium.

        Raises:
            APIError: 400 (bad URL, wrong medium, corrupt, not read by this model), 413 (too large).
        """
        if isinstance(c, AudioContent):  # OpenAI's input_audio: base64 (not a URL) and a format, read as audio
            modality = modality_of_mime(f"audio/{c.input_audio.format}")
            data = self.b64(c.input_audio.data, f"{pp}.input_audio.data")
            return await self.decode(modality, data, f"audio/{c.input_audio.format}", f"{pp}.input_audio.data")
        # a URL part: its type is a modality's content_part (image_url, audio_url, video_url)
        modality = modality_of_content_part(c.type)
        if modality is None:
            raise bad_request(f"{pp}.type: {c.type!r} is not a media part", param=f"{pp}.type")
        param = f"{pp}.{c.type}.url"
        mime, data = await self.media_bytes(getattr(c, c.type).url, param)
        return await self.decode(modality, data, mime, param)

    async def media_bytes(self, url: str, param: str) -> tuple[str | None, bytes]:
        """(mime or None, bytes) of a data URL or an allow-listed remote URL."""
        if url.startswith("data:"):
            try:
                return media_io.parse_data_url(url, limits=self.media_limits)
            except media_io.MediaError as e:
                raise self.media_error(e, param) from None
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

    def media_error(self, e: media_io.MediaError, param: str) -> APIError:
        if e.http_status == 413:
            self.metrics.rejected.labels("too_large").inc()
        return APIError(e.http_status, f"{param}: {e}", param=param,
                        code="media_too_large" if e.http_status == 413 else f"media_{e.code}")

    async def decode(self, modality: Modality, data: bytes, mime: str | None, param: str) -> MediaPart:
        if modality not in self.backend.input_modalities:
            accepted = ", ".join(m.value for m in self.backend.input_modalities) or "none"
            raise bad_request(f"{param}: this model does not read {modality.value} input (it reads: {accepted})",
                              param=param, code="unsupported_modality")
        if mime is not None and media_io.modality_of_mime(mime) not in (None, modality):
            raise bad_request(f"{param}: expected {modality.value} data, got MIME type {mime!r}", param=param,
                              code="media_unsupported")
        try:
            return await asyncio.to_thread(
                media_io.decode_media, modality, data, limits=self.media_limits,
                sample_rate_hz=self.settings.input_audio_sample_rate_hz,
                num_frames=self.limits.max_input_video_frames,
            )
        except media_io.MediaError as e:
            raise self.media_error(e, param) from None

    def b64(self, data: str, param: str) -> bytes:
        """Base64 (not a data URL) -> bytes, its size checked before decoding."""
        limit = self.limits.max_media_bytes
        if len(data) * 3 // 4 > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise APIError(413, f"{param}: about {len(data) * 3 // 4} bytes; the limit is {limit} bytes",
                           param=param, code="media_too_large")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: not valid base64", param=param, code="media_corrupt") from None
