"""The Ray Serve backend: the ingress's stages are DeploymentHandles.

- LLM: ``handle.options(stream=True).generate_chunks.remote(req)`` streams text deltas and signal groups, in lists
  (a few per answer, not one Ray stream item per token).
- Decoders: one handle per modality; ``render.remote(req)`` (the replica batches with ``@serve.batch``).
- Skills: one handle per skill deployment (``placement`` says which hosts which skill); ``run.remote(req)``.
  A skill call is not retried when its replica dies (it answers a 503 the ingress turns into the call's error
  result for the model).
- Stats: the stats deployment sums the decoder replicas' counters (for ``/metrics``).
- Speech: ``handle.options(stream=True).synthesize.remote(req)`` streams one chunk per sentence;
  ``transcribe.remote(req)``; ``info.remote()`` (voices).

Cancelling the awaiting task (client disconnect, timeout) cancels the downstream request: Ray Serve
propagates the cancellation into the replica, where it sets the work's cancel flag. Ray's
``BackPressureError`` (a deployment's ``max_queued_requests`` reached) becomes :class:`Overloaded` (503
with ``Retry-After``); an exception raised in a replica is unwrapped to its original type.

A replica that dies under a request (``RayActorError``: ``ActorDiedError``, ``ActorUnavailableError``; Serve's
``ReplicaUnavailableError``): a render is sent again (rendering is deterministic for its seed, so the medium is
the same) with a growing pause, to another replica when there is one, else to the one Serve restarts, until
the request's deadline (:data:`services.protocol.REQUEST_DEADLINE`) is near; then :class:`StageUnavailable`
(503 + ``Retry-After``). An LLM stream is sent again only if its replica died before anything was streamed
(text already sent cannot be taken back); after that it is a 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.types import Transcript

from services.errors import Overloaded, StageUnavailable
from services.protocol import (
    REQUEST_DEADLINE,
    Backend,
    EncodedMedium,
    LLMEvent,
    LLMRequest,
    RenderRequest,
    SpeechAudioChunk,
    SpeechRequest,
    TranscriptionRequest,
    SkillOutput,
    SkillRequest,
)

log = logging.getLogger(__name__)

RETRY_FIRST_PAUSE_S = 0.5
"""Pause before the first retry after a replica died; doubled each time, at most :data:`RETRY_MAX_PAUSE_S`."""
RETRY_MAX_PAUSE_S = 5.0
RETRY_WINDOW_S = 60.0
"""How long retries go on when the request has no deadline (``REQUEST_DEADLINE`` unset)."""
RETRY_MARGIN_S = 1.0
"""Retries stop this long before the deadline, so the 503 comes before the request's 504."""


def _replica_lost(e: BaseException) -> bool:
    """The replica serving the call died or became unreachable (the call may be sent again)."""
    if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), RayActorError):
        return True
    return isinstance(e, (RayActorError, ReplicaUnavailableError))


def _unwrap(e: BaseException, stage: str, retry_after_s: int) -> BaseException:
    if isinstance(e, BackPressureError):
        return Overloaded(f"the {stage} stage's queue is full; retry later", retry_after_s)
    if isinstance(e, DeploymentUnavailableError):
        return StageUnavailable(f"the {stage} stage is not available")
    if _replica_lost(e):
        return StageUnavailable(f"the {stage} replica serving this request died; retry later",
                                max(retry_after_s, 5))
    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        return e.cause
    return e


class _Retries:
    """Pauses between the tries of one call, until ``REQUEST_DEADLINE`` (less :data:`RETRY_MARGIN_S`) is near."""

    def __init__(self) -> None:
        deadline = REQUEST_DEADLINE.get()
        self.deadline = deadline if deadline is not None else time.monotonic() + RETRY_WINDOW_S
        self.pause_s = RETRY_FIRST_PAUSE_S
        self.tries = 1

    async def again(self) -> bool:
        """Sleep before the next try and return True, or return False when it would not fit before the
        deadline."""
        if time.monotonic() + self.pause_s > self.deadline - RETRY_MARGIN_S:
            return False
        await asyncio.sleep(self.pause_s)
        self.pause_s = min(RETRY_MAX_PAUSE_S, self.pause_s * 2)
        self.tries += 1
        return True


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
        skill_servers: ``{deployment name: SkillServer handle}``; placement: ``{skill name: deployment name}``.
    """

    def __init__(self, preset: PresetConfig, llm: DeploymentHandle, decoders: dict[Modality | str, DeploymentHandle],
                 stats: DeploymentHandle | None = None, retry_after_s: int = 1,
                 speech: DeploymentHandle | None = None,
                 skill_servers: dict[str, DeploymentHandle] | None = None, placement: dict[str, str] | None = None):
        self.preset = preset
        self._llm = llm
        self._decoders = {Modality.parse(m): h for m, h in decoders.items()}
        self._stats = stats
        self._retry = retry_after_s
        self._speech = speech
        self._skill_servers = dict(skill_servers or {})
        self._placement = {n: d for n, d in (placement or {}).items() if d in self._skill_servers}
        self._specs: dict[str, Any] | None = None
        self.retried: dict[str, int] = {}  # renders sent again after their replica died, per modality

    @property
    def output_modalities(self) -> tuple[Modality, ...]:
        return tuple(m for m in self._decoders if m in self.preset.output_projectors)

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMEvent]:
        retries = None
        while True:
            gen = None
            streamed = False
            try:
                gen = self._llm.options(stream=True).generate_chunks.remote(request)
                async for chunk in gen:  # lists of items: text gathered over a short window, groups at once
                    streamed = True
                    for item in chunk:
                        yield item
                return
            except (asyncio.CancelledError, GeneratorExit):
                _cancel(gen)
                raise
            except Exception as e:  # noqa: BLE001 - retried or translated
                retries = retries or _Retries()
                if streamed or not _replica_lost(e) or not await retries.again():
                    raise _unwrap(e, "LLM", self._retry) from None
                log.warning("%s: the LLM replica died before streaming (%s); try %d", request.request_id,
                            type(e).__name__, retries.tries)

    async def render(self, request: RenderRequest) -> EncodedMedium:
        m = request.group.modality
        handle = self._decoders.get(m)
        if handle is None:
            raise StageUnavailable(f"no {m.value} decoder is deployed")
        retries = None
        while True:
            resp = None
            try:
                resp = handle.render.remote(request)
                return await resp
            except asyncio.CancelledError:
                _cancel(resp)
                raise
            except Exception as e:  # noqa: BLE001 - retried or translated
                retries = retries or _Retries()
                if not _replica_lost(e) or not await retries.again():
                    raise _unwrap(e, f"{m.value} decoder", self._retry) from None
                self.retried[m.value] = self.retried.get(m.value, 0) + 1
                log.warning("%s: the %s decoder replica died under this render (%s); try %d (seed %d)",
                            request.request_id, m.value, type(e).__name__, retries.tries, request.seed)

    def _speech_handle(self) -> DeploymentHandle:
        if self._speech is None:
            raise StageUnavailable("speech is not deployed on this server")
        return self._speech

    async def _unary(self, call: Callable[[], DeploymentResponse], stage: str) -> Any:
        """One call to a replica (``call`` sends it): cancelled with the caller, its errors translated
        (:func:`_unwrap`). Not retried: only renders are (deterministic for their seed)."""
        resp = None
        try:
            resp = call()
            return await resp
        except asyncio.CancelledError:
            _cancel(resp)
            raise
        except Exception as e:  # noqa: BLE001 - translated
            raise _unwrap(e, stage, self._retry) from None

    async def transcribe(self, request: TranscriptionRequest) -> Transcript:
        handle = self._speech_handle()
        return await self._unary(lambda: handle.transcribe.remote(request), "speech")

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
        return await self._unary(handle.info.remote, "speech")

    @property
    def skills(self) -> tuple[str, ...]:
        return tuple(self._placement)

    def skill_host(self, name: str) -> str | None:
        return self._placement.get(name)

    def skill_specs(self) -> dict[str, Any]:
        if self._specs is None:
            from skills import skill_specs

            self._specs = {s.name: s for s in skill_specs(list(self._placement))}
        return self._specs

    async def run_skill(self, request: SkillRequest) -> SkillOutput:
        dep = self._placement.get(request.name)
        if dep is None:
            raise StageUnavailable(f"skill {request.name!r} is not deployed; deployed: "
                                   f"{', '.join(self._placement) or 'none'}")
        handle = self._skill_servers[dep]
        return await self._unary(lambda: handle.run.remote(request), f"{dep} skill")

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
        if self._skill_servers:
            parts["skills"] = {}
            for dep, h in self._skill_servers.items():
                try:
                    parts["skills"][dep] = await h.describe.remote()
                except Exception as e:  # noqa: BLE001 - reported
                    parts["skills"][dep] = {"error": str(_unwrap(e, dep, self._retry)).splitlines()[0]}
                    ready = False
        parts["ready"] = (ready and all(d.get("healthy", True) for d in parts["decoders"].values())
                          and parts.get("speech", {}).get("healthy", True))
        return parts

    async def stats(self) -> dict[str, dict[str, float]]:
        out = {} if self._stats is None else await self._stats.snapshot.remote()
        for m, n in self.retried.items():
            out.setdefault(m, {})["retried"] = n
        return out
