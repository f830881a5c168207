"""The Ray Serve backend: the ingress's stages are DeploymentHandles.

- LLM: ``handle.options(stream=True).generate.remote(req)`` streams text deltas and signal groups.
- Decoders: one handle per modality; ``render.remote(req)`` (the replica batches with ``@serve.batch``).
- Stats: the stats deployment sums the decoder replicas' counters (for ``/metrics``).
- Speech: ``handle.options(stream=True).synthesize.remote(req)`` streams one chunk per sentence;
  ``transcribe.remote(req)``; ``info.remote()`` (voices).

Cancelling the awaiting task (client disconnect, timeout) cancels the downstream request: Ray Serve
propagates the cancellation into the replica, where it sets the work's cancel flag. Ray's
``BackPressureError`` (a deployment's ``max_queued_requests`` reached) becomes :class:`Overloaded` (503
with ``Retry-After``); an exception raised in a replica is unwrapped to its original type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from polymodal.config import PresetConfig
from polymodal.modality import Modality

from services.errors import Overloaded, StageUnavailable
from polymodal.types import Transcript

from services.protocol import (
    Backend,
    EncodedMedium,
    LLMEvent,
    LLMRequest,
    RenderRequest,
    SpeechAudioChunk,
    SpeechRequest,
    TranscriptionRequest,
)


def _unwrap(e: BaseException, stage: str, retry_after_s: int) -> BaseException:
    if isinstance(e, BackPressureError):
        return Overloaded(f"the {stage} stage's queue is full; retry later", retry_after_s)
    if isinstance(e, DeploymentUnavailableError):
        return StageUnavailable(f"the {stage} stage is not available")
    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        return e.cause
    return e


def _cancel(response: DeploymentResponse | DeploymentResponseGenerator | None) -> None:
    """Cancel a DeploymentResponse(Generator): best effort (a request that already failed re-raises its
    error from ``cancel``; there is nothing left to cancel then)."""
    if response is None:
        return
    try:
        response.cancel()
    except Exception:  # noqa: BLE001
        pass


class RayBackend(Backend):
    """Backend over Ray Serve DeploymentHandles.

    Args:
        preset: the served preset.
        llm: handle of :class:`services.deployments.LLMServer`.
        decoders: per modality (enum or its value), handle of :class:`services.deployments.DecoderServer`.
        stats: handle of :class:`services.deployments.StatsServer` (optional).
        retry_after_s: ``Retry-After`` for 503.
        speech: handle of :class:`services.deployments.SpeechServer` (optional).
    """

    def __init__(self, preset: PresetConfig, llm: DeploymentHandle, decoders: dict[Modality | str, DeploymentHandle],
                 stats: DeploymentHandle | None = None, retry_after_s: int = 1,
                 speech: DeploymentHandle | None = None):
        self.preset = preset
        self._llm = llm
        self._decoders = {Modality.parse(m): h for m, h in decoders.items()}
        self._stats = stats
        self._retry = retry_after_s
        self._speech = speech

    @property
    def output_modalities(self) -> tuple[Modality, ...]:
        return tuple(m for m in self._decoders if m in self.preset.output_projectors)

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMEvent]:
        gen = None
        try:
            gen = self._llm.options(stream=True).generate.remote(request)
            async for item in gen:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            _cancel(gen)
            raise
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, "LLM", self._retry) from None

    async def render(self, request: RenderRequest) -> EncodedMedium:
        m = request.group.modality
        handle = self._decoders.get(m)
        if handle is None:
            raise StageUnavailable(f"no {m.value} decoder is deployed")
        resp = None
        try:
            resp = handle.render.remote(request)
            return await resp
        except asyncio.CancelledError:
            _cancel(resp)
            raise
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, f"{m.value} decoder", self._retry) from None

    def _speech_handle(self) -> DeploymentHandle:
        if self._speech is None:
            raise StageUnavailable("speech is not deployed on this server")
        return self._speech

    async def transcribe(self, request: TranscriptionRequest) -> Transcript:
        handle = self._speech_handle()
        resp = None
        try:
            resp = handle.transcribe.remote(request)
            return await resp
        except asyncio.CancelledError:
            _cancel(resp)
            raise
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, "speech", self._retry) from None

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[SpeechAudioChunk]:
        handle = self._speech_handle()
        gen = None
        try:
            gen = handle.options(stream=True).synthesize.remote(request)
            async for chunk in gen:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            _cancel(gen)
            raise
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, "speech", self._retry) from None

    async def speech_info(self) -> dict[str, Any]:
        handle = self._speech_handle()
        try:
            return await handle.info.remote()
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, "speech", self._retry) from None

    async def describe(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"decoders": {}}
        ready = True
        try:
            parts["llm_stage"] = await self._llm.describe.remote()
        except Exception as e:  # noqa: BLE001 - reported
            parts["llm_stage"] = {"error": str(_unwrap(e, "LLM", self._retry)).splitlines()[0]}
            ready = False
        for m, h in self._decoders.items():
            try:
                parts["decoders"][m.value] = await h.describe.remote()
            except Exception as e:  # noqa: BLE001 - reported
                parts["decoders"][m.value] = {"error": str(_unwrap(e, m.value, self._retry)).splitlines()[0]}
                ready = False
        if self._speech is not None:
            try:
                parts["speech"] = await self._speech.describe.remote()
            except Exception as e:  # noqa: BLE001 - reported
                parts["speech"] = {"error": str(_unwrap(e, "speech", self._retry)).splitlines()[0]}
                ready = False
        parts["ready"] = (ready and all(d.get("healthy", True) for d in parts["decoders"].values())
                          and parts.get("speech", {}).get("healthy", True))
        return parts

    async def stats(self) -> dict[str, dict[str, float]]:
        if self._stats is None:
            return {}
        return await self._stats.snapshot.remote()
