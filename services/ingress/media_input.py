"""Input media of a chat request: URL or base64 -> bytes -> decoded arrays, under the server's limits.

Data URLs are parsed strictly; this server's own artifact URLs (any host, the ``/v1/artifacts/{id}.{ext}`` path,
an id in the store) are read from the store, never fetched; other ``http(s)://`` URLs are fetched only from
``allowed_remote_hosts`` and never in an assistant message (a 400 there). Decoding uses
:mod:`polymodal.media_io` (numpy / Pillow / soundfile / PyAV, in a worker thread), so a bad or oversized medium
is refused (400 / 413) before any model work and the LLM stage receives arrays. Where the preset transcribes spoken
input, a user's video is decoded with its sound track (``MediaPart.sound_track``, for
:mod:`services.ingress.spoken_input`).
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
from services.ingress.media_refs import artifact_id_of
from services.ingress.spoken_input import is_speech, reads_audio_as_text, transcribes_speech
from services.metrics import APIMetrics
from services.protocol import Backend
from services.schemas import AudioContent, AudioURLContent, ImageContent, VideoContent
from services.settings import ServerSettings
from services.store import FileStore


class MediaReader:
    """Reads the media parts of a request.

    Args:
        backend: what the model reads (``input_modalities``).
        settings: limits (``max_media_bytes``, ``max_input_video_frames``), remote hosts, input sample rate,
            ``request_timeout_s`` (the longest wait for an artifact still being generated).
        metrics: ``rejected{reason="too_large"}``.
        store: the artifacts our own URLs name.
    """

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: APIMetrics, store: FileStore):
        self.backend = backend
        self.store = store
        self.settings = settings
        self.limits = settings.limits
        self.metrics = metrics
        self.media_limits = media_io.MediaLimits(
            max_bytes=self.limits.max_media_bytes,
            max_video_frames_sampled=self.limits.max_input_video_frames,
        )

    async def read_part(self, c: ImageContent | AudioContent | AudioURLContent | VideoContent, pp: str, *,
                        assistant: bool = False) -> MediaPart:
        """One content part (``pp``: its path in the request, e.g. ``messages[0].content[1]``) -> the decoded medium.

        Raises:
            APIError: 400 (bad URL, wrong medium, corrupt, not read by this model, unknown artifact, a remote URL
            in an assistant message), 413 (too large).
        """
        return (await self.read_part_bytes(c, pp, assistant=assistant))[0]

    async def read_part_bytes(self, c: ImageContent | AudioContent | AudioURLContent | VideoContent, pp: str, *,
                              assistant: bool = False) -> tuple[MediaPart, bytes]:
        """:meth:`read_part` and the file it was decoded from."""
        if isinstance(c, AudioContent):  # OpenAI's input_audio: base64 (not a URL) and a format, read as audio
            modality = modality_of_mime(f"audio/{c.input_audio.format}")
            data = self.b64(c.input_audio.data, f"{pp}.input_audio.data")
            return await self.decode(modality, data, f"audio/{c.input_audio.format}", f"{pp}.input_audio.data",
                                     sound=not assistant), data
        # a URL part: its type is a modality's content_part (image_url, audio_url, video_url)
        modality = modality_of_content_part(c.type)
        if modality is None:
            raise bad_request(f"{pp}.type: {c.type!r} is not a media part", param=f"{pp}.type")
        param = f"{pp}.{c.type}.url"
        mime, data = await self.media_bytes(getattr(c, c.type).url, param, assistant=assistant)
        return await self.decode(modality, data, mime, param, sound=not assistant), data

    async def stored(self, artifact_id: str, param: str) -> tuple[str, bytes]:
        """(mime, bytes) of one of our artifacts; one still being generated is waited for (``request_timeout_s``).

        Raises:
            APIError: 400 unknown / expired (``artifact_not_found``) or failed (``artifact_failed``); 504 still
            pending after the wait.
        """
        art, data = await self.store.wait(artifact_id, self.settings.request_timeout_s)
        if art is None:
            raise bad_request(f"{param}: artifact {artifact_id} is unknown or has expired (artifacts are kept "
                              f"{self.settings.artifact_ttl_s} s); send the medium itself as a data URL", param=param,
                              code="artifact_not_found")
        if art.state == "failed":
            raise bad_request(f"{param}: artifact {artifact_id} holds no medium (its generation failed: {art.error})",
                              param=param, code="artifact_failed")
        if data is None:
            raise APIError(504, f"{param}: artifact {artifact_id} was still being generated", param=param,
                           type="server_error", code="timeout")
        return art.mime_type, data

    async def media_bytes(self, url: str, param: str, *, assistant: bool = False) -> tuple[str | None, bytes]:
        """(mime or None, bytes) of a data URL, one of our artifact URLs, or (not in an assistant message) an
        allow-listed remote URL."""
        if url.startswith("data:"):
            try:
                return media_io.parse_data_url(url, limits=self.media_limits)
            except media_io.MediaError as e:
                raise self.media_error(e, param) from None
        artifact_id = artifact_id_of(url)
        if artifact_id is not None and (assistant or self.store.lookup(artifact_id) is not None):
            return await self.stored(artifact_id, param)
        if assistant:
            raise bad_request(f"{param}: an assistant message may hold only media this server generated (its "
                              f"/v1/artifacts/ URLs) or data URLs; {url[:100]!r} is neither (it is never fetched)",
                              param=param, code="invalid_history_reference")
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

    async def decode(self, modality: Modality, data: bytes, mime: str | None, param: str, *,
                     sound: bool = False) -> MediaPart:
        """``data`` -> the decoded part, in a worker thread; ``sound``: a user's medium, whose video's sound track is
        decoded too where the preset transcribes spoken input.

        Raises:
            APIError: 400 (not read by this model, wrong medium, corrupt), 413 (too large).
        """
        if modality not in self.backend.input_modalities and not (
                is_speech(modality) and reads_audio_as_text(self.backend.preset, self.backend.input_modalities)):
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
                sound_track=sound and transcribes_speech(self.backend.preset),
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
