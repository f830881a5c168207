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
- ``POST /v1/audio/speech`` (OpenAI's text-to-speech: ``model``, ``input`` up to 4096 characters, ``voice``,
  ``response_format`` wav (default here) / pcm (16-bit LE mono, 24 kHz) / flac / mp3 / opus / aac, ``speed``
  0.25-4.0, ``stream_format`` absent (the whole file) / ``audio`` (the file's bytes as each sentence is encoded) /
  ``sse`` (``speech.audio.delta`` events, then ``speech.audio.done``)); ``GET /v1/audio/voices`` (ours: the
  voices, OpenAI's names first). An unknown voice is a 400 listing the choices (``code: unknown_voice``); nothing
  to speak, an over-long input, an unknown format or ``instructions``: 400. See :mod:`~services.ingress.routes.speech`.
- ``POST /v1/audio/transcriptions`` (OpenAI's speech-to-text, multipart: ``file``, ``model``, ``language``,
  ``prompt``, ``response_format`` json / text / verbose_json (segments and words with start / end seconds) / srt /
  vtt, ``temperature``, ``timestamp_granularities[]``). A corrupt or unsupported upload: 400 on ``file``; too
  large or too long (``limits.max_transcription_s``): 413. See :mod:`~services.ingress.routes.transcriptions`.
  Both run in the speech stage (``Backend.synthesize`` / ``Backend.transcribe``; 503 where none is deployed).
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

Modules (the contract above is kept here; each rule is implemented in one place)
-------------------------------------------------------------------------------
- :mod:`~services.ingress.app`: :func:`build_app` (the public entry): the app, its routers, handlers, middleware.
- :mod:`~services.ingress.routes`: one router per resource (``chat``, ``generations`` for images and audio,
  ``speech`` and ``transcriptions``, ``videos``, ``artifacts``, ``system`` for models / health / ready / metrics);
  routes are module-level functions that get the :class:`~services.ingress.service.IngressService` through
  ``Depends(get_service)``.
- :mod:`~services.ingress.planning`: request -> :class:`~services.ingress.planning.ChatPlan` (turns, options,
  seeds); :mod:`~services.ingress.media_input`: input media (URLs, base64, decoding under limits).
- :mod:`~services.ingress.running`: a plan over the backend (renders as groups arrive, timeout, disconnect);
  :mod:`~services.ingress.streaming`: the SSE driver; :mod:`~services.ingress.video_jobs`: background video jobs.
- :mod:`~services.ingress.responses`: the shape of every answer (completion body, chunks, media parts, audio).
- :mod:`~services.ingress.audio_formats`: speech PCM -> wav / pcm / flac / mp3 / opus / aac, whole or streamed.
- :mod:`~services.ingress.admission` (slots, 503), :mod:`~services.ingress.middleware` (body limit, request
  metrics), :mod:`~services.ingress.error_map` (exceptions and validation -> OpenAI error body).
"""

from __future__ import annotations

from services.ingress.app import build_app
from services.ingress.planning import PROMPT_ENDPOINT_MAX_NEW_TOKENS, ChatPlan
from services.ingress.service import IngressService

__all__ = ["PROMPT_ENDPOINT_MAX_NEW_TOKENS", "ChatPlan", "IngressService", "build_app"]
