"""Settings of the HTTP API: limits on every option, timeouts, admission, keys, storage (pydantic, bounded).

The same :class:`ServerSettings` configures the ingress under Ray Serve (``AppArgs.server``) and under plain
uvicorn (``--no-ray``). Every request option has a documented limit here; a request outside it gets 400
naming the field, a body or medium over its size limit gets 413.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from polymodal.constrained.grammars import ConstraintLimits

from polymodal.config import (
    MAX_DURATION_S,
    MAX_SCHEMA_BYTES,
    MAX_TOOLS,
    MAX_FPS,
    MAX_INFERENCE_STEPS,
    MAX_INPUT_VIDEO_FRAMES,
    MAX_NEW_TOKENS,
    MAX_NUM_FRAMES,
    MAX_SIZE_PX,
)


REQUEST_TIMEOUT_S = 120.0
"""The default request timeout (seconds): ``ServerSettings``, the CLI and every ``deploy/*.yaml`` use it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Model):
    """Upper bounds of request options (the server's; each is also capped by the field's absolute bound, the
    runtime's ``polymodal.config.MAX_*``: a server may tighten a bound, never exceed it).

    Attributes:
        max_body_bytes: size of one HTTP request body (413 above).
        max_media_bytes: size of one decoded input medium (413 above).
        max_media_inputs: media parts in one request.
        max_messages: messages in one conversation.
        max_new_tokens: ``max_tokens`` / ``max_completion_tokens``.
        max_inference_steps: decoder ``num_inference_steps``.
        max_height_px / max_width_px: image and video size (multiples of 8).
        max_num_frames: video frames.
        max_fps: video frame rate.
        max_duration_s: audio / video duration.
        max_n: ``n`` of the images and audio endpoints.
        max_input_video_frames: frames sampled from an input video.
        max_speech_input_chars: characters of ``/v1/audio/speech``'s ``input`` (OpenAI's 4096 at most).
        max_transcription_s: length of an audio sent to ``/v1/audio/transcriptions`` (413 above).
        max_schema_bytes: a ``response_format`` JSON schema, or all ``tools``' parameter schemas together, as
            compact JSON (400 naming the field above).
        max_tools: functions in ``tools``.
        max_parallel_tool_calls: calls in one answer with ``parallel_tool_calls`` (the grammar's bound).
        grammar_compile_timeout_s: compiling one request's grammar (400 naming the field above).
        grammar_cache_entries: compiled grammars kept (LRU) by the LLM stage.
    """

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_media_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_media_inputs: int = Field(8, ge=0, le=64)
    max_messages: int = Field(64, ge=1, le=1024)
    max_new_tokens: int = Field(1024, ge=1, le=MAX_NEW_TOKENS)
    max_inference_steps: int = Field(100, ge=1, le=MAX_INFERENCE_STEPS)
    max_height_px: int = Field(1024, ge=8, le=MAX_SIZE_PX)
    max_width_px: int = Field(1024, ge=8, le=MAX_SIZE_PX)
    max_num_frames: int = Field(64, ge=1, le=MAX_NUM_FRAMES)
    max_fps: int = Field(30, ge=1, le=MAX_FPS)
    max_duration_s: float = Field(MAX_DURATION_S, gt=0, le=MAX_DURATION_S)
    max_n: int = Field(4, ge=1, le=16)
    max_input_video_frames: int = Field(MAX_INPUT_VIDEO_FRAMES, ge=1, le=MAX_INPUT_VIDEO_FRAMES)
    max_speech_input_chars: int = Field(4096, ge=1, le=4096)
    max_transcription_s: float = Field(600.0, gt=0, le=3600)
    max_schema_bytes: int = Field(64 * 1024, ge=2, le=MAX_SCHEMA_BYTES)
    max_tools: int = Field(64, ge=1, le=MAX_TOOLS)
    max_parallel_tool_calls: int = Field(8, ge=1, le=64)
    grammar_compile_timeout_s: float = Field(5.0, gt=0, le=120)
    grammar_cache_entries: int = Field(256, ge=1, le=100_000)

    def constraint_limits(self) -> ConstraintLimits:
        """The bounds the LLM stage's grammar compiler works under (sent with each request that has a format)."""
        return ConstraintLimits(max_entries=self.grammar_cache_entries, max_schema_bytes=self.max_schema_bytes,
                                compile_timeout_s=self.grammar_compile_timeout_s,
                                max_parallel_calls=self.max_parallel_tool_calls)


class ServerSettings(_Model):
    """Behaviour of the HTTP API.

    Attributes:
        model_name: the ``model`` id clients send (default: the preset's name); other ids get 400.
        limits: see :class:`Limits`.
        request_timeout_s: a request still running after this is cancelled and answered 504. The one default
            (:data:`REQUEST_TIMEOUT_S`) of the CLI, this class and ``deploy/*.yaml``.
        max_concurrent_requests: generation requests one ingress replica runs at once; more get 503 with
            ``Retry-After`` (bounded admission, never an unbounded queue).
        admission_target: a request is admitted only while its predicted latency (from the measured seconds per
            queue place, :mod:`services.ingress.admission`) is at most this fraction of ``request_timeout_s``;
            otherwise 503 with ``Retry-After`` up front instead of a 504 after the work was spent.
        admission_cold_start: requests admitted at once before any has finished (nothing measured yet).
        retry_after_s: the least ``Retry-After`` value sent with 503.
        api_keys: if non-empty, ``/v1/*`` requires ``Authorization: Bearer <key>`` (401 otherwise). Also read
            from the ``POLYMODAL_API_KEYS`` environment variable (comma-separated) when empty here.
        allowed_remote_hosts: hosts whose ``http(s)://`` media URLs may be fetched; empty = only data URLs.
        remote_fetch_timeout_s: timeout of such a fetch.
        store_dir: folder of the artifact and video-job store (shared by every ingress replica of a node;
            use a shared volume across nodes). ``None``: a folder under the system temp dir.
        artifact_ttl_s: lifetime of stored artifacts (every generated medium: the references in answers, ``url``
            media, video results).
        public_base_url: base of artifact URLs (e.g. behind a proxy); ``None``: the request's own base URL.
        default_media_format: ``inline`` (data URLs) or ``url`` (artifact URLs) in the media arrays of chat answers
            (``images``, ``audios``, ``videos``; ``content`` always references the artifacts).
        max_video_jobs: video jobs one ingress replica runs at once (queued ones wait; beyond
            ``max_video_queue`` more get 503).
        max_video_queue: video jobs waiting per replica.
        video_job_timeout_s: a video job still unfinished after this is failed.
        input_audio_sample_rate_hz: sample rate input audio is resampled to for the encoders.
        max_skill_rounds: skill rounds of one chat request at most (generate until a skill call, run it, append its
            result, continue); a request's own ``max_skill_rounds`` may only lower it. After the last round the
            model answers without skills.
        skill_timeout_s: one skill call's time at most (also bounded by what is left of ``request_timeout_s``);
            past it the model reads an error result.
    """

    model_name: str | None = None
    limits: Limits = Limits()
    request_timeout_s: float = Field(REQUEST_TIMEOUT_S, gt=0, le=3600)
    max_concurrent_requests: int = Field(64, ge=1, le=10_000)
    admission_target: float = Field(0.8, gt=0, le=1)
    admission_cold_start: int = Field(8, ge=1, le=10_000)
    retry_after_s: int = Field(1, ge=1, le=3600)
    api_keys: tuple[str, ...] = ()
    allowed_remote_hosts: tuple[str, ...] = ()
    remote_fetch_timeout_s: float = Field(10.0, gt=0, le=120)
    store_dir: str | None = None
    artifact_ttl_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    public_base_url: str | None = None
    default_media_format: Literal["inline", "url"] = "inline"
    max_video_jobs: int = Field(1, ge=1, le=64)
    max_video_queue: int = Field(8, ge=0, le=1000)
    video_job_timeout_s: float = Field(1800.0, gt=0, le=24 * 3600)
    input_audio_sample_rate_hz: int = Field(16000, ge=8000, le=48000)
    max_skill_rounds: int = Field(4, ge=1, le=32)
    skill_timeout_s: float = Field(30.0, gt=0, le=3600)

    def effective_api_keys(self) -> tuple[str, ...]:
        if self.api_keys:
            return self.api_keys
        env = os.environ.get("POLYMODAL_API_KEYS", "")
        return tuple(k.strip() for k in env.split(",") if k.strip())
