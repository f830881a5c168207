"""The small interface between the ingress and its stages, and the data that crosses it.

Two hosts implement :class:`Backend`: :class:`services.ray_backend.RayBackend` (Ray Serve
DeploymentHandles) and :class:`services.local.LocalBackend` (the in-process pipeline, ``--no-ray``). The
ingress sees only this module, so both serve the same endpoints, schemas and errors.

The stage seams are typed here too: :class:`LLMStageLike` and :class:`DecoderStageLike` are what the workers
(:mod:`services.workers`), the deployments and the in-process backend call on a stage
(:class:`polymodal.pipeline.LLMStage` / :class:`~polymodal.pipeline.DecoderStage`, or a test stand-in), and
:class:`RenderedMedium` what a decoder stage returns per item. They are structural (``typing.Protocol``): a stage
needs no base class.

Speech (:class:`SpeechRequest` -> :class:`SpeechAudioChunk` stream, :class:`TranscriptionRequest` ->
:class:`polymodal.types.Transcript`) is served by a speech stage (:class:`services.speech.SpeechWorker`, on Ray the
``SpeechServer`` deployment); a backend without one answers 503.

Everything that crosses the seams is a frozen dataclass of numpy arrays / bytes (it crosses Ray by pickling);
no torch.
"""

from __future__ import annotations

import abc
import contextvars
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from polymodal.config import DecoderDefaults, PresetConfig
from polymodal.constrained.grammars import ConstraintLimits, ToolChoice
from polymodal.constrained.tools import Tool
from polymodal.modality import Modality
from polymodal.types import EditSource, LLMResult, MediaPart, SignalGroup, TextDelta, ToolCall, Transcript, Turn

from services.errors import StageUnavailable

if TYPE_CHECKING:  # skills.base imports numpy / pydantic only, but the seam names it for types alone
    from skills.base import SkillResult, SkillSpec


@dataclass(frozen=True)
class LLMRequest:
    """One generation request to the LLM stage.

    ``None`` options take the preset's defaults. ``modalities``: media the answer must contain (the LLM
    appends a forced signal group for any it did not emit). ``allowed_modalities``: the media it may contain
    (the signal tokens of the others are masked in the decode loop; ``()``: text only; ``None``: no ceiling);
    it holds ``modalities``. ``task``: a grounding task of the preset (``grounding``, ``refer``, ...), whose
    identifier goes before the last user text.

    Output formats (issue #22), checked by the ingress, enforced by the LLM stage's grammar:
    ``response_format`` (OpenAI's dict: ``json_object`` / ``json_schema``; ``None``: free text), ``tools`` with
    ``tool_choice`` (``None``: ``auto`` when there are tools) and ``parallel_tool_calls``; ``constraint_limits``:
    the server's bounds on schemas (size, compile time, cache). ``logprobs``: the top-k alternatives per text
    token (``None``: no log-probabilities). ``turns`` may hold ``tool`` turns and assistant turns with
    ``tool_calls``; the last turn is the user's or a tool result.

    ``stream_text``: the text is wanted as it is made (a streamed answer, a spoken one). ``False`` (a whole answer):
    text may wait for the next other item (a signal group, a tool call, the result), so a whole answer crosses a
    process boundary as one list per signal group plus one (issue #30); groups still go out the moment they close.
    """

    request_id: str
    turns: tuple[Turn, ...]
    modalities: tuple[Modality, ...] = ()
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None
    task: str | None = None
    allowed_modalities: tuple[Modality, ...] | None = None
    response_format: dict[str, Any] | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: int | None = None
    constraint_limits: ConstraintLimits | None = None
    stream_text: bool = True

    def format_kwargs(self) -> dict[str, Any]:
        """The output-format keyword arguments of ``LLMStageLike.stream`` this request sets (none when it sets
        none, so a stage without output formats keeps working for plain requests)."""
        kw: dict[str, Any] = {}
        if self.response_format is not None:
            kw["response_format"] = self.response_format
        if self.tools:
            kw.update(tools=list(self.tools), tool_choice=self.tool_choice,
                      parallel_tool_calls=self.parallel_tool_calls)
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
        if kw and self.constraint_limits is not None:
            kw["constraint_limits"] = self.constraint_limits
        return kw


@dataclass(frozen=True)
class RenderRequest:
    """One medium to render: a signal group ((N, D_llm) states), its seed and the merged options; ``source``: the
    medium to edit (issue #27: rendered from it, ``options.strength``), ``None``: from noise."""

    request_id: str
    group: SignalGroup
    seed: int
    options: DecoderDefaults
    source: EditSource | None = None


@dataclass(frozen=True)
class EncodedMedium:
    """A rendered medium encoded to a file.

    Attributes:
        modality: image, audio or video.
        data: the file (PNG, WAV or MP4).
        mime_type: ``image/png``, ``audio/wav``, ``video/mp4``.
        ext: file extension without dot.
        seed: the seed of its generator.
        index: position among the answer's media (output order).
        text_offset: character offset in the answer text where it belongs.
        batch_size: how many items the decoder rendered in the same pipeline call.
        duration_s: audio / video length (``None`` for images).
    """

    modality: Modality
    data: bytes
    mime_type: str
    ext: str
    seed: int
    index: int
    text_offset: int
    batch_size: int = 1
    duration_s: float | None = None


@dataclass(frozen=True)
class SkillRequest:
    """One skill call (issue #23): the skill's name, its arguments (a JSON object as a string, as a tool call's
    ``arguments``) and the request's media the skill may read (images uint8 (H, W, 3), in message order:
    ``image_index`` counts among them)."""

    request_id: str
    name: str
    arguments_json: str = "{}"
    media: tuple[MediaPart, ...] = ()


@dataclass(frozen=True)
class SkillOutput:
    """What a skill call returns across the seam.

    Attributes:
        result: the :class:`skills.SkillResult` without its media (text, boxes, masks, data, error).
        summary: ``result.to_dict()`` taken before the media were encoded (JSON-able; describes the media).
        media: the generated media encoded to files (``index``: place among this call's media; ``text_offset`` 0).
    """

    result: "SkillResult"
    summary: dict[str, Any]
    media: tuple[EncodedMedium, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result.error is None


LLMEvent = TextDelta | SignalGroup | ToolCall | LLMResult

REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("polymodal_request_deadline",
                                                                              default=None)
"""When the request being served must be answered (``time.monotonic()`` seconds; ``None``: unknown). The
ingress sets it while it runs a plan; a backend that retries (a decoder replica that died) stops retrying in
time to answer 503 before the request's 504."""


@dataclass(frozen=True)
class SpeechRequest:
    """A text to speak, sentence by sentence (``/v1/audio/speech``; a spoken chat answer speaks each sentence as
    the LLM completes it, numbering chunks on with ``start_index``).

    Attributes:
        text: at most 4096 characters. voice: a voice name (``None``: the server's default).
        speed: 0.25-4.0. start_index: index of the first chunk.
    """

    request_id: str
    text: str
    voice: str | None = None
    speed: float = 1.0
    start_index: int = 0


@dataclass(frozen=True)
class SpeechAudioChunk:
    """One sentence of speech as it crosses the seam.

    Attributes:
        index: position in the stream. text: the sentence. voice: the voice's name.
        pcm16: 16-bit signed little-endian mono samples at ``sample_rate_hz`` (24 kHz: OpenAI's ``pcm``). The
            chunks of a stream, in order, join to exactly the whole answer's samples.
    """

    index: int
    text: str
    pcm16: bytes
    sample_rate_hz: int
    voice: str

    @property
    def num_samples(self) -> int:
        return len(self.pcm16) // 2


@dataclass(frozen=True, eq=False)
class TranscriptionRequest:
    """Audio to transcribe: float32 (S,) mono ``samples`` at ``sample_rate_hz`` (the stage resamples to its
    recogniser's rate); ``language`` an ISO 639-1 code or ``None``; ``prompt`` / ``temperature`` for Whisper;
    ``vocabulary`` a sentence corpus file on the speech stage's host that restricts pocketsphinx's language model
    (the preset's :attr:`~polymodal.config.PresetConfig.spoken_vocabulary`; never set from a client's request)."""

    request_id: str
    samples: np.ndarray
    sample_rate_hz: int
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    vocabulary: str | None = None


# ---- stage seams ---------------------------------------------------------------------------------------
@runtime_checkable
class LLMStageLike(Protocol):
    """The LLM stage as the services call it (:class:`polymodal.pipeline.LLMStage`).

    Called from a worker thread (:class:`services.workers.LLMWorker`); blocking.
    """

    def stream(
        self,
        turns: Sequence[Turn],
        *,
        modalities: Sequence[Modality] = (),
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        should_cancel: Callable[[], bool] | None = None,
        system: str | None = None,
        task: str | None = None,
        allowed_modalities: Sequence[Modality] | None = None,
        response_format: dict[str, Any] | None = None,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool = True,
        logprobs: int | None = None,
        constraint_limits: ConstraintLimits | None = None,
    ) -> Iterator[LLMEvent]:
        """Yield ``TextDelta``, ``SignalGroup`` and ``ToolCall`` items, the ``LLMResult`` last; check
        ``should_cancel`` after every token (``system`` / ``task`` / ``allowed_modalities`` are passed only when the
        request sets them; ``allowed_modalities`` is the ceiling of the answer's media, masked in the decode loop).
        The output formats (``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``logprobs``,
        ``constraint_limits``: :meth:`LLMRequest.format_kwargs`) are passed only when the request sets them.

        Raises:
            ValueError: a conversation or request the model refuses (the API answers 400; a
            ``polymodal.constrained.ConstraintError`` names the field in its ``param``).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Each part's init state and source (``/v1/models``, ``/ready``)."""
        ...


@runtime_checkable
class RenderedMedium(Protocol):
    """One item a decoder stage rendered (:class:`decoders.Medium`); ``duration_s`` (audio / video) is read when
    present."""

    def encode(self) -> tuple[bytes, str, str]:
        """The file: ``(bytes, mime type, extension)``, e.g. ``(png, "image/png", "png")``."""
        ...


@runtime_checkable
class DecoderStageLike(Protocol):
    """One modality's output projector + decoder as the services call it (:class:`polymodal.pipeline.DecoderStage`).

    Called from a worker thread (:class:`services.workers.DecoderWorker`); blocking.
    """

    modality: Modality

    @property
    def defaults(self) -> DecoderDefaults:
        """The preset's decoder options (what a request does not set)."""
        ...

    @property
    def init_state(self) -> str:
        """``random`` or ``pretrained``."""
        ...

    def render(
        self,
        groups: Sequence[SignalGroup],
        seeds: Sequence[int],
        options: DecoderDefaults | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
        sources: Sequence[EditSource] | None = None,
    ) -> list[RenderedMedium | Exception]:
        """B groups ((N, D_llm) states each) with one seed each -> B items, in order: a :class:`RenderedMedium`,
        or an exception for an item that could not be rendered (``decoders.DecodeError``: ``reason``, and
        ``cancelled`` once ``should_cancel()`` returned True). ``on_step(i)`` after every denoising step.
        ``sources``: one :class:`~polymodal.types.EditSource` per item (edits; passed only for edits, all of one
        shape and mask-ness), item k rendered from source k.

        Raises:
            Exception: the whole call failed (the worker retries its items one by one).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Init state of the projector and decoder (``/ready``)."""
        ...


@dataclass(frozen=True)
class StageInfo:
    """What a backend serves: the preset, its output modalities and each part's init state."""

    preset: PresetConfig
    output_modalities: tuple[Modality, ...]
    input_modalities: tuple[Modality, ...]
    parts: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """The ingress's view of the model: an LLM stage that streams and one decoder per modality.

    Implementations translate host failures into :mod:`services.errors` (``Overloaded`` for a full queue,
    ``RenderFailed`` for a medium that could not be rendered, ``StageUnavailable`` for a stage that is down).
    Cancelling the awaiting task (client disconnect, timeout) must cancel the stage's work.
    """

    preset: PresetConfig

    @property
    def output_modalities(self) -> tuple[Modality, ...]:
        """Modalities this backend has a decoder for."""
        return tuple(m for m in self.preset.decoders if m in self.preset.output_projectors)

    def output_mime_type(self, modality: Modality) -> str:
        """The MIME type of the files this backend's ``modality`` decoder writes (what a medium's artifact is
        reserved and named as before it is rendered: its link is in a streamed answer first). Default: the
        modality codec's; a backend that knows its decoder says (a Shap-E 3D decoder: GLB, not PLY)."""
        return modality.spec.codec.mime_type

    @property
    def input_modalities(self) -> tuple[Modality, ...]:
        """Modalities the LLM stage can read (it has an encoder and an input projector)."""
        return tuple(m for m in self.preset.encoders if m in self.preset.input_projectors)

    @abc.abstractmethod
    def generate(self, request: LLMRequest) -> AsyncIterator[LLMEvent]:
        """Stream ``TextDelta`` and ``SignalGroup`` items; the last item is the ``LLMResult``."""

    @abc.abstractmethod
    async def render(self, request: RenderRequest) -> EncodedMedium:
        """Render one medium (decoders batch concurrent calls).

        Raises:
            RenderFailed: this item could not be rendered. Overloaded, StageUnavailable.
        """

    @abc.abstractmethod
    async def describe(self) -> dict[str, Any]:
        """Each part's init state (``random`` / ``pretrained``) and whether it is loaded; ``ready`` key."""

    async def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """Speech -> text with segment and word times (:mod:`skills.asr`).

        Raises:
            APIError: 400 for a language the recogniser lacks or unusable audio; 503 ``StageUnavailable`` when no
            speech stage is deployed (this default).
        """
        raise StageUnavailable("speech recognition is not deployed on this server")

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[SpeechAudioChunk]:
        """Text -> speech, one :class:`SpeechAudioChunk` per sentence as each is ready (:mod:`skills.tts`). The
        request is validated before the first chunk; cancelling the consumer stops the synthesis.

        Raises:
            APIError: 400 (unknown voice listing the choices, nothing to speak, speed or length out of range);
            503 ``StageUnavailable`` when no speech stage is deployed (this default) or no TTS program is installed.
        """
        raise StageUnavailable("speech synthesis is not deployed on this server")
        yield  # pragma: no cover - makes this an async generator

    async def speech_info(self) -> dict[str, Any]:
        """The speech stage's voices (``voices``: list of :meth:`skills.tts.Voice.to_dict`), ``default_voice``,
        ``sample_rate_hz``, ``asr`` and ``tts`` descriptions.

        Raises:
            StageUnavailable: no speech stage (this default).
        """
        raise StageUnavailable("speech is not deployed on this server")


    @property
    def skills(self) -> tuple[str, ...]:
        """Server-side skills this backend can run (``GET /v1/skills``, the request's ``skills``); none by default."""
        return ()

    def skill_host(self, name: str) -> str | None:
        """The deployment (or ``"in-process"``) that hosts skill ``name``, ``None`` when not served."""
        return None

    def skill_specs(self) -> dict[str, "SkillSpec"]:
        """Name -> :class:`skills.SkillSpec` (description, JSON schema, accepts / returns) of every served skill,
        in :attr:`skills` order (the ingress reads them without importing the skills' libraries)."""
        return {}

    async def run_skill(self, request: SkillRequest) -> SkillOutput:
        """Run one skill call. A bad call or a failing model is an error result (``SkillOutput.ok`` false).

        Raises:
            StageUnavailable: the skill is not served here, or its deployment is down. Overloaded.
        """
        raise StageUnavailable(f"skill {request.name!r} is not served by this backend")

    async def stats(self) -> dict[str, dict[str, float]]:
        """Decoder counters per modality: ``steps``, ``batches``, ``batch_items``, ``max_batch_size``,
        ``cancelled`` (see :class:`services.workers.DecoderCounters`)."""
        return {}

    async def close(self) -> None:
        """Release resources (threads, handles)."""
