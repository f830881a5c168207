"""The in-process backend (``polymodal serve --no-ray``): the pipeline's stages in this process.

One process, instant start, for laptops and API tests. The LLM runs one generation at a time in a worker
thread; each decoder renders in its own thread (one pipeline call at a time, items are not batched
across requests here: that is the Ray host's job). Skills (issue #23) run in process too
(:class:`services.skill_host.SkillHost`): the light ones in a skills thread, a ``generate_*`` skill on its
decoder's own thread (it uses that stage's decoder, so one pipeline call at a time still holds). Speech runs in a
:class:`services.speech.SpeechWorker` (its own thread pool), as in the Ray host's ``SpeechServer``. Cancellation,
seeds, failure isolation and the step counters are those of :mod:`services.workers`, so the API behaves as on Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from typing import Any

from polymodal.config import PresetConfig
from polymodal.modality import Modality

from polymodal.types import Transcript

from services.errors import Cancelled, StageUnavailable
from services.protocol import (
    Backend,
    DecoderStageLike,
    EncodedMedium,
    LLMEvent,
    LLMRequest,
    LLMStageLike,
    RenderRequest,
    SpeechAudioChunk,
    SpeechRequest,
    TranscriptionRequest,
    SkillOutput,
    SkillRequest,
)
from services.speech import SpeechConfig, SpeechWorker
from services.workers import STREAM_WINDOW_S, BatchItem, DecoderWorker, LLMWorker


class LocalBackend(Backend):
    """Backend over in-process stages.

    Args:
        preset: the preset the stages were built from.
        llm_stage: a ``polymodal.pipeline.LLMStage`` (or any :class:`~services.protocol.LLMStageLike`).
        decoder_stages: per modality, a ``polymodal.pipeline.DecoderStage`` (or any
            :class:`~services.protocol.DecoderStageLike`).
        speech: the speech stage (``None``: the speech endpoints answer 503).
        skill_host: the skills served (:class:`services.skill_host.SkillHost`), optional.
    """

    def __init__(self, preset: PresetConfig, llm_stage: LLMStageLike,
                 decoder_stages: dict[Modality, DecoderStageLike], speech: SpeechWorker | None = None,
                 skill_host: Any = None):
        self.preset = preset
        self.speech = speech
        self._llm_stage = llm_stage
        self._llm = LLMWorker(llm_stage)
        self._decoders = {Modality.parse(m): DecoderWorker(s) for m, s in decoder_stages.items()}
        self._executors = {
            m: concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decoder-{m.value}")
            for m in self._decoders
        }
        self._skill_host = skill_host
        self._skill_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="skills")

    @classmethod
    def from_preset(cls, preset: PresetConfig | str, *, device: str | None = None,
                    export_dir: str | None = None, modalities: list[Modality] | None = None,
                    speech: SpeechConfig | dict | None = None,
                    skills: list[str] | None = None, object_detector_path: str | None = None) -> "LocalBackend":
        """Build the stages of ``preset`` in this process (imports torch); decoders for ``modalities``
        (default: every decoder of the preset); the speech stage from ``speech`` (``None``: none); the skills named
        in ``skills`` that this preset can serve (:func:`services.skill_host.servable_skills`; ``generate_*`` use
        the decoder stages' own decoders).

        Raises:
            ValueError: a modality the preset has no decoder for. The stages' load errors (a part that fails
            to load refuses to run).
        """
        from polymodal.pipeline import build_decoder_stage, build_llm_stage
        from polymodal.presets import get_preset

        preset = get_preset(preset)
        available = [m for m in preset.decoders if m in preset.output_projectors]
        chosen = available if modalities is None else [Modality.parse(m) for m in modalities]
        for m in chosen:
            if m not in available:
                raise ValueError(f"preset {preset.name!r} has no {m.value} decoder")
        llm = build_llm_stage(preset, device=device, export_dir=export_dir)
        stages = {m: build_decoder_stage(preset, m, device=device, export_dir=export_dir,
                                         d_llm=llm.engine.d_llm) for m in chosen}
        worker = SpeechWorker.from_config(speech) if speech is not None else None
        host = None
        if skills:
            from services.skill_host import SkillHost, servable_skills

            names = servable_skills(preset, skills, object_detector_path=object_detector_path, modalities=chosen)
            host = SkillHost.build(names, preset, device=device, object_detector_path=object_detector_path,
                                   decoders={m: s.decoder for m, s in stages.items()})
        return cls(preset, llm, stages, speech=worker, skill_host=host)

    @property
    def output_modalities(self) -> tuple[Modality, ...]:
        return tuple(self._decoders)

    def output_mime_type(self, modality: Modality) -> str:
        worker = self._decoders.get(modality)
        decoder = getattr(worker.stage, "decoder", None) if worker is not None else None
        mime = getattr(decoder, "output_mime_type", None)
        return mime if isinstance(mime, str) else super().output_mime_type(modality)

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMEvent]:
        async for chunk in self._llm.stream_chunks(request, STREAM_WINDOW_S):  # as the LLM deployment sends them
            for item in chunk:
                yield item

    async def render(self, request: RenderRequest) -> EncodedMedium:
        m = request.group.modality
        worker = self._decoders.get(m)
        if worker is None:
            raise StageUnavailable(f"no {m.value} decoder is loaded")
        item = BatchItem(request)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executors[m], worker.run_batch, [item])
        try:
            result = (await asyncio.shield(fut))[0]
        except asyncio.CancelledError:
            item.cancel.set()
            raise
        if isinstance(result, Cancelled):
            raise asyncio.CancelledError()
        if isinstance(result, Exception):
            raise result
        return result

    def _speech_worker(self) -> SpeechWorker:
        if self.speech is None:
            raise StageUnavailable("speech is not deployed on this server")
        return self.speech

    async def transcribe(self, request: TranscriptionRequest) -> Transcript:
        return await self._speech_worker().transcribe(request)

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[SpeechAudioChunk]:
        async for chunk in self._speech_worker().synthesize(request):
            yield chunk

    async def speech_info(self) -> dict[str, Any]:
        return self._speech_worker().info()


    @property
    def skills(self) -> tuple[str, ...]:
        return () if self._skill_host is None else self._skill_host.names

    def skill_host(self, name: str) -> str | None:
        return "in-process" if name in self.skills else None

    def skill_specs(self) -> dict[str, Any]:
        return {} if self._skill_host is None else {n: type(s).spec() for n, s in self._skill_host.skills.items()}

    async def run_skill(self, request: SkillRequest) -> SkillOutput:
        if request.name not in self.skills:
            raise StageUnavailable(f"skill {request.name!r} is not served here; served: "
                                   f"{', '.join(self.skills) or 'none'}")
        modality = getattr(self._skill_host.skills[request.name], "modality", None)
        executor = self._executors.get(Modality.parse(modality)) if modality is not None else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor or self._skill_executor, self._skill_host.run, request)

    async def describe(self) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        try:
            parts["llm_stage"] = self._llm_stage.describe()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            parts["llm_stage"] = {"error": str(e)}
        parts["decoders"] = {}
        for m, w in self._decoders.items():
            d = w.stage.describe() if hasattr(w.stage, "describe") else {"init_state": w.stage.init_state}
            d["healthy"] = w.healthy
            parts["decoders"][m.value] = d
        if self.speech is not None:
            parts["speech"] = self.speech.describe()
        if self._skill_host is not None:
            parts["skills"] = {"in-process": self._skill_host.describe()}
        parts["ready"] = (self._llm.healthy and all(w.healthy for w in self._decoders.values())
                          and (self.speech is None or self.speech.healthy))
        return parts

    async def stats(self) -> dict[str, dict[str, float]]:
        return {m.value: w.counters.snapshot() for m, w in self._decoders.items()}

    async def close(self) -> None:
        self._llm.close()
        if self.speech is not None:
            self.speech.close()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._skill_executor.shutdown(wait=False, cancel_futures=True)
