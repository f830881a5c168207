"""Request schemas of the HTTP API (pydantic, with bounds). OpenAI-compatible first; extensions are extra
fields. Unknown fields are ignored (clients send many); fields we cannot honour (``n > 1`` in chat, the legacy
``functions``) are refused with 400 naming the field.

Absolute bounds (the runtime's ``polymodal.config.MAX_*``) are on the fields; the server's (tighter,
configurable) limits are in :class:`services.settings.Limits` and checked by the ingress. Size fields are
multiples of 8 (the VAE's).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from polymodal.config import (
    MAX_CRF,
    MAX_DURATION_S,
    MAX_FPS,
    MAX_GUIDANCE_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_NEW_TOKENS,
    MAX_NUM_FRAMES,
    MAX_SIZE_PX,
    MAX_TOP_LOGPROBS,
    MIN_DURATION_S,
)
from polymodal.modality import ModalitySpec, specs


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


class FunctionCallIn(_Req):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field("{}", max_length=1024 * 1024, description="a JSON object, as a string")


class ToolCallIn(_Req):
    """An assistant message's ``tool_calls[i]`` sent back in a history (OpenAI's shape)."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Req):
    """A message. Other fields are kept (``model_extra``): an assistant message sent back may carry the media arrays
    of our answers (``images``, ``audios``, ``videos``) and OpenAI's ``audio`` ``{"id"}``, read by the ingress.

    Tool calling: an assistant message may carry ``tool_calls`` (its ``content`` may then be null); a ``tool``
    message carries the result of one of them (``tool_call_id``) as its text ``content``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(None, max_length=128)


# ---- per-medium generation options (override the preset's decoder defaults) -------------------------
# One options object per registered modality, made from its spec (``ModalitySpec.option_fields``, the
# ``polymodal.config.DecoderDefaults`` fields that apply to its decoder): the chat request's field of that name
# (``image``, ``audio``, ``video``, ...). A new modality gets its options field with its spec, no field by hand.
class _MediumOptions(_Req):
    """Per-medium options are polymodal's own extension: an unknown key is a typo, refused with 400 naming it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


STRENGTH_DESCRIPTION = ("edits: how far the medium may go from its source, the fraction of the denoising schedule "
                        "run (0 < strength <= 1; strength x num_inference_steps >= 1); default: the preset's")

IMAGE_GUIDANCE_DESCRIPTION = ("edits by a decoder that reads its source (InstructPix2Pix; GET /v1/models lists each "
                              "decoder's edit options): how closely the edit follows the source (>= 1); default: the "
                              "preset's")

OPTION_FIELDS: dict[str, tuple[Any, Any]] = {
    "num_inference_steps": (int | None, Field(None, ge=1, le=MAX_INFERENCE_STEPS)),
    "guidance_scale": (float | None, Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE)),
    "height_px": (int | None, Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)),
    "width_px": (int | None, Field(None, ge=8, le=MAX_SIZE_PX, multiple_of=8)),
    "num_frames": (int | None, Field(None, ge=1, le=MAX_NUM_FRAMES)),
    "fps": (int | None, Field(None, ge=1, le=MAX_FPS)),
    "duration_s": (float | None, Field(None, ge=MIN_DURATION_S, le=MAX_DURATION_S)),
    "crf": (int | None, Field(None, ge=0, le=MAX_CRF, description="libx264 constant rate factor of the MP4 (lower: "
                              "closer to the generated frames, bigger file; default: the preset's)")),
    "strength": (float | None, Field(None, gt=0.0, le=1.0, description=STRENGTH_DESCRIPTION)),
    "image_guidance_scale": (float | None, Field(None, ge=1.0, le=MAX_GUIDANCE_SCALE,
                                                 description=IMAGE_GUIDANCE_DESCRIPTION)),
}
"""The request field (type, bounds) of every ``polymodal.modality.DECODER_OPTION_FIELDS`` entry."""

SPOKEN_FIELDS: dict[str, tuple[Any, Any]] = {
    "format": (Literal["wav", "pcm16"] | None, None),
    "voice": (str | None, None),
}
"""Not decoder options: OpenAI's chat ``audio`` output parameter, on the options of the medium whose spec has a
``message_slot`` (audio): ``voice`` asks for the answer spoken (``message.audio``; streamed: ``delta.audio`` PCM16
chunks), a name of ``GET /v1/audio/voices``; ``format`` ``wav`` (a whole answer's default; a generated sound is
always WAV) or ``pcm16`` (a spoken answer's raw samples; a streamed one's only format)."""


def medium_options_model(spec: ModalitySpec) -> type[_MediumOptions]:
    """The options object of one modality (``ImageOptions`` for ``image``): its spec's ``option_fields`` (in that
    order), plus :data:`SPOKEN_FIELDS` when the spec has a ``message_slot``.

    Raises:
        ValueError: an option field this module has no request field for (add it to :data:`OPTION_FIELDS`).
    """
    missing = [f for f in spec.option_fields if f not in OPTION_FIELDS]
    if missing:
        raise ValueError(f"{spec.name}: no request field for option fields {missing}; known: "
                         f"{', '.join(OPTION_FIELDS)}")
    fields = {f: OPTION_FIELDS[f] for f in spec.option_fields}
    if spec.message_slot is not None:
        fields.update(SPOKEN_FIELDS)
    doc = (f"``{spec.name}``: options of a generated {spec.label} ({', '.join(spec.option_fields)}); each overrides "
           "the preset's decoder default.")
    return create_model(f"{''.join(w.capitalize() for w in spec.name.split('_'))}Options", __base__=_MediumOptions,
                        __module__=__name__, __doc__=doc, **fields)


MEDIUM_OPTIONS: dict[str, type[_MediumOptions]] = {spec.name: medium_options_model(spec) for spec in specs()}
"""Modality name -> its options object, for every modality registered when this module was imported (the
built-ins: importing ``polymodal`` registers them; a plug-in registered later has no options field)."""
ImageOptions = MEDIUM_OPTIONS["image"]
AudioOptions = MEDIUM_OPTIONS["audio"]
VideoOptions = MEDIUM_OPTIONS["video"]


class StreamOptions(_Req):
    include_usage: bool = False


MAX_SEED = 2**31 - 1


class _ChatCompletionFields(_Req):
    """``POST /v1/chat/completions``.

    Extensions: per-medium generation options, one field per registered modality named after it (``image``,
    ``audio``, ``video``, ...; :data:`MEDIUM_OPTIONS`), ``media_format`` (the answer's media arrays
    hold ``inline`` data URLs or ``url`` artifact links). ``modalities``: ``text`` plus any of ``image``,
    ``audio``, ``video``; each requested medium is produced or the request is refused with 400. With a grounding
    model: ``task`` (one of the model's grounding tasks, ``grounding``, ``refer``, ...) and ``box_overlay`` (also
    return the image with the answer's boxes drawn). ``edit``: the answer's image (or video) is an edit of one of
    the conversation (the rule: :mod:`services.ingress.edit_sources`). An assistant message may carry our answers'
    media arrays (``images``, ``audios``, ``videos``) and ``audio`` ``{"id"}`` (kept as extra fields, see
    :class:`ChatMessage`).
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
    media_format: Literal["inline", "url"] | None = None
    task: str | None = Field(None, max_length=64, description="a grounding task (see /v1/models: grounding.tasks)")
    box_overlay: bool = Field(False, description="also return the input image with the answer's boxes drawn")
    edit: bool | str | None = Field(
        None, description="render the answer's image from an image of the conversation (issue #27): true = the "
        "image the last user message holds, else the conversation's most recent image (its video when modalities "
        "ask for video and not image: video-to-video); a string = one of this server's artifact ids or URLs, an "
        "image or a video (read from the store, never fetched). The answer then contains the edited medium.")
    user: str | None = None
    # Output formats (issue #22), checked by the ingress (400 naming the field), enforced by grammar in the LLM.
    response_format: dict | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                         '"json_schema": {"name", "schema", "strict"}} (OpenAI\'s shape)')
    tools: list | None = Field(None, description='[{"type": "function", "function": {"name", "description", '
                               '"parameters", "strict"}}]')
    tool_choice: str | dict | None = Field(None, description='"auto" | "none" | "required" | {"type": "function", '
                                           '"function": {"name"}}')
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Skills (issue #23): server-side tools by name (GET /v1/skills), added to the tools the model sees; the
    # ingress runs their calls and continues, at most max_skill_rounds rounds (the server's setting bounds it).
    skills: list[str] | None = Field(None, max_length=32, description='server-side skills to enable, e.g. '
                                     '["detect", "ocr"] (see GET /v1/skills)')
    max_skill_rounds: int | None = Field(None, ge=1, le=32, description="skill rounds at most (the server's "
                                         "max_skill_rounds bounds it)")
    # OpenAI's legacy function calling: refused (400) with a pointer to ``tools``.
    functions: list | None = None
    function_call: str | dict | None = None


ChatCompletionRequest = create_model(
    "ChatCompletionRequest", __base__=_ChatCompletionFields, __module__=__name__,
    __doc__=_ChatCompletionFields.__doc__,
    **{name: (model | None, None) for name, model in MEDIUM_OPTIONS.items()})


class SkillCallRequest(_Req):
    """``POST /v1/skills/{name}`` (issue #23): one skill on the given input.

    ``arguments``: the skill's parameters (an object, or a JSON object as a string, as a tool call's
    ``arguments``; see its schema in ``GET /v1/skills``). ``input``: content parts as in a chat message (``text``
    is ignored; ``image_url`` / ``input_audio`` / ``video_url`` are decoded under the same limits); images are
    counted by ``image_index`` in this order. ``media_format``: generated media inline (data URL) or as
    artifact URLs.
    """

    arguments: dict | str | None = None
    input: list[ContentPart] = Field(default_factory=list)
    media_format: Literal["inline", "url"] | None = None


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


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits``: the form fields of OpenAI's multipart request (the files, ``image`` and ``mask``,
    are read by the route).

    ``size``: ``"WxH"`` or ``"auto"`` (the preset's image size): the source image (and mask) are resized to it and
    the edit has that size. ``response_format``: ``b64_json`` (default) or ``url``. Extensions: ``seed`` (image k
    gets ``seed + k``), ``num_inference_steps``, ``guidance_scale``, and the edit option of the model's image decoder
    (``GET /v1/models``: ``edit_options``): ``strength`` (img2img / inpainting: how far the edit may go from the
    source, the fraction of the denoising schedule run; ``strength x steps`` must be >= 1) or
    ``image_guidance_scale`` (InstructPix2Pix: how closely the edit follows the source, >= 1); the other one is a
    400. The fields of :class:`ImageGenerationRequest`, plus those two.
    """

    strength: float | None = Field(None, gt=0.0, le=1.0, description=STRENGTH_DESCRIPTION)
    image_guidance_scale: float | None = Field(None, ge=1.0, le=MAX_GUIDANCE_SCALE,
                                               description=IMAGE_GUIDANCE_DESCRIPTION)


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


# ---- speech ----------------------------------------------------------------------------------------------------
SPEECH_MAX_INPUT_CHARS = 4096  # OpenAI's limit (skills.tts.MAX_INPUT_CHARS)
SpeechFormat = Literal["wav", "pcm", "flac", "mp3", "opus", "aac"]
TranscriptionFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


class VoiceRef(_Req):
    """OpenAI's custom-voice reference ``{"id": ...}``: here any voice name (see ``GET /v1/audio/voices``)."""

    id: str = Field(min_length=1, max_length=64)


class SpeechCreateRequest(_Req):
    """``POST /v1/audio/speech`` (OpenAI's schema): text -> spoken audio.

    ``model``: this server's model id or one of OpenAI's TTS model names (``tts-1``, ``tts-1-hd``,
    ``gpt-4o-mini-tts``...); it does not choose an engine, the voice does. ``voice``: a name of
    ``GET /v1/audio/voices`` (OpenAI's names ``alloy``, ``echo``... are among them) or ``{"id": name}``; absent:
    the server's default. ``response_format``: ``wav`` (the default here; OpenAI's is ``mp3``), ``pcm`` (raw 16-bit
    signed little-endian mono at 24 kHz), ``flac``, ``mp3``, ``opus`` (Ogg), ``aac`` (ADTS). ``speed``: 0.25-4.0.
    ``stream_format``: absent (one whole file), ``audio`` (the file's bytes sent as they are made, chunked) or
    ``sse`` (``speech.audio.delta`` events with base64 audio, then ``speech.audio.done``). ``instructions``
    (steering gpt-4o-mini-tts's delivery) cannot be honoured by these voices: refused when not empty.
    """

    model: str = Field(min_length=1, max_length=256)
    input: str = Field(min_length=1, max_length=SPEECH_MAX_INPUT_CHARS)
    voice: str | VoiceRef | None = None
    response_format: SpeechFormat = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] | None = None
    instructions: str | None = Field(None, max_length=SPEECH_MAX_INPUT_CHARS)

    @field_validator("voice")
    @classmethod
    def _voice_name(cls, v):
        if isinstance(v, str) and not 1 <= len(v) <= 64:
            raise ValueError("a voice name has 1 to 64 characters")
        return v

    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class TranscriptionForm(_Req):
    """``POST /v1/audio/transcriptions`` (OpenAI's multipart form, the fields besides ``file``).

    ``model``: this server's model id or one of OpenAI's transcription model names (``whisper-1``,
    ``gpt-4o-transcribe``, ``gpt-4o-mini-transcribe``). ``language``: ISO 639-1 code. ``prompt``: text to steer
    Whisper (pocketsphinx ignores it). ``response_format``: ``json`` (``{"text"}``), ``text`` (plain text),
    ``verbose_json`` (``task``, ``language``, ``duration``, ``text``, ``segments`` with ``start`` / ``end``
    seconds, and ``words`` when asked with ``timestamp_granularities``), ``srt``, ``vtt``.
    ``timestamp_granularities``: ``segment`` and / or ``word`` (``verbose_json`` only). ``stream``: refused.
    """

    model: str = Field(min_length=1, max_length=256)
    language: str | None = Field(None, min_length=2, max_length=8, pattern="^[A-Za-z]{2,3}(-[A-Za-z]{2,4})?$")
    prompt: str | None = Field(None, max_length=4000)
    response_format: TranscriptionFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=list, max_length=2)
    stream: bool = False
