"""Data passed between stages: frozen dataclasses with documented shapes (numpy, so they cross Ray)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.modality import Modality


@dataclass(frozen=True)
class TextPart:
    """A piece of text in a message."""

    text: str


@dataclass(frozen=True)
class MediaPart:
    """A medium in a message, already decoded to arrays (see ``polymodal.media_io``).

    ``data``: image uint8 (H, W, 3); audio float32 (S,) mono at ``sample_rate_hz``; video uint8 (F, H, W, 3).
    ``signal_states``: for a medium the model produced earlier in the conversation, the output-projector
    input it came from (N, D_llm), kept for reference; it re-enters the prompt through the encoder.
    ``sound_track``: a video's sound, decoded when asked (``DecodeOptions.sound_track``): an audio part, float32
    (S,) mono at its ``sample_rate_hz`` (16000); ``None`` for other media, a video without an audio stream, or
    when it was not asked for. Spoken input in chat transcribes it (:mod:`services.ingress.spoken_input`).
    """

    modality: Modality
    data: np.ndarray
    sample_rate_hz: int | None = None
    fps: float | None = None
    name: str | None = None
    signal_states: np.ndarray | None = None
    sound_track: MediaPart | None = None


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant made (OpenAI's ``tool_calls[i]``): ``arguments_json`` is a JSON object as
    a string, as OpenAI's ``function.arguments`` is."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> dict[str, Any]:
        import json

        return json.loads(self.arguments_json)


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``"user"``, ``"assistant"`` or ``"tool"``; parts keep their order.

    ``tool_calls``: the calls an assistant turn made (its parts may then be empty). ``tool_call_id``: for a
    ``tool`` turn, the call whose result its text is (one of an earlier assistant turn's ``tool_calls``).
    """

    role: str
    parts: tuple[TextPart | MediaPart, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


def input_images(turns: Sequence[Turn]) -> list[MediaPart]:
    """The input images of a conversation, in message order: what grounding's ``image_index`` counts and what its
    boxes are in pixels of (the pipeline, the ingress's ``box_overlay`` and the CLI's ``--box-overlay`` ask this)."""
    return [p for t in turns for p in t.parts if isinstance(p, MediaPart) and p.modality is Modality.IMAGE]


@dataclass(frozen=True)
class EditSource:
    """What an edit renders from (issue #27): the medium to change and, for an image, where to change it.

    The decoder starts from this medium's latents, noised to ``strength`` of the schedule
    (:attr:`polymodal.config.DecoderDefaults.strength`), instead of from pure noise, and is conditioned on the
    edit instruction's signal states as a generation is: what the noise level leaves (position, size, layout)
    comes from the source, what the instruction asks from the conditioning.

    Attributes:
        modality: the medium's modality (its decoder must be able to edit: image and video; audio cannot).
        data: image uint8 (H, W, 3) or video uint8 (F, H, W, 3), already at the output size (the edit keeps it).
        mask: image only, bool (H, W): True where the image may change (diffusers' white; OpenAI's transparent),
            ``None``: the whole image.
    """

    modality: Modality
    data: np.ndarray
    mask: np.ndarray | None = None

    @property
    def signature(self) -> tuple:
        """What a batch of edits must share: modality, the source's shape, whether it has a mask."""
        return (Modality.parse(self.modality).value, tuple(self.data.shape), self.mask is not None)


@dataclass(frozen=True)
class SignalGroup:
    """One complete group of signal tokens the LLM produced (or that was completed / forced).

    Attributes:
        modality: the medium this group asks for.
        hidden_states: (N, D_llm) float32, last-layer hidden state (after the final norm) at each
            signal token's own position.
        token_embeds: (N, D_llm) float32, the input embedding of each signal token (NExT-GPT adds it to
            the hidden state before the output projector).
        index: position of this group among all media of the answer (0-based, output order).
        text_offset: character offset in the answer text where the medium belongs.
        completed: the model emitted only part of the group; the rest was teacher-forced.
        forced: the caller required this modality and the model did not emit it; appended.
    """

    modality: Modality
    hidden_states: np.ndarray
    token_embeds: np.ndarray
    index: int
    text_offset: int
    completed: bool = False
    forced: bool = False

    @property
    def projector_input(self) -> np.ndarray:
        """(N, D_llm): hidden state + token input embedding (NExT-GPT, output projector input)."""
        return self.hidden_states + self.token_embeds


@dataclass(frozen=True)
class LogprobEntry:
    """One answer token's log-probability (OpenAI's ``logprobs.content[i]``).

    Under the distribution the token was actually drawn from: the logits after every mask (grammar, banned and
    signal tokens of unallowed modalities), then temperature / top-p, renormalised (``log_softmax``); greedy
    decoding reports the masked logits' own softmax.

    Attributes:
        token: the token's text (its bytes decoded as UTF-8, a partial character replaced by U+FFFD).
        logprob: <= 0.
        bytes: the token's UTF-8 bytes (a character split over tokens: each token has its own bytes).
        top: the likeliest alternatives of the same distribution, best first (entries without ``top``).
    """

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple["LogprobEntry", ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """Streamed text (already cleaned of signal tokens). ``logprobs``: entries of the tokens decoded since the
    last delta, when the request asked for them (a delta may then carry entries and no text: text held back,
    e.g. inside a tool call)."""

    text: str
    logprobs: tuple[LogprobEntry, ...] | None = None


@dataclass(frozen=True)
class LLMResult:
    """What the LLM stage returns for one request.

    ``boxes``: with a grounding preset, the boxes of the answer (pixels of the image the user sent; the
    grounding markup is removed from ``text``). ``tool_calls``: the calls the answer made (their blocks are
    removed from ``text``; ``finish_reason`` is then ``"tool_calls"``). ``logprobs``: one entry per answer-text
    token (tool-call blocks included) when the request asked for them, else ``None``.
    """

    text: str
    groups: tuple[SignalGroup, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "tool_calls" | "signal_loop" | "cancelled"
    notes: tuple[str, ...] = field(default_factory=tuple)
    boxes: tuple[GroundedPhrase, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[LogprobEntry, ...] | None = None


class Placed(Protocol):
    """Anything placed in an answer's text: a :class:`SignalGroup`, or what was rendered from one
    (``services.protocol.EncodedMedium``)."""

    @property
    def index(self) -> int: ...

    @property
    def text_offset(self) -> int: ...


_T = TypeVar("_T")


def interleave(text: str, placed: Sequence[Placed], items: Sequence[_T],
               text_part: Callable[[str], Any] = TextPart) -> list:
    """Split ``text`` at each placement's ``text_offset`` and put its item there, in output order.

    The one rule of where media go in an answer, for the in-process pipeline (items: ``decoders.Medium``,
    text as :class:`TextPart`) and the HTTP answer (items: content-part dicts, text as ``{"type": "text"}``).

    Args:
        text: the answer text.
        placed: one per item, with ``index`` (output order) and ``text_offset`` (character offset in ``text``);
            any order.
        items: what goes at each placement (same length as ``placed``).
        text_part: wraps each non-blank piece of text (stripped); default :class:`TextPart`.

    Returns:
        Text pieces and items in output order; an offset before the previous one (or past the end) is clamped.
    """
    parts: list = []
    cursor = 0
    for p, item in sorted(zip(placed, items), key=lambda x: x[0].index):
        off = min(max(p.text_offset, cursor), len(text))
        if text[cursor:off].strip():
            parts.append(text_part(text[cursor:off].strip()))
        parts.append(item)
        cursor = off
    if text[cursor:].strip():
        parts.append(text_part(text[cursor:].strip()))
    return parts


# ---- speech recognition (skills.asr produces these; the speech stage hands them to the ingress) ----------
@dataclass(frozen=True)
class TranscriptWord:
    """One recognised word and where it is (seconds from the start of the audio)."""

    word: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TranscriptSegment:
    """A stretch of speech between pauses (pocketsphinx) or between timestamps (Whisper).

    Attributes:
        id: 0-based position. start_s / end_s: seconds from the start of the audio. text: its words.
        words: its words with times (empty when the backend gives none).
    """

    id: int
    start_s: float
    end_s: float
    text: str
    words: tuple[TranscriptWord, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """What a backend heard.

    Attributes:
        text: the whole transcript (segments joined by spaces).
        language: ISO 639-1 code of the language decoded (``en``).
        duration_s: length of the audio.
        segments: in time order.
        backend: the :data:`ASR_BACKENDS` key. model: the model's name or folder.
        elapsed_s: decoding time.
    """

    text: str
    language: str
    duration_s: float
    segments: tuple[TranscriptSegment, ...]
    backend: str
    model: str
    elapsed_s: float = 0.0

    @property
    def words(self) -> tuple[TranscriptWord, ...]:
        return tuple(w for s in self.segments for w in s.words)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "language": self.language, "duration_s": round(self.duration_s, 3),
                "backend": self.backend, "model": self.model,
                "segments": [{"id": s.id, "start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3), "text": s.text,
                              "words": [{"word": w.word, "start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3)}
                                        for w in s.words]} for s in self.segments]}
