"""The service image end to end: build it as the README says, run it, talk to it, stop it.

Needs a Docker engine (skipped with the reason otherwise; ``.ci/run`` starts one through
``../shared/tools/docker-engine.sh`` where the workplace has it). The image is built with
``docker build --network host`` from the repository (torch from ``wheels/``, filled here from pip's find-links
when empty) and run with the default preset (``toy``), ``--shm-size=2g`` and a named cache volume
(``polymodal-test-cache``, kept between runs so later starts skip the GGUF dequantisation). Layers are cached by
the engine: a rebuild after a source change takes well under a minute (the legacy builder keeps the builder
stage's cache as untagged images: ``docker image prune`` drops it and the next build takes minutes again).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TAG = "polymodal:test"
CACHE_VOLUME = "polymodal-test-cache"
ENGINE_SCRIPT = ROOT.parent / "shared" / "tools" / "docker-engine.sh"
BUILD_TIMEOUT_S = 1800
READY_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_HOST" not in env and ENGINE_SCRIPT.is_file():  # the workplace's private engine, if it runs
        out = subprocess.run(["bash", str(ENGINE_SCRIPT), "env"], capture_output=True, text=True).stdout
        m = re.search(r"DOCKER_HOST=(\S+)", out)
        if m:
            env["DOCKER_HOST"] = m.group(1)
    return env


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=_env())
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def engine():
    if shutil.which("docker") is None:
        pytest.skip("no Docker engine reachable: the docker CLI is not installed")
    r = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no Docker engine reachable (DOCKER_HOST={_env().get('DOCKER_HOST', 'default')}): "
                    f"{r.stderr.strip()[:200]}")
    return r.stdout.strip()


def _torch_wheel() -> Path:
    """The CPU torch wheel of the Dockerfile's TORCH_VERSION in wheels/ (pip download from find-links if absent)."""
    version = re.search(r"^ARG TORCH_VERSION=(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    wheels = ROOT / "wheels"
    found = sorted(wheels.glob(f"torch-{version}[+-]*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-d", str(wheels)],
                       check=True, capture_output=True, timeout=900)
        found = sorted(wheels.glob(f"torch-{version}[+-]*.whl"))
    assert found, f"pip download torch=={version} left no wheel in {wheels}"
    if "+cpu" not in found[0].name:
        found[0].unlink()
        pytest.fail(f"pip download gave a non-CPU torch ({found[0].name}); put the CPU wheel in wheels/ "
                    "(pip download ... --index-url https://download.pytorch.org/whl/cpu)")
    return found[0]


@pytest.fixture(scope="module")
def image(engine):
    _torch_wheel()
    t0 = time.monotonic()
    docker("build", "--network", "host", "-t", TAG, str(ROOT), timeout=BUILD_TIMEOUT_S)
    print(f"docker build: {time.monotonic() - t0:.0f} s")
    return TAG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def container(image):
    import httpx

    name = f"polymodal-test-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    docker("run", "-d", "--name", name, "--shm-size=2g", "-p", f"127.0.0.1:{port}:8000",
           "-v", f"{CACHE_VOLUME}:/cache", "--health-interval=5s", image)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        t0 = time.monotonic()
        while True:
            state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
            if not state["Running"]:
                raise AssertionError(f"container exited ({state['ExitCode']}):\n{docker('logs', name).stderr[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{docker('logs', name).stderr[-4000:]}")
            time.sleep(2)
        print(f"ready after {time.monotonic() - t0:.0f} s")
        yield name, f"http://127.0.0.1:{port}"
        stop = docker("stop", "-t", "30", name, check=False, timeout=60)
        assert stop.returncode == 0
        assert json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)["ExitCode"] == 0, \
            "polymodal serve did not shut down cleanly on SIGTERM"
    finally:
        docker("rm", "-f", name, check=False)


def _photo_data_url() -> str:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_a_photo_returns_a_png(container):
    import httpx
    from PIL import Image

    _, url = container
    body = {
        "model": "toy",
        "modalities": ["image"],
        "max_tokens": 16,
        "seed": 3,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Here is a photo. Draw a picture in the same style."},
            {"type": "image_url", "image_url": {"url": _photo_data_url()}},
        ]}],
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text[:2000]
    message = r.json()["choices"][0]["message"]
    # the answer's shape (issue #20): content is text with a reference; the media in message.images
    assert isinstance(message["content"], str) and "![image 1](" in message["content"], message["content"]
    images = message["images"]
    assert len(images) >= 1 and images[0]["type"] == "image_url"
    head, _, b64 = images[0]["image_url"]["url"].partition(",")
    assert head == "data:image/png;base64"
    png = base64.b64decode(b64)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png))
    im.load()  # decodes the whole file
    assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_the_image_speaks_and_hears(container):
    """/v1/audio/speech (flite in the image, through the Ray graph's speech deployment) -> a WAV that
    /v1/audio/transcriptions (pocketsphinx) reads back."""
    import httpx

    _, url = container
    said = "I would like a cup of coffee please"
    r = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": said + "."},
                   timeout=120)
    assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text[:500]
    t = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "whisper-1"},
                   files={"file": ("speech.wav", r.content, "audio/wav")}, timeout=120)
    assert t.status_code == 200, t.text[:500]
    assert len(set(t.json()["text"].split()) & set(said.lower().split())) >= 6, t.json()


def test_runs_as_non_root(container):
    name, _ = container
    assert docker("exec", name, "id", "-u").stdout.strip() != "0"
    # every process of the container, the server and Ray's included
    uids = docker("exec", name, "sh", "-c", "for p in /proc/[0-9]*; do stat -c %u $p 2>/dev/null; done").stdout.split()
    assert uids and "0" not in uids, f"root processes in the container: {uids}"


def test_docker_reports_healthy(container):
    name, _ = container
    hc = json.loads(docker("inspect", "-f", "{{json .Config.Healthcheck}}", name).stdout)
    assert hc["Test"][-1] == "polymodal-healthcheck"
    assert hc["StartPeriod"] >= 300 * 10**9, "the start period must allow multi-minute model loads"
    deadline = time.monotonic() + 120
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        if status == "healthy":
            break
        time.sleep(2)
    assert status == "healthy"


def test_cpu_image_has_no_nvidia_packages(container):
    name, _ = container
    freeze = docker("exec", name, "pip", "list", "--format=freeze").stdout.lower().splitlines()
    assert any(line.startswith("ray==") for line in freeze), "pip list must see the image's packages"
    assert not [line for line in freeze if line.startswith("nvidia-")]
    torch_line = next(line for line in freeze if line.startswith("torch=="))
    assert "+cpu" in torch_line


def test_enough_shared_memory_gives_no_warning(container):
    name, _ = container
    logs = docker("logs", name).stderr + docker("logs", name).stdout
    assert "--shm-size" not in logs


# Run inside the image (no server): the skills' packaged models are there and work. No scikit-image in the image:
# a line of text and a disc drawn with Pillow.
_SKILLS_IN_IMAGE = """
import cv2, numpy as np
from PIL import Image, ImageDraw, ImageFont
from skills import build_skill, images, mask_iou
assert int(cv2.__version__.split(".")[0]) < 5, cv2.__version__
im = Image.new("RGB", (320, 160), (230, 230, 230))
d = ImageDraw.Draw(im)
d.text((20, 20), "HELLO SKILLS", font=ImageFont.load_default(size=32), fill=(0, 0, 0))
d.ellipse((200, 80, 259, 139), fill=(200, 30, 30))
a = np.asarray(im)
ocr = build_skill("ocr").run({}, images(a))
assert "HELLOSKILLS" in ocr.data["text"].replace(" ", ""), ocr.text
m = Image.new("L", (320, 160)); ImageDraw.Draw(m).ellipse((200, 80, 259, 139), fill=1)
seg = build_skill("segment").run({"box_px": [200, 80, 260, 140]}, images(a))
assert mask_iou(seg.masks[0].to_array(), np.asarray(m) > 0) > 0.9, seg.text
det = build_skill("detect").run({"target": "cat_face"}, images(a))
assert det.ok, det.error
print("skills ok:", cv2.__version__, ocr.data["text"])
"""


def test_skills_run_in_the_image(image):
    r = docker("run", "--rm", "--entrypoint", "python", image, "-c", _SKILLS_IN_IMAGE, timeout=300)
    assert "skills ok:" in r.stdout, r.stdout + r.stderr


def test_small_shared_memory_warns_at_start(image):
    name = f"polymodal-test-shm-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--shm-size=64m", image, "--preset", "tiny")
    try:
        deadline = time.monotonic() + 60
        logs = ""
        while time.monotonic() < deadline and "--shm-size" not in logs:
            r = docker("logs", name)
            logs = r.stdout + r.stderr
            time.sleep(1)
        assert "WARNING" in logs and "--shm-size=2g" in logs and "64 MiB" in logs, logs[-2000:]
    finally:
        docker("rm", "-f", name, check=False)
