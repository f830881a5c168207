"""The quick parts of ``bench/reliability.py`` as slow tests (each in its own subprocess, as the bench runs them):
schemathesis over ``/openapi.json`` of the ``--no-ray`` host with no unexpected 5xx, a restart that keeps the
store, and one of two image-decoder replicas killed mid-request on a real Ray cluster costing no request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str, timeout: float = 900) -> dict:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "bench/reliability.py", "--quick", "--out", str(out), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(out.read_text())["sections"]


def test_fuzz_no_unexpected_5xx(tmp_path):
    pytest.importorskip("schemathesis", reason="the `reliability` extra (pip install -e '.[reliability]')")
    f = _bench(tmp_path, "--only", "fuzz")["fuzz"]
    assert f["cases"] >= 300 and f["seed"] == 21
    assert f["unexpected_5xx"] == 0, f["unexpected_examples"]
    assert f["statuses"].get("2xx", 0) > 0 and f["statuses"].get("4xx", 0) > 0


def test_restart_keeps_artifacts_and_jobs(tmp_path):
    r = _bench(tmp_path, "--only", "restart")["restart"]
    assert r["artifacts"] >= 1 and r["artifacts_kept"] == r["artifacts"]
    assert r["video_job_status_after"] == "completed" and r["video_mp4_same"] and r["exit_codes"] == [0, 0]


def test_a_killed_image_replica_costs_no_request(tmp_path):
    k = _bench(tmp_path, "--only", "kill", "--preset", "tiny", "--image-steps", "100", "--n", "32",
               "--warmup", "2")["kill"]
    assert k["image_replicas_before"] == 2 and k["killed"]
    assert k["renders_retried"] >= 1  # the kill hit renders in flight
    assert k["failed_by_the_kill"] == 0 and k["lost"] == 0 and k["duplicate_ids"] == 0
    assert k["timeout_504_after_admission"] == 0 and k["other_errors"] == 0
    assert k["answered"] + k["refused_503"] == k["requests"] and k["answered"] > 0
