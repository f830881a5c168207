"""The HTTP API: one FastAPI app over a :class:`services.protocol.Backend` (imports no torch).

Hosted by Ray Serve (:class:`services.deployments.IngressServer`, backend = DeploymentHandles) or by plain
uvicorn (``--no-ray``, backend = the in-process pipeline): same endpoints, schemas and errors.

Endpoints
---------
- ``POST /v1/chat/completions``: content parts ``text``, ``image_url`` (data URL), ``input_audio``
  {data, format}, ``audio_url`` / ``video_url`` (data URLs). Input media are decoded here with
  :mod:`polymodal.media_io` (numpy / Pillow / soundfile / PyAV, in a worker thread), so bad or oversized
  media are refused (400 / 413) before any model work, and the LLM stage receives arrays.
  History: an assistant message sent back may carry our own media (see "The answer's shape": the references in
  its ``content``, the ``images`` / ``audios`` / ``videos`` arrays, ``audio.id``); they resolve to the same media
  from the store (:mod:`~services.ingress.history`). Only our own artifact URLs count there (any host or base,
  the ``/v1/artifacts/{id}.{ext}`` path, the id in the store) besides data URLs (the medium itself, e.g. a
  chat UI's inline ``![](data:...)``); an unknown or expired id
  (``artifact_not_found``), a failed one (``artifact_failed``), or a media reference to anything else
  (``invalid_history_reference``) is a 400 naming the field: never fetched, never dropped. A user's content part
  may also name one of our artifact URLs (read from the store, no fetch); links in user text stay text.

  Grounding (a model whose preset has ``grounding``; ``/v1/models`` lists its ``grounding.tasks``): request
  field ``task`` (e.g. ``"grounding"``, ``"refer"``; its identifier goes before the last user text; an
  unknown task, or any task on a model without grounding: 400 naming the choices) and ``box_overlay: true``
  (needs an input image). The answer's boxes come as ``message.boxes``: ``[{"phrase", "box": [x1, y1, x2,
  y2], "image_index", "text_span"}]`` with ``box`` in pixels of the image the user sent (after its EXIF
  orientation; 2 decimals, x right, y down), ``image_index`` the image among the request's images (in
  message order; boxes refer to the last one) and ``text_span`` [start, end) of the phrase in the answer
  text (the answer's text without its media references, as ``parts``' ``text_offset``; a span before the first
  reference is the same in ``content``), or null; the
  grounding markup is removed from the text. With ``box_overlay`` the answer's last image is that image with
  the boxes drawn (Pillow): referenced at the end of ``content``, last in ``images`` (``"overlay": true``),
  and in ``parts`` as ``{..., "overlay": true, "image_index"}``. ``message.boxes`` is present (maybe empty)
  on every answer of a grounding model.
  Decoder options per output modality (all optional; defaults: the preset's): ``image`` / ``video``
  {num_inference_steps, guidance_scale, height_px, width_px}, ``audio`` {num_inference_steps, guidance_scale,
  duration_s}, ``video`` also {num_frames, fps, crf} (``crf``: libx264's constant rate factor of the returned
  MP4, 0-51, lower keeps the decoder's frames closer; presets default to 18, the toy preset to 12 for its
  16 px frames).
- ``POST /v1/images/generations``: the prompt goes through the LLM with the image group required; the
  ``n`` images are rendered from that group with seeds ``seed + k`` (one decoder batch); ``data[k].b64_json``
  (default) or ``url`` (+ ``expires_at``).
- ``POST /v1/audio/generations``: the same for audio (WAV); ``data[k].b64_json`` or ``url``.
- ``POST /v1/images/edits`` (issue #27; OpenAI's multipart shape, see :mod:`~services.ingress.routes.edits`): one
  ``image`` file, optional ``mask`` (PNG with alpha; transparent = may change), ``prompt``, ``n``, ``size``,
  ``response_format`` (+ ``seed``, ``num_inference_steps``, ``guidance_scale``, and ``strength`` or
  ``image_guidance_scale``: the edit option the image decoder reads): the prompt through the LLM with the image
  group required (the source image before it when the model reads images), that group rendered ``n`` times from
  the source (img2img, or an InstructPix2Pix decoder's own pipeline; with a mask, the source's pixels kept outside
  it), the answer as ``/v1/images/generations``'. Bad input: 400 naming the field (``image``, ``mask``,
  ``strength``, ...); the edit option the decoder does not read: 400 ``unsupported_parameter``.
- Chat edits: ``edit`` in a chat request renders the answer's images from an image of the conversation instead of
  from noise, and puts ``image`` into the answer's floor. The rule: ``edit: true`` takes the last image of the last
  user message (uploaded, or one of our artifact URLs as an ``image_url`` part), else the conversation's most recent
  image (an earlier answer's image sent back in the history counts); ``edit: "<artifact id or URL>"`` takes that
  artifact. References resolve from the store only, never fetched: unknown or expired is a 400
  (``artifact_not_found``, param ``edit``); none in the conversation: 400 ``no_image_to_edit``. The source is
  resized to the answer's image size; ``image.strength`` says how far the edit may go (default: the preset's), or,
  for an InstructPix2Pix image decoder, ``image.image_guidance_scale`` how closely it follows the source.
  Video edits (video-to-video): ``edit`` naming a video artifact, or ``edit: true`` when ``modalities`` ask for
  video and not image (the conversation's most recent video; none: 400 ``no_video_to_edit``); the source's frames
  are resized to the answer's video size and sampled to its ``video.num_frames``; ``video.strength`` as above.
  The rule in full: :mod:`~services.ingress.edit_sources`. ``GET /v1/models``: ``edits`` says which media each
  decoder can edit (``{"image": ["whole", "masked"], "video": ["whole"]}``), ``edit_options`` which option its
  edits read (``{"image": ["strength"], ...}``; ``["image_guidance_scale"]`` for InstructPix2Pix); a request
  setting the other is a 400 (:func:`~services.ingress.edit_sources.check_edit_options`).
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
- ``GET /v1/skills`` (the served skills: name, description, JSON schema, the deployment hosting each) and
  ``POST /v1/skills/{name}`` (one call on ``{"arguments", "input": [content parts]}``; 404 unknown skill, 400
  ``invalid_arguments`` / ``invalid_input``, 422 ``skill_failed``): :mod:`~services.ingress.routes.skills`. In chat,
  ``skills: [...]`` enables server-side skills for the model (the loop: :mod:`~services.ingress.skill_loop`; the
  answer's ``message.skill_calls``, ``message.masks``, skills' boxes in ``message.boxes``).
- ``GET /v1/artifacts/{id}.{ext}``: every generated medium, until it expires (``artifact_ttl_s``). One still being
  rendered (its reference already streamed) is waited for, at most ``request_timeout_s`` (then 504); one whose
  render failed: 500 ``generation_failed`` saying why; unknown or expired: 404.
- ``GET /v1/models``: one entry per served model with ``architecture`` (OpenRouter's shape, which model pickers
  read): ``{"modality": "text+image+audio+video->text+image+audio+video", "input_modalities": ["text", ...],
  "output_modalities": ["text", ...]}`` ("text" always included; also as top-level ``input_modalities`` /
  ``output_modalities``), decoder defaults, limits, grounding, parts. ``GET /health`` (process up), ``GET /ready``
  (every stage loaded; 503 otherwise), ``GET /metrics`` (Prometheus, see :mod:`services.metrics`).

The answer's shape (one rule for every client: litellm and the ``llm`` CLI read a string, LangChain keeps only
``content``, streaming clients read ``delta.content``; :mod:`~services.ingress.responses` builds it)
-----------------------------------------------------------------------------------------------------------------
Every generated medium is stored as an artifact with an id (expiry ``artifact_ttl_s``) whatever the format asked.
The per-modality names come from each modality's registered spec (``label``, ``answer_field``, ``inline_markdown``, ``content_part``, ``message_slot``).

- ``message.content``: always a string: the answer's text with a markdown reference where each medium was
  emitted, ``![image 1](URL)`` for images, ``[audio 1](URL)`` / ``[video 1](URL)`` for the others (numbered per
  modality in output order), URL = ``{public_base_url or the request's base}/v1/artifacts/{id}.{ext}``. A
  reference stands in a paragraph of its own (a blank line before and after; the whitespace around it dropped;
  an answer's trailing whitespace too) (:mod:`~services.ingress.content`).
- ``message.images`` ``[{"type": "image_url", "image_url": {"url"}, "index"}]`` (OpenRouter's and Vercel's
  convention, which litellm reads as ``message.images``), ``message.audios`` (``audio_url``) and
  ``message.videos`` (``video_url``) of the same form, present when not empty; ``index`` is the place in that
  array (``image 1`` is index 0). ``url`` follows ``media_format``: ``inline`` (the default,
  ``default_media_format``; a data URL, as OpenRouter sends) or ``url`` (the artifact URL).
- ``message.audio``: OpenAI's slot ``{id, data (base64 WAV), format, expires_at, transcript}`` for the answer's
  first sound (``id`` is its artifact id, ``transcript`` the answer's text).
- ``message.parts`` (extension; every chat answer): text and media in output order, as the in-process pipeline
  places them (:func:`polymodal.types.interleave`): ``{"type": "text", "text"}`` (stripped pieces of the answer's
  text) and ``{"type": "image_url", "image_url": {"url": artifact URL}, "artifact_id", "mime_type", "seed",
  "index" (among the answer's media), "text_offset" (where it belongs in the answer's text)[, "duration_s"]}``
  (``audio_url``, ``video_url`` alike).
- ``message.boxes`` (grounding models). Medium k of an answer is rendered with seed ``seed + k``.
- ``message.input_transcripts`` (a preset with ``spoken_transcript``; see :mod:`~services.ingress.spoken_input`):
  what each audio part of the user's messages said, ``[{message_index, content_index, text, duration_s,
  sent_to_llm}]``; the first streamed chunk carries it too (``delta.input_transcripts``).

Streaming (``stream: true``) is Server-Sent Events of ``chat.completion.chunk`` objects:

1. ``delta: {"role": "assistant", "content": ""}``
2. text: ``delta: {"content": "<text>"}`` as the LLM writes it;
3. when a signal group closes, its medium's artifact id is reserved (the store holds a pending entry) and its
   reference goes into the content stream at that point: ``delta: {"content": "\\n\\n![image 1](URL)"}``; the
   decoder starts while the text still streams. The concatenated ``delta.content`` equals the non-streamed
   ``content`` (whenever the streamed text is the answer's text: a grounding format whose tags are plain text
   streams them as written);
4. each medium as soon as its decoder finishes: ``delta: {"images": [item]}`` (``audios``, ``videos``; the item as
   in the message's array, ``index`` its place there); the first sound also ``delta.audio`` {id, data, format,
   expires_at, transcript (the text so far)}. These chunks have no ``content``, so text-only clients ignore them;
   a spoken answer (``audio.voice``, ``format: pcm16``): ``delta: {"audio": {id, data (base64 PCM16 mono),
   transcript (this sentence; the deltas join to the whole), sample_rate_hz (24000), index}}`` as each sentence of
   the text is spoken, while the text still streams; they join to the non-streamed answer's samples, and the
   closing chunk waits for the last of them;
5. with ``box_overlay``, the overlay's reference (content) then its ``delta.images`` chunk; then ``delta: {}`` with
   ``finish_reason`` (a grounding model: ``delta: {"boxes": [...]}``, the boxes of the whole answer); with
   ``stream_options.include_usage`` a chunk with ``usage``;
6. ``data: [DONE]``. A failure after the stream started is sent as ``data: {"error": {...}}`` (the OpenAI
   client raises it) and the stream ends; a medium that failed has a failed artifact (its URL answers 500).

Rules: ``modalities``, when given, is the floor and the ceiling of the answer (DESIGN.md's one rule): every
listed medium is produced or the request is refused (400 upfront if no decoder; a 500 ``generation_failed`` if
the medium could not be rendered, never dropped), and no unlisted medium is made (the signal tokens of the
others are masked in the LLM's decode loop: ``LLMRequest.allowed_modalities``); ``["text"]`` alone: no media.
Without ``modalities`` the preset's ``generation.media_without_modalities`` decides: ``model_decides`` (every
shipped preset: ``tiny``, ``smol``, ``toy``, ``nextgpt-7b``; the model may add any medium this server has a
decoder for, nothing is forced) or ``none`` (text only). ``audio`` with a ``voice`` (a name of
``/v1/audio/voices``; unknown: 400 ``unknown_voice`` listing them) asks for the answer spoken: "audio" in
``modalities`` (required then) is satisfied by speech, so no generated sound is made and no audio decoder is
needed; ``message.audio`` = {id (the WAV's artifact), data (base64 WAV, or PCM16 with ``format: pcm16``), format,
expires_at, transcript (the answer's text), sample_rate_hz}; streaming needs ``pcm16`` (400 otherwise); no speech
stage: 503. The images / audio / videos endpoints allow and require their one medium.
Unknown ``model``: 400. Out-of-range options: 400 naming the field (every option is bounded in its schema, e.g.
``duration_s`` >= 0.02 s, AudioLDM's two mel frames). Body over ``limits.max_body_bytes`` or a medium over
``limits.max_media_bytes``: 413. Admission (:mod:`~services.ingress.admission`): a request predicted not to
finish within ``request_timeout_s`` (from the measured seconds per queue place and the requests ahead), or one
over ``max_concurrent_requests``, is refused up front with 503 ``overloaded`` and ``Retry-After`` (503, not
429: the server's state, not the caller's rate); a full stage queue: 503 too. Running past ``request_timeout_s``
anyway: 504 and the work is cancelled; a client that disconnects cancels downstream work, queued or running. A
decoder replica that dies under a request: the render is sent again (deterministic for its seed); none back in
time: 503 ``stage_unavailable`` with ``Retry-After``. API keys (if configured): 401. Remote URLs: refused unless
the host is in ``allowed_remote_hosts``.

Modules (the contract above is kept here; each rule is implemented in one place)
-------------------------------------------------------------------------------
- :mod:`~services.ingress.app`: :func:`build_app` (the public entry): the app, its routers, handlers, middleware.
- :mod:`~services.ingress.routes`: one router per resource (``chat``, ``generations`` for images and audio,
  ``speech`` and ``transcriptions``, ``videos``, ``artifacts``, ``system`` for models / health / ready / metrics);
  routes are module-level functions that get the :class:`~services.ingress.service.IngressService` through
  ``Depends(get_service)``.
- :mod:`~services.ingress.planning`: request -> :class:`~services.ingress.planning.ChatPlan` (turns, options,
  seeds); :mod:`~services.ingress.media_input`: input media (URLs, our artifacts, base64, decoding under limits);
  :mod:`~services.ingress.history`: an assistant message sent back -> its parts (our references resolved).
- :mod:`~services.ingress.skill_loop`: the skills a request enables, the next round, the result turn, the rounds'
  outputs as one answer (the loop itself runs in :mod:`~services.ingress.running`).
- :mod:`~services.ingress.running`: a plan over the backend (renders as groups arrive, timeout, disconnect);
  :mod:`~services.ingress.streaming`: the SSE driver; :mod:`~services.ingress.video_jobs`: background video jobs.
- :mod:`~services.ingress.responses`: the shape of every answer (completion body, chunks, arrays, parts, audio);
  :mod:`~services.ingress.content`: ``content`` with its references (streamed and whole);
  :mod:`~services.ingress.media_refs`: the per-modality table, artifact URLs, markdown references.
- :mod:`~services.ingress.audio_formats`: speech PCM -> wav / pcm / flac / mp3 / opus / aac, whole or streamed.
- :mod:`~services.ingress.admission` (slots, 503), :mod:`~services.ingress.middleware` (body limit, request
  metrics), :mod:`~services.ingress.error_map` (exceptions and validation -> OpenAI error body).
"""

from __future__ import annotations

from services.ingress.app import build_app
from services.ingress.planning import PROMPT_ENDPOINT_MAX_NEW_TOKENS, ChatPlan
from services.ingress.service import IngressService

__all__ = ["PROMPT_ENDPOINT_MAX_NEW_TOKENS", "ChatPlan", "IngressService", "build_app"]
