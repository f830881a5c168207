"""A spoken answer: text that arrives in pieces (an LLM's deltas) spoken sentence by sentence as it arrives.

The building block of chat's spoken answers (``audio: {"voice", "format"}``: ``message.audio``, and streamed
``delta.audio`` PCM16 chunks; :meth:`services.ingress.running.Runner.collect` and
:func:`services.ingress.streaming.sse` feed it the LLM's text deltas). :class:`SpokenAnswer`
cuts the text with :class:`polymodal.sentences.SentenceStream` (the same sentences
:func:`polymodal.sentences.split_sentences` finds in the whole text), asks the speech stage for one sentence at a
time (``Backend.synthesize`` with ``start_index`` numbering the chunks on) while more text still arrives, and hands
the chunks out in order. Because the stage speaks each sentence on its own, the chunks join to exactly the samples
of ``/v1/audio/speech`` for the whole text, voice and speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from polymodal.sentences import SentenceStream

from services.errors import bad_request
from services.ingress.skill_loop import ShownText
from services.protocol import Backend, SpeechAudioChunk, SpeechRequest
from services.schemas import ChatCompletionRequest

_END = object()


class SpokenAnswer:
    """Speaks text as it arrives.

    Usage: ``feed(delta)`` for every piece of text, ``finish()`` once the text is complete, and read
    :meth:`chunks` (concurrently, from another task, or afterwards); ``aclose()`` cancels whatever is left.

    Args:
        backend: the speech stage's host. request_id: for the stage's logs.
        voice / speed: as ``/v1/audio/speech``'s. A bad voice surfaces from :meth:`chunks` as the stage's 400.
    """

    def __init__(self, backend: Backend, request_id: str, voice: str | None = None, speed: float = 1.0,
                 tool_format: str = ""):
        self.backend, self.request_id, self.voice, self.speed = backend, request_id, voice, speed
        self.shown = ShownText(tool_format)  # what is spoken is what a client sees (LLaVA-Plus: no thoughts)
        self.text = ""
        self._sentences = SentenceStream()
        self._todo: asyncio.Queue = asyncio.Queue()
        self._out: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._finished = False

    def on_event(self, kind: str, value) -> None:
        """An event of :meth:`services.ingress.running.Runner.events`: its text is fed; a skill call starts a new
        round of :class:`~services.ingress.skill_loop.ShownText`; the rest is not spoken."""
        if kind == "text":
            self.feed(value)
        elif kind == "skill_call":
            self.shown.next_round()

    def feed(self, delta: str) -> None:
        """Add a piece of the model's text; every sentence of the shown text it completes is queued for speaking.

        Raises:
            RuntimeError: after :meth:`finish`.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._add(self.shown.feed(delta))

    def _add(self, delta: str) -> None:
        self.text += delta
        for sentence in self._sentences.feed(delta):
            self._queue(sentence)

    def finish(self) -> None:
        """The text is complete: queue its last sentence(s)."""
        if not self._finished:
            self._add(self.shown.finish())
            self._finished = True
            for sentence in self._sentences.flush():
                self._queue(sentence)
            self._start()
            self._todo.put_nowait(_END)

    def _queue(self, sentence: str) -> None:
        self._start()
        self._todo.put_nowait(sentence)

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._speak())

    async def _speak(self) -> None:
        index = 0
        try:
            while (sentence := await self._todo.get()) is not _END:
                request = SpeechRequest(self.request_id, sentence, self.voice, self.speed, start_index=index)
                async for chunk in self.backend.synthesize(request):
                    index = chunk.index + 1
                    self._out.put_nowait(chunk)
            self._out.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._out.put_nowait(e)

    async def chunks(self) -> AsyncIterator[SpeechAudioChunk]:
        """The speech chunks in order, each as soon as it is ready; ends after :meth:`finish`'s last sentence.

        Raises:
            APIError: the stage's (an unknown voice: 400; no speech stage: 503).
        """
        self._start()
        while True:
            item = await self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        """Stop speaking (the client went away, the request failed)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=10)


@dataclass(frozen=True)
class SpeechPlan:
    """A spoken answer (``audio: {"voice", "format"}``): the answer's text spoken in ``voice`` (a name of
    ``GET /v1/audio/voices``); ``format`` ``wav`` (``message.audio.data``: a base64 WAV) or ``pcm16`` (base64 16-bit
    little-endian mono PCM at ``sample_rate_hz``; the only format of streamed ``delta.audio``)."""

    voice: str
    format: str
    sample_rate_hz: int


async def plan_speech(backend: Backend, req: ChatCompletionRequest) -> SpeechPlan | None:
    """``audio: {"voice", "format"}`` -> the spoken answer's plan (``None`` without a voice).

    ``format``: ``wav`` (the default of a whole answer) or ``pcm16`` (the default, and the only format, of a
    streamed one). The voice is checked against the speech stage's voices before any generation.

    Raises:
        APIError: 400 naming ``audio.format`` (``pcm16`` without a voice, ``wav`` with ``stream``) or
        ``audio.voice`` (unknown: the choices listed, ``code: unknown_voice``); 503 without a speech stage.
    """
    audio = req.audio
    if audio is None or audio.voice is None:
        if audio is not None and audio.format == "pcm16":
            raise bad_request("audio.format: pcm16 is for a spoken answer (give audio.voice); a generated sound "
                              "is a WAV", param="audio.format", code="invalid_value")
        return None
    fmt = audio.format or ("pcm16" if req.stream else "wav")
    if req.stream and fmt != "pcm16":
        raise bad_request(f"audio.format: a streamed spoken answer is pcm16 (delta.audio chunks), got {fmt}",
                          param="audio.format", code="invalid_value")
    info = await backend.speech_info()  # StageUnavailable (503) where no speech stage is deployed
    names = [v["name"] for v in info.get("voices", ())]
    if audio.voice not in names:
        raise bad_request(f"audio.voice: unknown voice {audio.voice!r}; choose from: "
                          f"{', '.join(names) or 'none (no TTS backend)'}", param="audio.voice",
                          code="unknown_voice")
    return SpeechPlan(audio.voice, fmt, int(info["sample_rate_hz"]))
