"""Request schemas of the HTTP API (pydantic, with bounds). OpenAI-compatible first; extensions are extra
fields. Unknown fields are ignored (clients send many); fields we cannot honour (``n > 1`` in chat, a
``response_format`` we do not produce) are refused with 400 naming the field.

Absolute bounds (the runtime's ``polymodal.config.MAX_*``) are on the fields; the server's (tighter,
configurable) limits are in :class:`services.settings.Limits` and checked by the ingress. Size fields are
multiples of 8 (the VAE's).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from polymodal.config import (
    MAX_CRF,
    MAX_DURATION_S,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_NEW_TOKENS,
    MAX_NUM_FRAMES,
    MAX_SIZE_PX,
    MIN_DURATION_S,
)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# ---- content parts ---------------------------------------------------------------------------------
class ImageURL(_Req):
    url: str = Field(description="data:image/...;base64,... (or an allow-listed http(s) URL)")
    detail: str | None = None


class InputAudio(_Req):
    data: str = Field(description="base64 of the file (not a data URL)")
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class MediaURL(_Req):
    url: str


class TextContent(_Req):
    type: Literal["text"]
    text: str


class ImageContent(_Req):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioContent(_Req):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLContent(_Req):
    """An audio by URL: a data URL, or one of our artifact URLs (as our answers' ``audios`` hold them)."""

    type: Literal["audio_url"]
    audio_url: MediaURL


class VideoContent(_Req):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[
    TextContent | ImageContent | AudioContent | AudioURLContent | VideoContent, Field(discriminator="type")
]


class ChatMessage(_Req):
    """A message. Other fields are kept (``model_extra``): an assistant message sent back may carry the media arrays
    of our answers (``images``, ``audios``, ``videos``) and OpenAI's ``audio`` ``{"id"}``, read by the ingress."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


# ---- per-medium generation options (override the preset's decoder defaults) -------------------------
class _Steps(_Req):
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)


class ImageOptions(_Steps):
    height_px: int | None = Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)
    width_px: int | None = Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)


class AudioOptions(_Steps):
    """Also OpenAI's chat ``audio`` output parameter: ``format`` (only ``wav``) and ``voice`` (a spoken answer:
    not available yet, refused with 400 naming ``audio.voice``)."""

    duration_s: float | None = Field(None, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    format: Literal["wav"] | None = None
    voice: str | None = None


class VideoOptions(_Steps):
    height_px: int | None = Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)
    width_px: int | None = Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES)
    fps: int | None = Field(None, ge=1, le=MAX_FPS)
    crf: int | None = Field(None, ge=0, le=MAX_CRF, description="libx264 constant rate factor of the MP4 (lower: "
                            "closer to the generated frames, bigger file; default: the preset's)")


class StreamOptions(_Req):
    include_usage: bool = False


MAX_SEED = 2**31 - 1


class ChatCompletionRequest(_Req):
    """``POST /v1/chat/completions``.

    Extensions: ``image`` / ``audio`` / ``video`` generation options, ``media_format`` (the answer's media arrays
    hold ``inline`` data URLs or ``url`` artifact links). ``modalities``: ``text`` plus any of ``image``,
    ``audio``, ``video``; each requested medium is produced or the request is refused with 400. With a grounding
    model: ``task`` (one of the model's grounding tasks, ``grounding``, ``refer``, ...) and ``box_overlay`` (also
    return the image with the answer's boxes drawn). An assistant message may carry our answers' media arrays
    (``images``, ``audios``, ``videos``) and ``audio`` ``{"id"}`` (kept as extra fields, see :class:`ChatMessage`).
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    image: ImageOptions | None = None
    audio: AudioOptions | None = None
    video: VideoOptions | None = None
    media_format: Literal["inline", "url"] | None = None
    task: str | None = Field(None, max_length=64, description="a grounding task (see /v1/models: grounding.tasks)")
    box_overlay: bool = Field(False, description="also return the input image with the answer's boxes drawn")
    user: str | None = None
    # OpenAI fields this server cannot honour: refused (400) when set to anything but their neutral value.
    response_format: dict | None = None
    tools: list | None = None
    functions: list | None = None
    logprobs: bool | None = None


class ImageGenerationRequest(_Req):
    """``POST /v1/images/generations`` (OpenAI images schema).

    ``size``: ``"WxH"`` (multiples of 8, within the server limits) or ``"auto"``. ``response_format``:
    ``b64_json`` (default) or ``url`` (an artifact URL that expires). Extensions: ``seed`` (image k gets
    ``seed + k``), ``num_inference_steps``, ``guidance_scale``.
    """

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)
    user: str | None = None


class AudioGenerationRequest(_Req):
    """``POST /v1/audio/generations`` (ours, shaped like the images endpoint): WAV files.

    ``duration_s`` within the server limit; ``response_format`` ``b64_json`` (default) or ``url``.
    """

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    duration_s: float | None = Field(None, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    response_format: Literal["b64_json", "url"] | None = None
    format: Literal["wav"] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)


class VideoCreateRequest(_Req):
    """``POST /v1/videos`` (OpenAI videos schema: ``prompt``, ``seconds``, ``size``): an asynchronous job.

    ``seconds`` (``"4"`` or 4) sets ``num_frames = round(seconds * fps)`` unless ``num_frames`` is given.
    Extensions: ``num_frames``, ``fps``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``crf`` (libx264
    constant rate factor of the MP4).
    """

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    seconds: float | None = Field(None, gt=0.0, le=MAX_DURATION_S)
    size: str | None = None
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES)
    fps: int | None = Field(None, ge=1, le=MAX_FPS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)
    crf: int | None = Field(None, ge=0, le=MAX_CRF)
