"""The typed Ray Serve app builder: ``services.app:app_builder`` (used by ``deploy/serve.yaml`` and the CLI).

Graph::

    IngressServer (FastAPI, no torch) --stream--> LLMServer
                                      --render--> DecoderServer[image] / [audio] / [video]  (batched)
                                      --speech--> SpeechServer (transcribe, synthesize: pocketsphinx, flite)
                                      --stats---> StatsServer  <--report-- DecoderServer replicas
                                      --run-----> SkillServer["skills-cpu"]       detect, segment, ocr
                                                  SkillServer["skills-generate"]  generate_image / _audio / _video
                                                  SkillServer["skills-objects"]   detect_objects (with a path)

Which deployment hosts which skill is ``AppArgs.skills`` (the placement of
:data:`services.skill_host.SKILL_DEPLOYMENTS`; by default only ``skills-cpu``, ``deploy/serve.yaml`` adds
``skills-generate`` and ``skills-objects``); a deployment whose skills the preset cannot serve (no decoder of that
modality, no object-detector path) is not deployed; ``skills: {}`` deploys none.

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
from services.speech import SpeechConfig


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
    ``batch_wait_timeout_s`` to fill, which a request arriving alone always pays). ``regroup_fraction`` (adaptive):
    right after a batch of n > 1 the next one waits for n callers at most this fraction of that batch's run time
    (closed-loop clients come back together; a lone request after an idle spell never waits). Figures: ``bench/README.md``.
    """

    num_cpus: float = Field(0.2, ge=0)
    max_batch_size: int = Field(4, ge=1, le=64)
    batch_policy: Literal["adaptive", "timeout"] = "adaptive"
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)
    regroup_fraction: float = Field(0.05, ge=0, le=1)
    max_ongoing_requests: int = Field(16, ge=1)


class LLMDeploymentArgs(DeploymentArgs):
    num_cpus: float = Field(0.4, ge=0)
    max_concurrency: int = Field(1, ge=1, le=64, description="generations at once per replica")


class SkillDeploymentArgs(DeploymentArgs):
    """A skill deployment: resources plus the skills it hosts (:data:`services.skill_host.SKILL_DEPLOYMENTS`)."""

    num_cpus: float = Field(0.2, ge=0)
    skills: list[str] = Field(min_length=1)
    ocr_threads: int | None = Field(None, ge=1, le=64, description="ONNX Runtime threads of ocr (None: its own)")


def _default_skill_deployments() -> dict[str, SkillDeploymentArgs]:
    """Only ``skills-cpu`` (light, 0.1 CPU): the generators and OWL-ViT build models of their own, so their
    deployments are opt-in (``deploy/serve.yaml`` lists them)."""
    from services.skill_host import SKILL_DEPLOYMENTS

    return {"skills-cpu": SkillDeploymentArgs(skills=list(SKILL_DEPLOYMENTS["skills-cpu"]), num_cpus=0.1)}


class IngressDeploymentArgs(DeploymentArgs):
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)


class SpeechDeploymentArgs(DeploymentArgs, SpeechConfig):
    """The speech deployment: resources plus :class:`services.speech.SpeechConfig` (engines, voices, models).

    ``enabled: false`` deploys none (the speech endpoints then answer 503). Its work is subprocesses (flite) and
    a CPU decoder (pocketsphinx): a small CPU share by default; give it ``num_gpus`` with transformers engines.
    """

    enabled: bool = True
    num_cpus: float = Field(0.2, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)

    def speech_config(self) -> dict[str, Any]:
        """The :class:`~services.speech.SpeechConfig` part (what the deployment's constructor takes)."""
        return SpeechConfig.model_validate(self.model_dump(include=set(SpeechConfig.model_fields))).model_dump()


class AppArgs(_Args):
    """Arguments of :func:`app_builder` (the ``args`` of an application in ``deploy/serve.yaml``).

    Attributes:
        preset: a preset name (``tiny``, ``smol``, ``nextgpt-7b``, ...) or a preset YAML path.
        device: torch device of the model replicas (``None``: cuda if the replica has a GPU, else cpu).
        export_dir: an export of trained parts (:mod:`polymodal.export`: projectors, token rows, LoRA).
        modalities: output modalities to deploy decoders for (default: every decoder of the preset).
        ingress / llm / stats: deployment settings. decoders: per modality (missing ones use defaults).
        speech: the speech deployment (recognition and synthesis) and its engines.
        skills: skill deployments by name, each with the skills it hosts (``{}``: no skills).
        object_detector_path: OWL-ViT folder or hub id of the ``detect_objects`` skill (``None``: not served).
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
    speech: SpeechDeploymentArgs = SpeechDeploymentArgs()
    skills: dict[str, SkillDeploymentArgs] = Field(default_factory=_default_skill_deployments)
    object_detector_path: str | None = None
    server: ServerSettings = ServerSettings()

    def resolved_preset(self) -> PresetConfig:
        return get_preset(self.preset)

    def skill_placement(self, preset: PresetConfig, modalities: list[Modality] | None = None) -> dict[str, list[str]]:
        """Deployment name -> the skills it will host for ``preset`` (deployments left empty are dropped).

        Raises:
            ValueError: an unknown skill name, or a skill listed in two deployments.
        """
        from services.skill_host import servable_skills

        seen: dict[str, str] = {}
        out: dict[str, list[str]] = {}
        for dep, d in self.skills.items():
            for n in d.skills:
                if n in seen:
                    raise ValueError(f"skill {n!r} is listed in two skill deployments: {seen[n]!r} and {dep!r}")
                seen[n] = dep
            names = servable_skills(preset, d.skills, object_detector_path=self.object_detector_path,
                                    modalities=modalities)
            if names:
                out[dep] = list(names)
        return out


def app_builder(args: AppArgs):
    """Build the Ray Serve application (a bound ingress deployment).

    Raises:
        polymodal.preflight.StartupError: a path that is missing or unusable.
        ValueError: unknown preset, or a requested modality the preset has no decoder for.
    """
    from services.deployments import DecoderServer, IngressServer, LLMServer, SkillServer, SpeechServer, StatsServer

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
            batch_policy=d.batch_policy, regroup_fraction=d.regroup_fraction)
    speech = None
    if args.speech.enabled:
        speech = serve.deployment(SpeechServer).options(**args.speech.options("speech")).bind(
            args.speech.speech_config())
    skill_handles: dict[str, Any] = {}
    for dep, names in args.skill_placement(preset, chosen).items():
        d = args.skills[dep]
        skill_handles[dep] = serve.deployment(SkillServer).options(**d.options(dep)).bind(
            preset, names, args.device, args.object_detector_path, d.ocr_threads)
    placement = {n: dep for dep, names in args.skill_placement(preset, chosen).items() for n in names}
    return serve.deployment(IngressServer).options(**args.ingress.options("ingress")).bind(
        served, llm, decoders, stats, server, speech, skill_handles, placement)
