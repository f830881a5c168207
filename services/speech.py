"""The speech stage: speech recognition and synthesis (:mod:`skills.asr`, :mod:`skills.tts`) off the event loop.

:class:`SpeechWorker` is host-independent: the Ray deployment (``services.deployments.SpeechServer``) and the
in-process backend (:class:`services.local.LocalBackend`, ``--no-ray``) both use it, so the two hosts answer alike.

- ``synthesize``: validates the request (voice, speed, length, something to say) before the first chunk, then
  speaks sentence after sentence in a thread pool, one sentence ahead of the consumer (sentence k+1 is being
  spoken while chunk k travels). Streams interleave fairly: each sentence is one task of the pool, so 16
  concurrent streams all get their first chunk early instead of waiting for whole answers. Cancelling the
  consumer stops before the next sentence. Chunks are PCM16 (:class:`services.protocol.SpeechAudioChunk`).
- ``transcribe``: one recogniser call in the pool.

Errors become :mod:`services.errors` kinds here (they pickle across Ray): an unknown voice is a 400 listing the
choices (``code: unknown_voice``, ``param: voice``), nothing to speak a 400 on ``input``, a language the recogniser
lacks a 400 on ``language``, an unusable audio a 400 on ``file``; a TTS program that is not installed a 503; an
engine that fails a 500 ``speech_failed``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from polymodal.types import Transcript

from services.errors import APIError, StageUnavailable, bad_request
from services.protocol import SpeechAudioChunk, SpeechRequest, TranscriptionRequest

log = logging.getLogger(__name__)


class SpeechConfig(BaseModel):
    """What the speech stage loads (also the ``speech`` section of ``services.app.AppArgs``).

    Attributes:
        tts_backends: text-to-speech engines in order of preference (``flite``, ``espeak-ng``, ``transformers``);
            OpenAI's voice names map onto the first one's voices. A program that is not installed is left out
            (reported by ``/ready`` and ``/v1/audio/voices``).
        tts_model: the ``transformers`` engine's model: a VITS / MMS-TTS hub id or folder.
        default_voice: the voice of requests that name none (default ``echo``: the most intelligible measured).
        asr_backend: ``pocketsphinx`` (offline, English) or ``transformers`` (Whisper, ``asr_model``).
        asr_model: the recogniser's model (a Whisper hub id or folder; for pocketsphinx an optional model folder).
        device: torch device of the transformers engines (``None``: cuda if available, else cpu).
        dtype: ``auto`` (float32 on CPU, float16 elsewhere), ``float32``, ``bfloat16``.
        max_concurrency: sentences / recognitions run at once (threads; each flite / espeak-ng sentence is a
            subprocess).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    tts_backends: list[str] = Field(default_factory=lambda: ["flite", "espeak-ng"], min_length=1, max_length=3)
    tts_model: str | None = None
    default_voice: str | None = None
    asr_backend: str = "pocketsphinx"
    asr_model: str | None = None
    device: str | None = None
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$")
    max_concurrency: int = Field(4, ge=1, le=64)


def pcm16(samples: np.ndarray) -> bytes:
    """float32 (S,) in [-1, 1] -> 16-bit signed little-endian PCM (rounded, clipped)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class SpeechWorker:
    """Runs a synthesizer and a recogniser in a thread pool for asyncio callers.

    Args:
        synthesizer: a :class:`skills.tts.Synthesizer` (``None``: no speech synthesis here).
        asr: a :class:`skills.asr.TranscribeSkill` (``None``: no recognition here).
        max_concurrency: threads.
    """

    def __init__(self, synthesizer=None, asr=None, max_concurrency: int = 4):
        self.synthesizer = synthesizer
        self.asr = asr
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency,
                                                               thread_name_prefix="speech")
        self.healthy = True
        self.last_error: str | None = None

    @classmethod
    def from_config(cls, config: SpeechConfig | dict | None = None) -> "SpeechWorker":
        """Build the engines of ``config`` (torch is imported only for the transformers engines).

        Raises:
            ValueError: an unknown backend or a missing model (lists the choices). skills.SkillLoadError: a model
            that cannot be loaded strictly.
        """
        from skills.asr import TranscribeSkill
        from skills.tts import build_synthesizer

        config = SpeechConfig.model_validate(config or {})
        device = config.device
        if device is None and (config.asr_backend == "transformers" or "transformers" in config.tts_backends):
            from polymodal.devices import resolve_device

            device = str(resolve_device(None))
        synthesizer = build_synthesizer(config.tts_backends, model=config.tts_model, device=device or "cpu",
                                        dtype=config.dtype, default_voice=config.default_voice)
        asr = TranscribeSkill(backend=config.asr_backend, model=config.asr_model, device=device or "cpu",
                              dtype=config.dtype)
        return cls(synthesizer, asr, config.max_concurrency)

    # ---- synthesis ------------------------------------------------------------------------------------------
    def _check(self, request: SpeechRequest):
        from skills.tts import NothingToSay, TTSUnavailable, UnknownVoice

        if self.synthesizer is None:
            raise StageUnavailable("speech synthesis is not configured on this server")
        try:
            return self.synthesizer.check(request.text, request.voice, request.speed)
        except UnknownVoice as e:
            raise APIError(400, str(e), param="voice", code="unknown_voice") from None
        except NothingToSay as e:
            raise bad_request(f"input: {e}", param="input", code="empty_input") from None
        except TTSUnavailable as e:
            raise StageUnavailable(str(e)) from None
        except ValueError as e:
            raise bad_request(str(e), code="invalid_value") from None

    def _speak(self, index: int, sentence: str, voice, speed: float) -> SpeechAudioChunk:
        from skills.tts import TTSFailed

        try:
            chunk = self.synthesizer.speak_sentence(index, sentence, voice, speed)
        except TTSFailed as e:
            self.last_error = str(e)
            raise APIError(500, f"speech synthesis failed: {e}", type="server_error", code="speech_failed") from None
        return SpeechAudioChunk(chunk.index, chunk.text, pcm16(chunk.samples), chunk.sample_rate_hz, chunk.voice)

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[SpeechAudioChunk]:
        """One chunk per sentence, in order (see the module docstring).

        Raises:
            APIError: 400 / 503 before the first chunk (see the module docstring); 500 ``speech_failed``.
        """
        sentences, voice = self._check(request)
        loop = asyncio.get_running_loop()

        def submit(k: int) -> asyncio.Future:
            return loop.run_in_executor(self._executor, self._speak, request.start_index + k, sentences[k], voice,
                                        request.speed)

        pending = submit(0)
        try:
            for k in range(len(sentences)):
                chunk = await pending
                pending = submit(k + 1) if k + 1 < len(sentences) else None
                yield chunk
        finally:
            if pending is not None and not pending.done():
                pending.cancel()  # not started yet: dropped; already running: its result is dropped

    async def synthesize_all(self, request: SpeechRequest) -> list[SpeechAudioChunk]:
        """Every chunk of :meth:`synthesize` (the whole answer)."""
        return [c async for c in self.synthesize(request)]

    # ---- recognition ----------------------------------------------------------------------------------------
    def _transcribe(self, request: TranscriptionRequest) -> Transcript:
        from skills.base import SkillError, SkillLoadError

        try:
            return self.asr.transcribe(request.samples, request.sample_rate_hz, language=request.language,
                                       prompt=request.prompt, temperature=request.temperature,
                                       vocabulary=request.vocabulary)
        except SkillLoadError as e:  # the preset's vocabulary (checked at start: polymodal.preflight)
            self.last_error = str(e)
            raise APIError(500, f"speech recognition cannot use its vocabulary: {e}", type="server_error",
                           code="speech_failed") from None
        except SkillError as e:
            if e.code == "invalid_arguments":
                raise bad_request(f"language: {e}", param="language", code="unsupported_language") from None
            if e.code == "invalid_input":
                raise bad_request(f"file: {e}", param="file", code="media_unsupported") from None
            self.last_error = str(e)
            raise APIError(500, f"speech recognition failed: {e}", type="server_error",
                           code="speech_failed") from None

    async def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """The transcript of ``request.samples``.

        Raises:
            APIError: 400 (language, unusable audio), 500 ``speech_failed``, 503 (no recogniser).
        """
        if self.asr is None:
            raise StageUnavailable("speech recognition is not configured on this server")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transcribe, request)

    # ---- description ----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Voices, the default voice, the output rate and what each side runs (``/v1/audio/voices``)."""
        synth = self.synthesizer
        return {
            "voices": [v.to_dict() for v in synth.voices()] if synth is not None else [],
            "default_voice": synth.default_voice if synth is not None else None,
            "sample_rate_hz": synth.sample_rate_hz if synth is not None else None,
            "tts": synth.describe() if synth is not None else None,
            "asr": self.asr.asr.describe() if self.asr is not None else None,
        }

    def describe(self) -> dict[str, Any]:
        """Readiness of the stage (``/ready``): what is loaded, what is missing, health."""
        d = self.info()
        d.pop("voices")
        d["healthy"] = self.healthy
        return d

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
