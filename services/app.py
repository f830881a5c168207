"""The typed Ray Serve app builder: ``services.app:app_builder`` (used by ``deploy/serve.yaml`` and the CLI).

Graph::

    IngressServer (FastAPI, no torch) --stream--> LLMServer
                                      --render--> DecoderServer[image] / [audio] / [video]  (batched)
                                      --stats---> StatsServer  <--report-- DecoderServer replicas

Every deployment's resources, replica counts / autoscaling and queue bounds are typed fields of
:class:`AppArgs` (pydantic, validated by Ray from the YAML ``args``). On a small CPU machine keep every
replica's ``num_cpus`` below 1 (Ray only schedules what fits); on a GPU node give each decoder a fraction of
the GPU (``num_gpus: 0.3``).
"""

import os
import tempfile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.presets import get_preset

from services.settings import ServerSettings


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AutoscalingArgs(_Args):
    """Ray Serve ``autoscaling_config`` (replaces a fixed ``num_replicas``)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)


class DeploymentArgs(_Args):
    """Resources and scaling of one deployment.

    Attributes:
        num_cpus / num_gpus: ``ray_actor_options`` (fractions allowed; several decoders can share a GPU).
        memory_bytes: ``ray_actor_options.memory`` (scheduling hint), optional.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is set).
        autoscaling: Ray Serve autoscaling config.
        max_ongoing_requests: requests one replica works on at once.
        max_queued_requests: requests a caller may queue for this deployment beyond that; more get
            ``BackPressureError`` (the API answers 503 + Retry-After). ``-1``: unbounded.
        health_check_period_s / health_check_timeout_s: ``check_health`` cadence.
        graceful_shutdown_timeout_s: time to finish running requests on scale-down.
    """

    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_bytes: int | None = Field(None, ge=0)
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingArgs | None = None
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(10.0, ge=0)

    def options(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        opts: dict[str, Any] = {
            "name": name,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class DecoderDeploymentArgs(DeploymentArgs):
    """A decoder deployment: resources plus batching settings.

    ``batch_policy``: ``adaptive`` (default; no timer: a lone request starts at once, requests arriving while a
    batch runs share the next pipeline call) or ``timeout`` (Ray's ``@serve.batch``: a batch waits up to
    ``batch_wait_timeout_s`` to fill, which a request arriving alone always pays). Figures: ``bench/README.md``.
    """

    num_cpus: float = Field(0.2, ge=0)
    max_batch_size: int = Field(4, ge=1, le=64)
    batch_policy: Literal["adaptive", "timeout"] = "adaptive"
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)
    max_ongoing_requests: int = Field(16, ge=1)


class LLMDeploymentArgs(DeploymentArgs):
    num_cpus: float = Field(0.4, ge=0)
    max_concurrency: int = Field(1, ge=1, le=64, description="generations at once per replica")


class IngressDeploymentArgs(DeploymentArgs):
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)


class AppArgs(_Args):
    """Arguments of :func:`app_builder` (the ``args`` of an application in ``deploy/serve.yaml``).

    Attributes:
        preset: a preset name (``tiny``, ``smol``, ``nextgpt-7b``, ...) or a preset YAML path.
        device: torch device of the model replicas (``None``: cuda if the replica has a GPU, else cpu).
        export_dir: an export of trained parts (:mod:`polymodal.export`: projectors, token rows, LoRA).
        modalities: output modalities to deploy decoders for (default: every decoder of the preset).
        ingress / llm / stats: deployment settings. decoders: per modality (missing ones use defaults).
        server: the HTTP API's settings (limits, timeouts, keys, store).
    """

    preset: str = "tiny"
    device: str | None = None
    export_dir: str | None = None
    modalities: list[Modality] | None = None
    ingress: IngressDeploymentArgs = IngressDeploymentArgs()
    llm: LLMDeploymentArgs = LLMDeploymentArgs()
    decoders: dict[Modality, DecoderDeploymentArgs] = {}
    stats: DeploymentArgs = DeploymentArgs(num_cpus=0.0, max_ongoing_requests=256)
    server: ServerSettings = ServerSettings()

    def resolved_preset(self) -> PresetConfig:
        return get_preset(self.preset)


def app_builder(args: AppArgs):
    """Build the Ray Serve application (a bound ingress deployment).

    Raises:
        polymodal.preflight.StartupError: a path that is missing or unusable.
        ValueError: unknown preset, or a requested modality the preset has no decoder for.
    """
    from services.deployments import DecoderServer, IngressServer, LLMServer, StatsServer

    from polymodal.preflight import check_start

    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    # every path (preset file, weights, export, cache) before anything is deployed
    preset = check_start(args.preset, export_dir=args.export_dir, modalities=args.modalities)
    available = [m for m in preset.decoders if m in preset.output_projectors]
    chosen = available if args.modalities is None else list(args.modalities)
    for m in chosen:
        if m not in available:
            raise ValueError(f"preset {preset.name!r} has no {m.value} decoder; it has: "
                             f"{', '.join(x.value for x in available) or 'none'}")
    served = preset.model_copy(update={"decoders": {m: preset.decoders[m] for m in chosen}})
    server = args.server
    if server.store_dir is None:  # one folder for every ingress replica of the node (set a shared volume across nodes)
        server = server.model_copy(update={"store_dir": os.path.join(tempfile.gettempdir(), f"polymodal-store-{preset.name}")})
    stats = serve.deployment(StatsServer).options(**args.stats.options("stats")).bind()
    llm = serve.deployment(LLMServer).options(**args.llm.options("llm")).bind(
        preset, args.device, args.export_dir, args.llm.max_concurrency)
    decoders = {}
    for m in chosen:
        d = args.decoders.get(m, DecoderDeploymentArgs())
        decoders[m.value] = serve.deployment(DecoderServer).options(**d.options(f"decoder-{m.value}")).bind(
            preset, m.value, args.device, args.export_dir, d.max_batch_size, d.batch_wait_timeout_s, stats,
            batch_policy=d.batch_policy)
    return serve.deployment(IngressServer).options(**args.ingress.options("ingress")).bind(
        served, llm, decoders, stats, server)
