"""``POST /v1/audio/transcriptions`` (OpenAI's speech-to-text): a multipart upload -> the transcript.

Form fields (:class:`services.schemas.TranscriptionForm`): ``file`` (WAV, FLAC, OGG Vorbis / Opus or MP3; at most
``limits.max_media_bytes`` and ``limits.max_transcription_s`` long, else 413), ``model``, ``language``, ``prompt``,
``response_format`` (``json`` / ``text`` / ``verbose_json`` / ``srt`` / ``vtt``), ``temperature``,
``timestamp_granularities[]`` (``segment``, ``word``: ``verbose_json`` only). The upload is decoded here
(:func:`polymodal.media.audio.decode_audio`, in a thread, resampled to 16 kHz mono) so a corrupt or unsupported file
is a 400 before any model work; the recogniser runs in the speech stage.

``verbose_json`` follows OpenAI's: ``task``, ``language`` (a name, ``english``), ``duration``, ``text``,
``segments`` (``id``, ``seek``, ``start``, ``end``, ``text``, ``tokens`` (empty: the recogniser's own tokens are
not OpenAI's), ``temperature``, ``avg_logprob`` and ``no_speech_prob`` (``null``: not measured),
``compression_ratio`` (of the segment's text, zlib)), ``words`` (``word``, ``start``, ``end``) and ``usage``
(``{"type": "duration", "seconds"}``).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from polymodal import media_io
from polymodal.media.audio import decode_audio
from polymodal.types import Transcript

from services.errors import APIError, bad_request
from services.ingress.error_map import stage_error, validation_error
from services.ingress.planning import new_id, request_kind
from services.ingress.routes.speech import check_speech_model
from services.ingress.running import ClientGone
from services.ingress.service import IngressService, get_service, require_api_key
from services.protocol import TranscriptionRequest
from services.schemas import TranscriptionForm

router = APIRouter(dependencies=[Depends(require_api_key)])

ASR_MODEL_NAMES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
"""OpenAI's transcription model names, accepted as aliases of this server's model."""

TRANSCRIPTION_SAMPLE_RATE_HZ = 16000
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "pt": "portuguese", "nl": "dutch", "ru": "russian", "zh": "chinese", "ja": "japanese",
                  "ko": "korean", "ar": "arabic", "hi": "hindi", "pl": "polish", "tr": "turkish", "sv": "swedish"}


async def read_form(request: Request, svc: IngressService) -> tuple[TranscriptionForm, bytes]:
    """The form's fields (validated) and the file's bytes.

    Raises:
        APIError: 400 (not multipart, no ``file``, a field out of range), 413 (the file is too large).
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data with a 'file' field", code="invalid_content_type")
    async with request.form(max_files=1, max_fields=32) as form:
        fields: dict[str, Any] = {}
        for key in ("model", "language", "prompt", "response_format", "temperature", "stream"):
            value = form.get(key)
            if isinstance(value, str) and value != "":
                fields[key] = value
        grans = [v for k in ("timestamp_granularities[]", "timestamp_granularities") for v in form.getlist(k)]
        if grans:
            fields["timestamp_granularities"] = grans
        try:
            parsed = TranscriptionForm.model_validate(fields)
        except ValidationError as e:
            raise validation_error(list(e.errors(include_url=False))) from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("file: an audio file is required (a multipart file field named 'file')", param="file",
                              code="missing_file")
        limit = svc.limits.max_media_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            svc.metrics.rejected.labels("too_large").inc()
            raise APIError(413, f"file: over the limit of {limit} bytes", param="file", code="media_too_large")
    return parsed, data


async def decode_upload(svc: IngressService, data: bytes):
    """float32 (S,) at 16 kHz.

    Raises:
        APIError: 400 ``media_corrupt`` / ``media_unsupported``, 413 ``media_too_large`` (bytes or duration)."""
    limits = media_io.MediaLimits(max_bytes=svc.limits.max_media_bytes,
                                  max_audio_duration_s=svc.limits.max_transcription_s)
    if not data:
        raise bad_request("file: the file is empty", param="file", code="media_corrupt")
    try:
        return await asyncio.to_thread(decode_audio, data, target_sample_rate_hz=TRANSCRIPTION_SAMPLE_RATE_HZ,
                                       limits=limits)
    except media_io.MediaError as e:
        raise svc.media.media_error(e, "file") from None


def _segment(s, temperature: float) -> dict[str, Any]:
    raw = s.text.encode("utf-8")
    return {"id": s.id, "seek": 0, "start": round(s.start_s, 3), "end": round(s.end_s, 3), "text": s.text,
            "tokens": [], "temperature": temperature, "avg_logprob": None,
            "compression_ratio": round(len(raw) / max(1, len(zlib.compress(raw))), 4) if raw else 0.0,
            "no_speech_prob": None}


def verbose_body(t: Transcript, form: TranscriptionForm) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` (see the module docstring)."""
    grans = set(form.timestamp_granularities) or {"segment"}
    body: dict[str, Any] = {"task": "transcribe", "language": LANGUAGE_NAMES.get(t.language, t.language),
                            "duration": round(t.duration_s, 3), "text": t.text}
    if "segment" in grans:
        body["segments"] = [_segment(s, form.temperature) for s in t.segments]
    if "word" in grans:
        body["words"] = [{"word": w.word, "start": round(w.start_s, 3), "end": round(w.end_s, 3)} for w in t.words]
    body["usage"] = {"type": "duration", "seconds": math.ceil(t.duration_s)}
    return body


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(t: Transcript, fmt: str) -> str:
    """The segments as SubRip (``srt``) or WebVTT (``vtt``) cues."""
    if fmt == "srt":
        return "".join(f"{k}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{s.text}\n\n"
                       for k, s in enumerate(t.segments, 1))
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{s.text}\n\n"
                                  for s in t.segments)


@router.post("/v1/audio/transcriptions")
async def create_transcription(request: Request, svc: IngressService = Depends(get_service)):
    form, data = await read_form(request, svc)
    check_speech_model(svc, form.model, ASR_MODEL_NAMES)
    if form.stream:
        raise bad_request("streamed transcription is not supported; leave 'stream' out", param="stream",
                          code="unsupported_parameter")
    if form.timestamp_granularities and form.response_format != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format 'verbose_json'",
                          param="timestamp_granularities", code="invalid_value")
    request_id = new_id("transcription")
    slot = svc.admission.acquire(request_kind("transcription"))
    try:
        samples = await decode_upload(svc, data)
        req = TranscriptionRequest(request_id, samples, TRANSCRIPTION_SAMPLE_RATE_HZ,
                                   form.language.lower().split("-")[0] if form.language else None, form.prompt,
                                   form.temperature)
        try:
            t: Transcript = await svc.runner.guarded(request, svc.backend.transcribe(req))
            slot.completed()
        except (APIError, ClientGone):
            raise
        except Exception as e:  # noqa: BLE001 - a stage's error as the API's
            raise stage_error(e) from None
    except ClientGone:
        return Response(status_code=499)
    finally:
        slot.release()
    headers = {"X-Request-Id": request_id}
    if form.response_format == "text":
        return PlainTextResponse(t.text + "\n", headers=headers)
    if form.response_format in ("srt", "vtt"):
        return PlainTextResponse(subtitles(t, form.response_format), headers=headers,
                                 media_type="text/vtt" if form.response_format == "vtt" else "application/x-subrip")
    if form.response_format == "verbose_json":
        return JSONResponse(verbose_body(t, form), headers=headers)
    return JSONResponse({"text": t.text, "usage": {"type": "duration", "seconds": math.ceil(t.duration_s)}},
                        headers=headers)
