"""Spoken input in chat: the audio parts of user messages transcribed, the transcript marked into the prompt.

Where the preset opts in (:attr:`polymodal.config.PresetConfig.spoken_transcript`, a format such as
``"[spoken] {transcript}"``), every audio part of a user message (OpenAI's ``input_audio``, or an ``audio_url``) is
transcribed by the speech stage (``Backend.transcribe``: the ``SpeechServer`` deployment on Ray, the in-process
:class:`services.speech.SpeechWorker` under ``--no-ray``; never in the ingress) and
``spoken_transcript.format(transcript=text)`` goes to the LLM as the user's text right after the audio's own
tokens. A preset that reads no audio (no audio encoder) but opts in gets the transcript *in place of* the audio
(transcript-only: a text LLM hears a spoken question); an assistant message's audio is then left out of the prompt
(its markdown reference stays in the text). A preset that does not opt in is unchanged: nothing is transcribed, and
its audio reaches the LLM through the audio encoder alone (or is refused, 400, when it has none).

Latency: one recogniser call per audio part, each started as soon as its part is decoded, so the calls run
concurrently with each other and with the rest of the request's planning (decoding later media, checks); the plan
waits for them only before the LLM request is built. An empty transcript (silence) adds no text.

Video: the input video path decodes frames only (:func:`polymodal.media.video.decode_video`), so the sound track of
a ``video_url`` part is neither encoded nor transcribed.

The answer shows what was heard: ``message.input_transcripts`` (and the first streamed chunk's
``delta.input_transcripts``), a list of ``{message_index, content_index, text, duration_s, sent_to_llm}``, an
extension field beside OpenAI's shape (clients that do not know it ignore it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart, Transcript, Turn

from services.protocol import Backend, TranscriptionRequest


def transcribes_speech(preset: PresetConfig) -> bool:
    """Whether the preset has opted in to spoken input (``spoken_transcript`` set)."""
    return preset.spoken_transcript is not None


def is_speech(modality: Modality) -> bool:
    """Speech recognition hears waveforms: the one modality whose parts are transcribed (the audio one)."""
    return modality is Modality.AUDIO


def reads_audio_as_text(preset: PresetConfig, input_modalities: tuple[Modality, ...]) -> bool:
    """The transcript-only path: the preset opts in but reads no audio, so audio input is accepted for its
    transcript alone."""
    return transcribes_speech(preset) and not any(is_speech(m) for m in input_modalities)


@dataclass(frozen=True)
class InputTranscript:
    """What was heard in one audio part of the request.

    Attributes:
        message_index / content_index: the part's place in ``messages[i].content[j]``.
        text: the transcript. duration_s: the audio's length.
        sent_to_llm: the marked transcript reached the LLM (``False`` when it was empty).
    """

    message_index: int
    content_index: int
    text: str
    duration_s: float
    sent_to_llm: bool

    def to_dict(self) -> dict[str, Any]:
        return {"message_index": self.message_index, "content_index": self.content_index, "text": self.text,
                "duration_s": round(self.duration_s, 3), "sent_to_llm": self.sent_to_llm}


def transcripts_json(transcripts: tuple[InputTranscript, ...]) -> list[dict[str, Any]]:
    """``message.input_transcripts`` / ``delta.input_transcripts``."""
    return [t.to_dict() for t in transcripts]


class SpokenInput:
    """The spoken parts of one request, transcribed concurrently.

    Usage: :meth:`heard` for every audio part of a user message as soon as it is decoded (starts its recogniser
    call, if the preset opts in), then ``turns, transcripts = await apply(turns)``; :meth:`aclose` cancels the
    calls still running (the request failed before :meth:`apply`).

    Args:
        backend: the speech stage's host and the preset (``spoken_transcript``, the audio encoder).
        request_id: for the stage's logs.
    """

    def __init__(self, backend: Backend, request_id: str):
        self.backend, self.request_id = backend, request_id
        self.format = backend.preset.spoken_transcript
        self.in_place = reads_audio_as_text(backend.preset, tuple(backend.input_modalities))
        self._tasks: dict[int, tuple[int, int, asyncio.Task]] = {}  # id(part) -> (message, content, call)

    def heard(self, part: MediaPart, message_index: int, content_index: int) -> None:
        """A user message's medium, decoded: an audio part starts its transcription (nothing else does)."""
        if self.format is None or not is_speech(part.modality):
            return
        request = TranscriptionRequest(f"{self.request_id}-{message_index}-{content_index}", part.data,
                                       int(part.sample_rate_hz or 16000))
        self._tasks[id(part)] = (message_index, content_index,
                                 asyncio.ensure_future(self.backend.transcribe(request)))

    async def apply(self, turns: list[Turn]) -> tuple[list[Turn], tuple[InputTranscript, ...]]:
        """The turns with each transcript marked in after its audio part (or in its place, transcript-only).

        Raises:
            APIError / StageUnavailable: the speech stage's (no speech stage: 503).
        """
        if not self._tasks and not self.in_place:
            return turns, ()
        try:
            heard: dict[int, Transcript] = dict(zip(self._tasks, await asyncio.gather(
                *(t for _, _, t in self._tasks.values()))))
        finally:
            await self.aclose()
        out: list[Turn] = []
        found: list[InputTranscript] = []
        for turn in turns:
            parts: list[TextPart | MediaPart] = []
            for part in turn.parts:
                t = heard.get(id(part)) if isinstance(part, MediaPart) else None
                audio = isinstance(part, MediaPart) and is_speech(part.modality)
                if not (audio and self.in_place):  # transcript-only: no audio tokens (the model has no encoder)
                    parts.append(part)
                if t is None:
                    continue
                text = t.text.strip()
                if text:
                    parts.append(TextPart(self.format.format(transcript=text)))
                i, j, _ = self._tasks[id(part)]
                found.append(InputTranscript(i, j, text, float(t.duration_s), bool(text)))
            out.append(Turn(turn.role, tuple(parts), tool_calls=turn.tool_calls, tool_call_id=turn.tool_call_id))
        return out, tuple(found)

    async def aclose(self) -> None:
        """Cancel the calls still running."""
        running = [t for _, _, t in self._tasks.values() if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running, timeout=10)
