"""deploy/serve.yaml and the typed app builder: Ray's schema, AppArgs validation, the graph it builds (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

from services.app import AppArgs, app_builder
from services.deployments import DecoderServer, IngressServer, LLMServer, StatsServer

ROOT = Path(__file__).resolve().parents[1]


def _graph(app: Application) -> dict:
    """name -> Deployment of every deployment reachable from the ingress."""
    out = {}

    def walk(x):
        if isinstance(x, Application):
            d = x._bound_deployment
            out[d.name] = d
            for a in [*d.init_args, *d.init_kwargs.values()]:
                walk(a)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(app)
    return out


def test_serve_yaml_is_a_valid_serve_config_and_builds_the_graph():
    cfg = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "services.app:app_builder"
    AppArgs.model_validate(app_cfg.args)  # every field known and in bounds
    app = call_user_app_builder_with_args_if_necessary(app_builder, app_cfg.args)  # Ray's own builder path
    g = _graph(app)
    # the skill deployments the toy preset can serve (skills-objects needs object_detector_path: not deployed)
    assert set(g) == {"ingress", "llm", "stats", "decoder-image", "decoder-audio", "decoder-video", "speech",
                      "skills-cpu", "skills-generate"}
    assert g["ingress"].func_or_class.__name__ == IngressServer.__name__
    assert g["skills-cpu"].init_args[1] == ["detect", "segment", "ocr"]
    assert g["skills-generate"].init_args[1] == ["generate_image", "generate_audio", "generate_video"]
    assert g["ingress"].init_args[7] == {"detect": "skills-cpu", "segment": "skills-cpu", "ocr": "skills-cpu",
                                         "generate_image": "skills-generate", "generate_audio": "skills-generate",
                                         "generate_video": "skills-generate"}
    for name, d in g.items():
        assert 0 <= d.ray_actor_options["num_cpus"] < 1, name  # schedulable on a 2-core machine
    img = g["decoder-image"]
    assert img.func_or_class is DecoderServer and img.max_ongoing_requests == 16 and img.max_queued_requests == 64
    auto = img._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 2)
    assert img.init_args[4] == 4 and img.init_args[1] == "image"  # max_batch_size, modality
    assert g["llm"].func_or_class is LLMServer and g["llm"].max_queued_requests == 32
    assert g["stats"].func_or_class is StatsServer
    speech = g["speech"]
    assert speech.func_or_class.__name__ == "SpeechServer" and speech.init_args[0]["asr_backend"] == "pocketsphinx"
    assert g["ingress"].init_args[5] is not None  # the ingress gets the speech handle


def test_typed_args_are_validated():
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"llm": {"num_cpus": -1}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"decoders": {"smell": {}}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"server": {"limits": {"max_inference_steps": 10_000}}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"unknown_field": 1})


def test_builder_options_and_modalities():
    app = app_builder(AppArgs(preset="tiny", modalities=["image"],
                              decoders={"image": {"num_gpus": 0.25, "num_cpus": 0.5, "max_batch_size": 6}}))
    g = _graph(app)
    assert set(g) == {"ingress", "llm", "stats", "decoder-image", "speech", "skills-cpu"}  # skills-cpu: the default
    d = g["decoder-image"]
    assert d.ray_actor_options["num_gpus"] == 0.25 and d.num_replicas == 1 and d.init_args[4] == 6
    served = g["ingress"].init_args[0]
    assert [m.value for m in served.decoders] == ["image"]
    settings = g["ingress"].init_args[4]
    assert settings.store_dir and "polymodal-store" in settings.store_dir  # one folder for every ingress replica
    with pytest.raises(ValueError, match="no video decoder"):
        app_builder(AppArgs(preset=str(_preset_without_video()), modalities=["video"]))
    no_speech = _graph(app_builder(AppArgs(preset="tiny", modalities=["image"], speech={"enabled": False})))
    assert "speech" not in no_speech and no_speech["ingress"].init_args[5] is None


def _preset_without_video() -> Path:
    import tempfile

    from polymodal.modality import Modality
    from polymodal.presets import get_preset

    p = get_preset("tiny")
    p = p.model_copy(update={"name": "tiny-nv", "decoders": {m: c for m, c in p.decoders.items() if m is not Modality.VIDEO}})
    f = Path(tempfile.mkdtemp()) / "tiny-nv.yaml"
    f.write_text(p.to_yaml())
    return f


def test_start_serve_survives_a_proxy_the_controller_restarted(monkeypatch, capsys):
    """A proxy killed by the controller's ready check (a busy machine) fails ``serve.start`` with
    ``ActorDiedError``; starting again attaches to the controller, which brings up another proxy."""
    from ray import serve
    from ray.exceptions import ActorDiedError

    from services.run import start_serve

    calls = []

    def flaky(http_options):
        calls.append(http_options)
        if len(calls) == 1:
            raise ActorDiedError()

    monkeypatch.setattr(serve, "start", flaky)
    start_serve("127.0.0.1", 8765)
    assert calls == [{"host": "127.0.0.1", "port": 8765}] * 2
    assert "restarted while starting (try 1/3)" in capsys.readouterr().err

    def dead(http_options):
        calls.append(http_options)
        raise ActorDiedError()

    calls.clear()
    monkeypatch.setattr(serve, "start", dead)
    with pytest.raises(ActorDiedError):
        start_serve("127.0.0.1", 8765, attempts=2)
    assert len(calls) == 2


def test_our_cluster_runs_serve_throughput_optimised_unless_the_environment_says_otherwise():
    """services.run.apply_ray_serve_env (issue #30): what a fresh process (a replica, the controller) reads from
    Serve's constants once the defaults are set; a value the user set wins; the RayService manifest says the same."""
    import os
    import subprocess
    import sys

    from services.run import RAY_SERVE_ENV_DEFAULTS, apply_ray_serve_env

    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in apply_ray_serve_env(env)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"

    code = ("from services.run import apply_ray_serve_env; apply_ray_serve_env(); "
            "from ray.serve._private import constants as c; "
            "print(c.RAY_SERVE_USE_GRPC_BY_DEFAULT, c.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, "
            "c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.RAY_SERVE_LOG_TO_STDERR)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    read = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True,
                          check=True).stdout.split()
    assert read == ["True", "False", "False", "True"]  # gRPC, user code on the loop; no direct ingress; stderr logs
    off = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert off[:2] == ["False", "True"]  # Serve's defaults when the user turns it off

    containers = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    found = {}

    def walk(x):
        if isinstance(x, dict):
            if x.get("name", "").startswith("RAY_SERVE_") and "value" in x:
                found[x["name"]] = x["value"]
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(containers)
    assert {k: found.get(k) for k in RAY_SERVE_ENV_DEFAULTS} == RAY_SERVE_ENV_DEFAULTS


def test_the_startup_line_names_the_serve_mode(monkeypatch):
    from services.run import _cluster_words

    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    assert _cluster_words(True, None, True) == "own local cluster, Serve throughput-optimised, direct ingress"
    assert _cluster_words(True, None) == "own local cluster, Serve throughput-optimised, through Serve's proxy"
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=0" in _cluster_words(True, None)
    assert _cluster_words(False, "ray://head:10001") == "cluster ray://head:10001"


def test_direct_ingress_serves_the_asked_port_with_one_ingress_replica_only():
    """services.run (issue #30): the ingress replica listens on --port itself when it is the only one (Serve reads
    the port range [MIN, MAX)); several or autoscaled ingress replicas keep Serve's proxy; the variables are set
    for ray.init only and the environment is put back after."""
    import os

    from ray.serve._private import node_port_manager

    from services.app import AppArgs, AutoscalingArgs, IngressDeploymentArgs
    from services.run import direct_ingress_env, one_ingress_replica, scoped_env

    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    lo, hi = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    pool = node_port_manager.PortAllocator(lo, hi, "http", "node")  # Serve's own allocator of replica ports
    assert pool.allocate("replica-1") == 8123
    with pytest.raises(node_port_manager.NoAvailablePortError):
        pool.allocate("replica-2")
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 1

    assert one_ingress_replica(AppArgs())
    assert not one_ingress_replica(AppArgs(ingress=IngressDeploymentArgs(num_replicas=2)))
    assert not one_ingress_replica(AppArgs(ingress=IngressDeploymentArgs(autoscaling=AutoscalingArgs(max_replicas=3))))
    assert one_ingress_replica(AppArgs(ingress=IngressDeploymentArgs(num_replicas=4, autoscaling=AutoscalingArgs())))

    before = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT")
    with scoped_env(env):
        assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8123"
    assert os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") == before
