"""Ray Serve deployments: plain classes wrapped by the app builder (:mod:`services.app`).

- :class:`LLMServer`: encoders + input projectors + LLM (``polymodal.pipeline.LLMStage``); streams text
  deltas and signal groups (``generate``; ``generate_chunks``, what the ingress calls: the same items in lists,
  text gathered for up to :data:`STREAM_WINDOW_S`, signal groups at once).
- :class:`DecoderServer`: one modality's output projector + diffusion decoder (``DecoderStage``).
  ``render`` calls are batched (by default with no timer: :class:`services.workers.AdaptiveBatcher`; or Ray's
  ``@serve.batch`` with a wait); the pipeline runs in a worker thread (never on the
  replica's event loop, so batches form and health checks answer), see :class:`services.workers.DecoderWorker`
  for grouping, seeds, failure isolation and cancellation.
- :class:`SpeechServer`: speech recognition and synthesis (:class:`services.speech.SpeechWorker`): ``transcribe``
  and ``synthesize`` (streams one PCM16 chunk per sentence), both in the replica's thread pool.
- :class:`SkillServer`: the skills of one skill deployment (:mod:`services.skill_host`: ``skills-cpu`` hosts
  detect / segment / ocr, ``skills-generate`` the preset's decoders as generators, ``skills-objects`` OWL-ViT);
  ``run`` executes one call in a worker thread (``max_ongoing_requests`` bounds the calls at once).
- :class:`StatsServer`: sums the decoder replicas' counters for ``/metrics``.
- :class:`IngressServer`: the FastAPI app of :mod:`services.ingress` over a
  :class:`services.ray_backend.RayBackend`.

Heavy parts are built in the constructors (torch is imported there, never in the ingress), or passed in
as ``stage`` so tests need no model. ``check_health`` fails when the weights did not load (the
constructor raises then, so the replica never starts) or the stage became unusable (accelerator fault).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from polymodal.config import PresetConfig
from polymodal.modality import Modality

from services.errors import Cancelled
from services.protocol import (
    DecoderStageLike,
    EncodedMedium,
    LLMRequest,
    LLMStageLike,
    RenderRequest,
    SpeechRequest,
    TranscriptionRequest,
    SkillOutput,
    SkillRequest,
)
from services.settings import ServerSettings
from services.speech import SpeechConfig, SpeechWorker
from services.workers import (
    STREAM_WINDOW_S,
    AdaptiveBatcher,
    BatchItem,
    DecoderWorker,
    LLMWorker,
    check_batch_policy,
)

log = logging.getLogger("ray.serve")

STATS_PERIOD_S = 1.0
"""A decoder replica sends its counters to the stats deployment at most this often (when they changed)."""


class LLMServer:
    """The LLM stage as a deployment.

    Args:
        preset: the preset (or its name / YAML path).
        device: torch device (``None``: cuda if available, else cpu).
        export_dir: an export of trained parts (see ``polymodal.pipeline.build_llm_stage``).
        max_concurrency: generations run at once in this replica.
        stage: a ready stage (tests); skips loading.
    """

    def __init__(self, preset: PresetConfig | str, device: str | None = None, export_dir: str | None = None,
                 max_concurrency: int = 1, stage: LLMStageLike | None = None):
        if stage is None:
            from polymodal.pipeline import build_llm_stage

            stage = build_llm_stage(preset, device=device, export_dir=export_dir)
        self._stage = stage
        self._worker = LLMWorker(stage, max_concurrency=max_concurrency)

    async def generate(self, request: LLMRequest):
        """Async generator of ``TextDelta | SignalGroup`` then the ``LLMResult``; cancellation stops the LLM."""
        async for item in self._worker.stream(request):
            yield item

    async def generate_chunks(self, request: LLMRequest, window_s: float = STREAM_WINDOW_S):
        """The items of :meth:`generate` in lists, one stream item per list (each item crossing Ray costs about as
        much as a token on a small model): the first text delta goes out alone at once (time to first token), later
        ones gather for up to ``window_s`` (a list goes out with the first delta after its window closed); any other
        item (a signal group, the result) sends its list at once, so decoders start while the text still streams.
        The lists are formed on the generating thread (:meth:`services.workers.LLMWorker.stream_chunks`)."""
        async for chunk in self._worker.stream_chunks(request, window_s):
            yield chunk

    def describe(self) -> dict[str, Any]:
        d = dict(self._stage.describe())
        d["healthy"] = self._worker.healthy
        return d

    def check_health(self) -> None:
        if not self._worker.healthy:
            raise RuntimeError("the LLM stage is unusable")


class DecoderServer:
    """One modality's decoder as a deployment, batching concurrent ``render`` calls.

    Args:
        preset: the preset (or its name / YAML path).
        modality: ``image`` / ``audio`` / ``video``.
        device: torch device.
        export_dir: an export of trained parts (:mod:`polymodal.export`).
        max_batch_size: items per pipeline call.
        batch_wait_timeout_s: with ``batch_policy="timeout"``, how long a batch waits to fill (a request that
            arrives alone waits all of it).
        stats: handle of :class:`StatsServer` (counters for ``/metrics``), optional.
        stage: a ready ``DecoderStage`` (tests); skips loading.
        batch_policy: ``adaptive`` (default: no timer; requests that arrive while a batch runs share the next
            call, see :class:`services.workers.AdaptiveBatcher`) or ``timeout`` (Ray's ``@serve.batch`` with
            ``batch_wait_timeout_s``); :data:`services.workers.BATCH_POLICIES`.
        stats_period_s: the counters go to ``stats`` at most this often (only when they changed).
        regroup_fraction: ``adaptive``: after a batch of n > 1 the next one waits for n callers at most this
            fraction of that batch's run time (:class:`services.workers.AdaptiveBatcher`).

    Raises:
        ValueError: an unknown ``batch_policy``.
    """

    def __init__(self, preset: PresetConfig | str, modality: str, device: str | None = None,
                 export_dir: str | None = None, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.0,
                 stats: DeploymentHandle | None = None, stage: DecoderStageLike | None = None,
                 batch_policy: str = "adaptive", stats_period_s: float = STATS_PERIOD_S,
                 regroup_fraction: float = 0.0):
        self.modality = Modality.parse(modality)
        self.batch_policy = check_batch_policy(batch_policy)
        if stage is None:
            from polymodal.pipeline import build_decoder_stage, llm_hidden_size
            from polymodal.presets import get_preset

            p = get_preset(preset)
            stage = build_decoder_stage(p, self.modality, device=device, export_dir=export_dir,
                                        d_llm=llm_hidden_size(p))
        self._worker = DecoderWorker(stage)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self.render_batch.set_max_batch_size(int(max_batch_size))
        self.render_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._batcher = (AdaptiveBatcher(self._run_batch, int(max_batch_size), float(regroup_fraction))
                         if batch_policy == "adaptive" else None)
        self._stats = stats
        self._stats_period_s = float(stats_period_s)
        self._replica = uuid.uuid4().hex
        self._flusher: asyncio.Task | None = None
        self._reported: dict[str, int] | None = None

    async def render(self, request: RenderRequest) -> EncodedMedium:
        """Render one medium (batched with concurrent calls).

        Raises:
            RenderFailed: this item could not be rendered. asyncio.CancelledError: cancelled by the caller.
        """
        self._ensure_flusher()
        item = BatchItem(request)
        try:
            result = await (self._batcher.submit(item) if self._batcher is not None else self.render_batch(item))
        except asyncio.CancelledError:
            item.cancel.set()  # the step callback sees it; the batch stops once all its items are cancelled
            raise
        if isinstance(result, Cancelled):
            raise asyncio.CancelledError()
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)
    async def render_batch(self, items: list[BatchItem]) -> list[EncodedMedium | Exception]:
        """``batch_policy="timeout"``: Ray forms the batch."""
        return await self._run_batch(items)

    async def _run_batch(self, items: list[BatchItem]) -> list[EncodedMedium | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._worker.run_batch, items)

    async def _report(self) -> None:
        snap = self._worker.counters.snapshot()
        if snap != self._reported:
            try:
                await self._stats.report.remote(self._replica, self.modality.value, snap)
                self._reported = snap
            except Exception as e:  # noqa: BLE001 - metrics never break rendering
                log.debug("stats report failed: %s", e)

    def _ensure_flusher(self) -> None:
        if self._stats is not None and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """Report this replica's counters to the stats deployment every ``stats_period_s`` when they changed (a
        fixed low rate: not per denoising step, not per batch)."""
        while True:
            await asyncio.sleep(self._stats_period_s)
            await self._report()

    def stats(self) -> dict[str, int]:
        return self._worker.counters.snapshot()

    def describe(self) -> dict[str, Any]:
        stage = self._worker.stage
        d = dict(stage.describe()) if hasattr(stage, "describe") else {"init_state": stage.init_state}
        d["healthy"] = self._worker.healthy
        return d

    def check_health(self) -> None:
        if not self._worker.healthy:
            raise RuntimeError(f"the {self.modality.value} decoder is unusable: {self._worker.last_error}")


class SpeechServer:
    """Speech recognition and synthesis as a deployment (the skills ``transcribe`` and ``synthesize_speech``).

    Args:
        config: :class:`services.speech.SpeechConfig` (or its dict): engines, voices, models, threads.
        worker: a ready :class:`services.speech.SpeechWorker` (tests); skips loading.
    """

    def __init__(self, config: SpeechConfig | dict | None = None, worker: SpeechWorker | None = None):
        self._worker = worker if worker is not None else SpeechWorker.from_config(config)

    async def transcribe(self, request: TranscriptionRequest):
        """The :class:`polymodal.types.Transcript` of the request's audio."""
        return await self._worker.transcribe(request)

    async def synthesize(self, request: SpeechRequest):
        """Async generator of :class:`services.protocol.SpeechAudioChunk`, one per sentence; cancellation stops it."""
        async for chunk in self._worker.synthesize(request):
            yield chunk

    def info(self) -> dict[str, Any]:
        return self._worker.info()

    def describe(self) -> dict[str, Any]:
        return self._worker.describe()

    def check_health(self) -> None:
        if not self._worker.healthy:
            raise RuntimeError(f"the speech stage is unusable: {self._worker.last_error}")


class SkillServer:
    """The skills of one skill deployment.

    Args:
        preset: the preset (its decoders serve the ``generate_*`` skills).
        names: the skills hosted here.
        device: torch device of the models (generators, OWL-ViT).
        object_detector_path: OWL-ViT folder or hub id (``detect_objects``).
        ocr_threads: ONNX Runtime threads of ``ocr``.
        host: a ready :class:`services.skill_host.SkillHost` (tests); skips building.
    """

    def __init__(self, preset: PresetConfig | str, names: list[str], device: str | None = None,
                 object_detector_path: str | None = None, ocr_threads: int | None = None, host=None):
        if host is None:
            from services.skill_host import SkillHost

            host = SkillHost.build(names, preset, device=device, object_detector_path=object_detector_path,
                                   ocr_threads=ocr_threads)
        self._host = host
        # one thread per skill at most: each skill serialises its own calls (a Haar classifier, an ONNX session)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(host.names)),
                                                               thread_name_prefix="skill")

    async def run(self, request: SkillRequest) -> SkillOutput:
        """One call, off the event loop. Raises: ValueError for a skill not hosted here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._host.run, request)

    def names(self) -> list[str]:
        return list(self._host.names)

    def describe(self) -> dict[str, Any]:
        return self._host.describe()


class StatsServer:
    """Latest counters of every decoder replica; ``snapshot`` sums them per modality."""

    def __init__(self):
        self._latest: dict[tuple[str, str], dict[str, int]] = {}

    def report(self, replica: str, modality: str, counters: dict[str, int]) -> None:
        self._latest[(replica, modality)] = dict(counters)

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (_, modality), c in self._latest.items():
            agg = out.setdefault(modality, {})
            for k, v in c.items():
                agg[k] = max(agg.get(k, 0), v) if k == "max_batch_size" else agg.get(k, 0) + v
        return out


@serve.ingress()
class IngressServer:
    """The HTTP API (:func:`services.ingress.build_app`) over DeploymentHandles.

    Args:
        preset: the served preset.
        llm: :class:`LLMServer` handle. decoders: ``{modality value: DecoderServer handle}``.
        stats: :class:`StatsServer` handle. settings: :class:`services.settings.ServerSettings` (or a dict).
        speech: :class:`SpeechServer` handle (``None``: the speech endpoints answer 503).
        skill_servers: ``{deployment name: SkillServer handle}``; placement: ``{skill name: deployment name}``.
    """

    def __init__(self, preset: PresetConfig, llm: DeploymentHandle, decoders: dict[str, DeploymentHandle],
                 stats: DeploymentHandle | None = None,
                 settings: ServerSettings | dict | None = None, speech: DeploymentHandle | None = None,
                 skill_servers: dict[str, DeploymentHandle] | None = None,
                 placement: dict[str, str] | None = None):
        from services.ray_backend import RayBackend

        self._settings = ServerSettings.model_validate(settings or {})
        self._backend = RayBackend(preset, llm, decoders, stats, retry_after_s=self._settings.retry_after_s,
                                   speech=speech, skill_servers=skill_servers, placement=placement)

    def __serve_build_asgi_app__(self):
        from services.ingress import build_app

        return build_app(self._backend, self._settings)
