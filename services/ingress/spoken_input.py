"""Spoken input in chat: the speech in user messages transcribed, the transcript marked into the prompt.

Where the preset opts in (:attr:`polymodal.config.PresetConfig.spoken_transcript`, a format such as
``"[spoken] {transcript}"``), every audio part of a user message (OpenAI's ``input_audio``, or an ``audio_url``) and
the sound track of every video part (``video_url``: :attr:`polymodal.types.MediaPart.sound_track`, decoded with the
frames, mono float32 at 16 kHz, where the file has an audio stream) is transcribed by the speech stage
(``Backend.transcribe``: the ``SpeechServer`` deployment on Ray, the in-process :class:`services.speech.SpeechWorker`
under ``--no-ray``; never in the ingress) and ``spoken_transcript.format(transcript=text)`` goes to the LLM as the
user's text right after the part's own tokens (the audio's, or the video's frames). A preset that reads no audio
(no audio encoder) but opts in gets an audio part's transcript *in place of* the audio (transcript-only: a text LLM
hears a spoken question); an assistant message's audio is then left out of the prompt (its markdown reference stays
in the text). A video stays in the prompt either way (the model reads its frames, or it is refused, 400). A preset
that does not opt in is unchanged: nothing is transcribed, no sound track is decoded, and its audio reaches the LLM
through the audio encoder alone (or is refused, 400, when it has none).

Latency: one recogniser call per spoken part, each started as soon as its part is decoded, so the calls run
concurrently with each other and with the rest of the request's planning (decoding later media, checks); the plan
waits for them only before the LLM request is built. An empty transcript (silence) adds no text; a user message
that is then left with nothing at all (transcript-only, its audio silent) is a 400 ``invalid_value`` naming the part
("no speech was heard in messages[i].content[j]"): an empty turn would reach the LLM otherwise.

The answer shows what was heard: ``message.input_transcripts`` (and the first streamed chunk's
``delta.input_transcripts``), a list of ``{message_index, content_index, text, duration_s, sent_to_llm}``, an
extension field beside OpenAI's shape (clients that do not know it ignore it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart, Transcript, Turn

from services.errors import bad_request
from services.protocol import Backend, TranscriptionRequest


def transcribes_speech(preset: PresetConfig) -> bool:
    """Whether the preset has opted in to spoken input (``spoken_transcript`` set)."""
    return preset.spoken_transcript is not None


def is_speech(modality: Modality) -> bool:
    """Speech recognition hears waveforms: the one modality whose parts are transcribed (the audio one)."""
    return modality is Modality.AUDIO


def spoken_sound(part: MediaPart) -> MediaPart | None:
    """The waveform a recogniser hears in a decoded part: an audio part itself, a video's sound track (``None``:
    the video has none, or it was not decoded), nothing in other media."""
    return part if is_speech(part.modality) else part.sound_track


def reads_audio_as_text(preset: PresetConfig, input_modalities: tuple[Modality, ...]) -> bool:
    """The transcript-only path: the preset opts in but reads no audio, so audio input is accepted for its
    transcript alone."""
    return transcribes_speech(preset) and not any(is_speech(m) for m in input_modalities)


@dataclass(frozen=True)
class InputTranscript:
    """What was heard in one spoken part of the request.

    Attributes:
        message_index / content_index: the part's place in ``messages[i].content[j]``: an ``input_audio`` /
            ``audio_url`` part, or the ``video_url`` part whose sound track was heard.
        text: the transcript. duration_s: the audio's (the sound track's) length.
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

    Usage: :meth:`heard` for every medium of a user message as soon as it is decoded (a spoken one starts its
    recogniser call, if the preset opts in), then ``turns, transcripts = await apply(turns)``; :meth:`aclose`
    cancels the calls still running (the request failed before :meth:`apply`).

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
        """A user message's medium, decoded: an audio part or a video with a sound track starts its transcription
        (nothing else does)."""
        sound = spoken_sound(part)
        if self.format is None or sound is None:
            return
        request = TranscriptionRequest(f"{self.request_id}-{message_index}-{content_index}", sound.data,
                                       int(sound.sample_rate_hz or 16000),
                                       vocabulary=self.backend.preset.spoken_vocabulary)
        self._tasks[id(part)] = (message_index, content_index,
                                 asyncio.ensure_future(self.backend.transcribe(request)))

    async def apply(self, turns: list[Turn]) -> tuple[list[Turn], tuple[InputTranscript, ...]]:
        """The turns with each transcript marked in after its spoken part (or in an audio part's place,
        transcript-only).

        Raises:
            APIError: 400 ``invalid_value`` when a user message is left with nothing (transcript-only, no speech
                heard); the speech stage's errors. StageUnavailable: no speech stage (503).
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
            silent: list[tuple[int, int]] = []  # the user's audio parts left out that said nothing
            for part in turn.parts:
                t = heard.get(id(part)) if isinstance(part, MediaPart) else None
                audio = isinstance(part, MediaPart) and is_speech(part.modality)
                if not (audio and self.in_place):  # transcript-only: no audio tokens (the model has no encoder)
                    # a video's sound track was for the recogniser: the LLM stage gets the frames alone
                    parts.append(dataclasses.replace(part, sound_track=None)
                                 if isinstance(part, MediaPart) and part.sound_track is not None else part)
                if t is None:
                    continue
                text = t.text.strip()
                if text:
                    parts.append(TextPart(self.format.format(transcript=text)))
                i, j, _ = self._tasks[id(part)]
                found.append(InputTranscript(i, j, text, float(t.duration_s), bool(text)))
                if not text and audio and self.in_place:
                    silent.append((i, j))
            if silent and not parts and not turn.tool_calls:
                where = " or ".join(f"messages[{i}].content[{j}]" for i, j in silent)
                raise bad_request(f"no speech was heard in {where}, and the message holds nothing else (this model "
                                  "reads audio through its transcript only); send speech or text",
                                  param=f"messages[{silent[0][0]}].content[{silent[0][1]}]", code="invalid_value")
            out.append(Turn(turn.role, tuple(parts), tool_calls=turn.tool_calls, tool_call_id=turn.tool_call_id))
        return out, tuple(found)

    async def aclose(self) -> None:
        """Cancel the calls still running."""
        running = [t for _, _, t in self._tasks.values() if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running, timeout=10)
