"""``polymodal serve``: start the service and run until Ctrl-C / SIGTERM.

- Default (Ray Serve): starts its **own** local Ray cluster (``ray.init(address="local")`` with its own temp
  dir, so it never joins or stops another cluster on the machine; Ray's token auth stays as Ray sets it),
  deploys the graph of :mod:`services.app`, prints the URL and waits. With one ingress replica (the default) that
  replica answers HTTP on ``host:port`` itself (Serve's direct ingress, :func:`direct_ingress_env`; Serve keeps
  its head-node proxy on a free port beside it); with more, Serve's HTTP proxy takes ``host:port`` and balances
  them. ``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` keeps the proxy in any case. On exit it deletes the app and shuts
  its cluster down (never ``ray stop``).
- ``address``: attach to an existing cluster instead; on exit only this app is deleted. The cluster's
  Serve HTTP options (host/port) win if Serve already runs there.
- ``no_ray``: one process under uvicorn with the in-process pipeline (:class:`services.local.LocalBackend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

APP_NAME = "polymodal"

# What our own cluster runs Serve with unless the environment says otherwise (issue #30): Ray Serve's own
# throughput-optimised mode (gRPC between replicas, the router and user code on the replica's event loop, GC frozen
# after start). Graph overhead per text+image request on the `bench` preset, p50 of 3 alternating full runs of
# `bench/overhead.py` each (2 cores): Serve's defaults 52.7 / 57.3 / 65.9 ms, this mode 45.0 / 52.9 / 45.9 ms.
# Our replicas already run every blocking call (LLM, decoders, speech, skills, payload encoding) in executors, which
# that mode's single loop needs. Two of its parts are set apart: direct ingress is off here (for a cluster we attach
# to, whose port ranges we do not know) and turned on for our own cluster with one ingress replica, on the port asked
# for (:func:`direct_ingress_env`); and its quiet stderr is turned back, since at Serve's WARNING level nothing is
# logged per request and warnings should reach the terminal. ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` restores Serve's
# defaults; any of these set in the environment wins.
RAY_SERVE_ENV_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_LOG_TO_STDERR": "1",
                          "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct ingress on ``port`` (what ``polymodal serve`` runs its own cluster with when the graph has
    one ingress replica): that replica answers HTTP itself, on ``port``, with no proxy in front (Ray 2.60's
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS``; the replica's port range narrowed to the one asked for), and a stop drains
    for 1 s instead of Serve's 30 s and its port is free for a replacement at once (nothing external balances
    across replicas here). Issue #30: the proxy's hop was ~12 ms of the graph's overhead per text+image request
    (README "Performance")."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            # a freed port is held back for HAProxy's stale server lists by default (minutes): with no HAProxy, a
            # replacement ingress replica takes the port at once
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def one_ingress_replica(args) -> bool:
    """Whether ``args`` (:class:`services.app.AppArgs`) runs exactly one ingress replica: direct ingress binds one
    port per replica, so more replicas (or autoscaling beyond one) keep Serve's proxy in front."""
    scaling = args.ingress.autoscaling
    return scaling.max_replicas == 1 if scaling is not None else args.ingress.num_replicas == 1


def own_cluster_serve_env(port: int, one_ingress: bool) -> tuple[bool, dict[str, str]]:
    """Before ``ray.init`` of our own cluster: :func:`apply_ray_serve_env`, and whether the ingress replica serves
    ``port`` directly (``one_ingress`` and not turned off by ``RAY_SERVE_ENABLE_DIRECT_INGRESS=0``; the user's
    ``=1`` wins too) -> (direct, the variables to set around ``ray.init`` only: :func:`scoped_env`)."""
    wanted = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")
    direct = wanted == "1" if wanted is not None else one_ingress
    # the cluster's processes inherit the environment (this process has imported Serve already; it only deploys
    # and reads none of these)
    apply_ray_serve_env()
    if not direct:
        return False, {}
    # the port asked for, unless the user set the range themselves
    return True, {k: v for k, v in direct_ingress_env(port).items()
                  if k == "RAY_SERVE_ENABLE_DIRECT_INGRESS" or k not in os.environ}


@contextlib.contextmanager
def scoped_env(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` for the ``with`` block only, then put back what was there (``ray.init`` of
    our own cluster: its processes inherit the environment when they start; later clusters of this process must
    not, e.g. one port's direct ingress)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def apply_ray_serve_env(environ: dict | None = None) -> dict[str, str]:
    """Set :data:`RAY_SERVE_ENV_DEFAULTS` in ``environ`` (default ``os.environ``) where unset -> what was set.

    Call before ``ray.init`` of a cluster we start: the raylet, Serve's controller, proxy and replicas inherit the
    driver's environment and read these when they import Serve. An attached cluster (``--address``) keeps its own
    settings (set them in its ``runtime_env`` / RayService ``env``, see ``deploy/``).
    """
    environ = os.environ if environ is None else environ
    applied = {k: v for k, v in RAY_SERVE_ENV_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied


def _cluster_words(own_cluster: bool, address: str | None, direct: bool = False) -> str:
    """How the startup line names the cluster and the Serve mode it runs (:data:`RAY_SERVE_ENV_DEFAULTS`,
    :func:`direct_ingress_env`)."""
    if not own_cluster:
        return f"cluster {address}"
    on = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1"  # as Serve reads it (get_env_bool)
    mode = "throughput-optimised" if on else "defaults: RAY_SERVE_THROUGHPUT_OPTIMIZED=0"
    return f"own local cluster, Serve {mode}, " + ("direct ingress" if direct else "through Serve's proxy")


def _settings(base: Any, **updates: Any):
    from services.settings import ServerSettings

    s = ServerSettings.model_validate(base or {})
    return s.model_copy(update={k: v for k, v in updates.items() if v is not None})


def serve_main(
    preset: str = "toy",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    no_ray: bool = False,
    api_keys: Sequence[str] = (),
    device: str | None = None,
    export_dir: str | None = None,
    modalities: Sequence[str] | None = None,
    num_cpus: int | None = None,
    store_dir: str | None = None,
    request_timeout_s: float | None = None,
    brain: Any = None,
    toy_skills: bool = False,
    app_args: Any = None,
    stop_event: threading.Event | None = None,
    out=None,
) -> int:
    """Start the service and block until SIGINT / SIGTERM (or ``stop_event``).

    Args:
        preset: preset name or YAML path (``toy``, the toy world's trained preset, is the default).
        host, port: where the HTTP API listens.
        address: an existing Ray cluster to attach to (``None``: start our own).
        no_ray: serve in this process under uvicorn instead.
        api_keys: if given, ``/v1/*`` requires one of them as a Bearer token.
        device: torch device of the model parts.
        export_dir: an export of trained parts (:mod:`polymodal.export`).
        modalities: output modalities to deploy (default: all of the preset's).
        num_cpus: CPUs of our own Ray cluster (default: all).
        store_dir: artifact / video-job store folder (default: a temp dir removed on exit).
        request_timeout_s: per-request timeout.
        brain: an external OpenAI-compatible brain (:class:`services.settings.BrainConfig` or its dict; zero-shot
            skill use, :mod:`services.brain`) that answers chats with the server's skills and decoders as tools.
        toy_skills: also deploy the toy world's ``locate`` / ``count`` (``skills-toy``, :mod:`skills.toy`); on for a
            preset whose model was trained to call them (``toy-skills``: :data:`polymodal.presets.PRESET_SKILLS`).
        app_args: a full :class:`services.app.AppArgs` (dict or model); the arguments above override it.
        stop_event: set it to stop (tests / embedding); signals are only handled in the main thread.
        out: stream for the URL line (default stdout).

    Returns:
        Process exit status (0).

    Raises:
        polymodal.preflight.StartupError: a path that is missing or unusable (before anything starts).
        ValueError: unknown preset or modality. The stages' load errors.
    """
    from polymodal.preflight import check_start
    from services.app import AppArgs

    out = out or sys.stdout
    args = AppArgs.model_validate(app_args or {}) if not isinstance(app_args, AppArgs) else app_args
    updates: dict[str, Any] = {"preset": preset}
    if device is not None:
        updates["device"] = device
    if export_dir is not None:
        updates["export_dir"] = export_dir
    if modalities is not None:
        from polymodal.modality import Modality

        updates["modalities"] = Modality.parse_list(list(modalities))
    if not toy_skills and isinstance(preset, str):
        from polymodal.presets import PRESET_SKILLS

        toy_skills = bool(PRESET_SKILLS.get(preset))  # toy-skills: its model calls the toy skills
    if toy_skills:
        from services.app import SkillDeploymentArgs
        from services.skill_host import SKILL_DEPLOYMENTS

        updates["skills"] = {**args.skills, "skills-toy": SkillDeploymentArgs(
            skills=list(SKILL_DEPLOYMENTS["skills-toy"]), num_cpus=0.05)}
    args = args.model_copy(update=updates)
    # every path first: a wrong one stops here, within seconds, before a cluster starts or anything is deployed
    check_start(args.preset, export_dir=args.export_dir, modalities=args.modalities)
    own_store = store_dir is None and args.server.store_dir is None
    store = store_dir or args.server.store_dir or tempfile.mkdtemp(prefix="polymodal-store-")
    if brain is not None:
        from services.settings import BrainConfig

        brain = BrainConfig.model_validate(brain) if not isinstance(brain, BrainConfig) else brain
    server = _settings(args.server, store_dir=store, request_timeout_s=request_timeout_s,
                       api_keys=tuple(api_keys) if api_keys else None, brain=brain)
    args = args.model_copy(update={"server": server})
    if address is None or no_ray:
        _check_port_free(host, port)
    stop = stop_event or threading.Event()
    restore = _install_signal_handlers(stop)
    try:
        if no_ray:
            return _serve_local(args, host, port, stop, out)
        return _serve_ray(args, host, port, address, num_cpus, stop, out,
                          rearm=lambda: _install_signal_handlers(stop))
    finally:
        restore()
        if own_store:
            shutil.rmtree(store, ignore_errors=True)


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start on a port something already listens on (two proxies on one port would split
    requests between two models, and between keyed and unkeyed servers).

    Raises:
        ValueError: the port is taken, naming it.
    """
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        if sock.connect_ex((target, port)) == 0:
            raise ValueError(f"port {port} on {host} is already in use (another polymodal serve?); "
                             f"stop it or pass --port")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _install_signal_handlers(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    for s in previous:
        signal.signal(s, handler)

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def local_backend(args):
    """The in-process backend of ``--no-ray`` (and ``polymodal mcp --preset``) for ``args``
    (:class:`services.app.AppArgs`): its preset's stages, speech when enabled, every placed skill in this process
    and the generators (free here: they use the decoder stages).

    Raises:
        ValueError: unknown preset or modality. The stages' load errors.
    """
    from services.local import LocalBackend
    from services.skill_host import SKILL_DEPLOYMENTS

    skills = list(dict.fromkeys([*(n for d in args.skills.values() for n in d.skills),
                                 *SKILL_DEPLOYMENTS["skills-generate"]]))
    return LocalBackend.from_preset(args.preset, device=args.device, export_dir=args.export_dir,
                                    modalities=args.modalities,
                                    speech=args.speech.speech_config() if args.speech.enabled else None,
                                    skills=skills, object_detector_path=args.object_detector_path)


def _serve_local(args, host: str, port: int, stop: threading.Event, out) -> int:
    import uvicorn

    from services.ingress import build_app

    backend = local_backend(args)
    app = build_app(backend, args.server)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # ours set `stop`

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"polymodal: serving preset {backend.preset.name!r} (in-process) at http://{host}:{port}/v1 "
                  "- Ctrl-C to stop", file=out, flush=True)
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.1)
        server.should_exit = True
        await task
        await backend.close()

    asyncio.run(main())
    return 0


def start_serve(host: str, port: int, attempts: int = 3) -> None:
    """``serve.start`` with Serve's HTTP proxy on ``host:port``, surviving a busy machine.

    Under CPU load the Serve controller's own ready check of a new proxy (``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``,
    5 s by default) can time out; the controller then kills that proxy and starts another, but ``serve.start``
    is still waiting on the first one and raises ``ActorDiedError`` ("ProxyActor ... cancelled before it
    started running"). The controller is up by then, so starting again attaches to it (Serve logs
    "Connecting to existing Serve app") while it brings the replacement proxy up; callers wait for the HTTP
    route (``/ready``) anyway.

    Raises:
        ray.exceptions.ActorDiedError: still failing after ``attempts`` tries.
    """
    from ray import serve
    from ray.exceptions import ActorDiedError

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options={"host": host, "port": port})
            return
        except ActorDiedError as e:
            if attempt == attempts:
                raise
            print(f"polymodal: Serve's HTTP proxy was restarted while starting (try {attempt}/{attempts}): "
                  f"{str(e).splitlines()[0]}", file=sys.stderr, flush=True)


def _serve_ray(args, host: str, port: int, address: str | None, num_cpus: int | None, stop: threading.Event,
               out, rearm=lambda: None) -> int:
    own_cluster = address is None
    direct, direct_env = own_cluster_serve_env(port, one_ingress_replica(args)) if own_cluster else (False, {})
    import ray
    from ray import serve

    from services.app import app_builder

    temp_dir = None
    if own_cluster:
        # A short path: Ray's unix socket paths must stay under ~107 characters.
        temp_dir = tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        with scoped_env(direct_env):
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _temp_dir=temp_dir,
                     include_dashboard=False, namespace=APP_NAME, configure_logging=True, logging_level="warning")
    else:
        ray.init(address=address, namespace=APP_NAME)
    rearm()  # ray.init installs its own SIGTERM handler (exit without cleanup); ours sets `stop` instead
    try:
        # direct ingress: the ingress replica listens on `port` itself; Serve still keeps a proxy on the head node
        # (its fallback route), which then takes a free port
        start_serve(host, free_port(host) if direct else port)
        # Serve's driver-side "Application ... is ready at <the proxy's URL>" would name that fallback port; the
        # line below names the one to use
        serve_log = logging.getLogger("ray.serve")
        level = serve_log.level
        if direct:
            serve_log.setLevel(max(logging.WARNING, serve_log.getEffectiveLevel()))
        try:
            serve.run(app_builder(args), name=APP_NAME, route_prefix="/", blocking=False,
                      logging_config={"log_level": os.environ.get("POLYMODAL_SERVE_LOG_LEVEL", "WARNING")})
        finally:
            serve_log.setLevel(level)
        print(f"polymodal: serving preset {args.preset!r} on Ray Serve at http://{host}:{port}/v1 "
              f"({_cluster_words(own_cluster, address, direct)}) - Ctrl-C to stop",
              file=out, flush=True)
        while not stop.wait(0.5):
            pass
        print("polymodal: stopping", file=out, flush=True)
    finally:
        _stop_serve(serve, own_cluster)
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def _stop_serve(serve, own_cluster: bool, timeout_s: float = 15.0) -> None:
    """Delete our app (attached) or shut Serve down (own cluster), giving up after ``timeout_s``: when the
    signal also reached Ray's own processes (Ctrl-C goes to the whole process group) the controller may be
    gone already, and ``ray.shutdown`` cleans up what is left."""

    def stop() -> None:
        try:
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            print(f"polymodal: stopping Serve: {e}", file=sys.stderr)

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    t.join(timeout_s)
