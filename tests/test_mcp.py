"""``polymodal mcp`` (issue #24) through the official MCP SDK's own client (``mcp.ClientSession`` over
``stdio_client`` and ``streamable_http_client``).

- stdio, in-process pipeline: ``python -m polymodal.cli mcp --preset tiny`` spawned by the SDK's client.
- streamable HTTP, in front of a running service: ``polymodal mcp --url <tiny --no-ray host> --transport http``.
- cancellation: a slow stand-in decoder behind the in-process app; the client cancels its call and the decoder
  stops (its step count stops growing and the worker counts the item as cancelled).
- the Ray Serve host (slow): the same checks against ``polymodal serve``'s graph (the ``service`` fixture of
  tests/test_serve_ray.py).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from tests.local_server import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def astronaut_b64() -> str:
    """scikit-image's astronaut photo (512 x 512, Eileen Collins's face near the top) as base64 PNG."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _text(result) -> str:
    return " ".join(c.text for c in result.content if c.type == "text")


async def exercise(session: ClientSession) -> dict:
    """The issue's checks on one connected session; returns what it saw (for the caller's own asserts)."""
    await session.initialize()
    listed = {t.name: t for t in (await session.list_tools()).tools}
    assert {"generate_image", "generate_audio", "chat", "detect"} <= set(listed), sorted(listed)
    gen = listed["generate_image"].input_schema
    assert gen["type"] == "object" and "prompt" in gen["required"] and gen["properties"]["n"]["maximum"] == 8
    det = listed["detect"].input_schema
    assert "face" in str(det["properties"]["target"]) and det["properties"]["image"]["type"] == "string"
    assert "chat" in listed and "images" in listed["chat"].input_schema["properties"]

    # generate_image on tiny: a PNG (random weights: noise, but a real PNG of the preset's size)
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    r = await session.call_tool("generate_image", {"prompt": "a red circle", "seed": 3},
                                progress_callback=on_progress)
    assert not r.is_error, _text(r)
    images = [c for c in r.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    im = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert im.format == "PNG" and im.size[0] >= 8 and np.asarray(im).std() > 0
    assert r.structured_content["media"][0]["seed"] == 3
    assert seen and seen[0][2].startswith("generate_image"), seen  # at least the first progress notification

    # detect on astronaut(): a face box inside the 512 x 512 photo
    r = await session.call_tool("detect", {"image": astronaut_b64(), "target": "face"})
    assert not r.is_error, _text(r)
    boxes = r.structured_content["boxes"]
    assert len(boxes) >= 1, r.structured_content
    x1, y1, x2, y2 = boxes[0]["box_px"]
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512 and y2 < 300  # her face is in the upper half

    # bad arguments: tool errors with the reason, and the server keeps serving
    r = await session.call_tool("generate_image", {"prompt": "x", "n": 0})
    assert r.is_error and "n:" in _text(r), _text(r)
    r = await session.call_tool("detect", {"image": astronaut_b64(), "target": "unicorn"})
    assert r.is_error and "target" in _text(r) and "'face'" in _text(r), _text(r)  # the service's: field, choices
    r = await session.call_tool("detect", {"target": "face"})
    assert r.is_error and "image" in _text(r)
    r = await session.call_tool("generate_image", {"prompt": "x", "size": "33x33"})
    assert r.is_error and "size" in _text(r), _text(r)
    r = await session.call_tool("no_such_tool", {})
    assert r.is_error and "generate_image" in _text(r)

    # chat with an image in: text back (and the tool still works after the errors)
    r = await session.call_tool("chat", {"prompt": "what is this?", "images": [astronaut_b64()],
                                         "modalities": ["text"], "max_tokens": 4, "seed": 1})
    assert not r.is_error, _text(r)
    assert r.structured_content["finish_reason"] in ("stop", "length")
    return {"tools": listed, "progress": seen}


def test_tool_catalogue_and_content():
    """Without a transport: which tools a service gets, a skill's schema, inputs and the MCP content of media."""
    from polymodal.modality import Modality
    from services.mcp_tools import PolymodalTools, ToolError, content_part, media_block

    detect = {"name": "detect", "description": "find faces", "accepts": ["image"],
              "parameters": {"type": "object", "properties": {"target": {"enum": ["face", "eye"]}}}}
    generator_skill = {"name": "generate_image", "description": "the skill", "accepts": ["text"], "parameters": {}}
    tools = PolymodalTools(None, {"id": "m", "output_modalities": ["text", "image"]}, [detect, generator_skill])
    assert list(tools.defs) == ["generate_image", "chat", "detect"]  # no audio / video decoder: no such tools
    assert tools.defs["generate_image"].kind == "generate"  # the tool, not the skill of the same name
    props = tools.defs["detect"].input_schema["properties"]
    assert set(props) == {"target", "image", "images"} and props["images"]["type"] == "array"
    assert content_part(Modality.IMAGE, "aGVsbG8=", "image") == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    with pytest.raises(ToolError, match="data URL"):
        content_part(Modality.IMAGE, "/home/me/photo.png", "image")
    video = media_block(Modality.VIDEO, "data:video/mp4;base64,AAAA", uri="http://h/v1/artifacts/a.mp4")
    assert video.type == "resource" and video.resource.blob == "AAAA" and video.resource.mime_type == "video/mp4"
    assert media_block(Modality.AUDIO, "data:audio/wav;base64,AAAA").type == "audio"


def _env() -> dict[str, str]:
    keep = ("PATH", "HOME", "POLYMODAL_CACHE", "VIRTUAL_ENV", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return env


def test_stdio_in_process_pipeline():
    """The SDK's stdio client spawns `polymodal mcp --preset tiny` (the in-process pipeline)."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "polymodal.cli", "mcp", "--preset", "tiny"],
                                   cwd=str(ROOT), env=_env())

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            seen = await exercise(session)
            assert "generate_video" in seen["tools"]  # tiny renders video: the tool is listed
            r = await session.call_tool("generate_audio", {"prompt": "a beep", "duration_s": 0.5, "seed": 2})
            assert not r.is_error, _text(r)
            audio = [c for c in r.content if c.type == "audio"]
            assert audio and audio[0].mime_type == "audio/wav" and base64.b64decode(audio[0].data)[:4] == b"RIFF"
            r = await session.call_tool("generate_video", {"prompt": "a square moving", "seed": 4, "num_frames": 4})
            assert not r.is_error, _text(r)
            video = [c for c in r.content if c.type == "resource"]
            assert len(video) == 1 and video[0].resource.mime_type == "video/mp4"
            assert base64.b64decode(video[0].resource.blob)[4:8] == b"ftyp"  # an MP4
            assert "/v1/artifacts/" in video[0].resource.uri
            # chat, any-to-any: an image in, an image and a sound out
            r = await session.call_tool("chat", {"prompt": "draw it and make it sound", "images": [astronaut_b64()],
                                                 "modalities": ["image", "audio"], "seed": 1})
            assert not r.is_error, _text(r)
            assert [c.type for c in r.content] == ["text", "image", "audio"]
            assert "![image 1](" in r.content[0].text
            assert {m["type"] for m in r.structured_content["media"]} == {"image", "audio"}

    anyio.run(main)


class McpProcess:
    """`polymodal mcp ... --transport http` in a subprocess on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "polymodal.cli", "mcp", *args, "--transport", "http", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def wait_ready(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"polymodal mcp exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                httpx.get(self.url, timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        pytest.fail("polymodal mcp --transport http did not listen in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _run_over_http(url: str) -> dict:
    async def main():
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            return await exercise(session)

    return anyio.run(main)


def test_http_in_front_of_a_running_service(tiny_server, tmp_path):
    """Streamable HTTP, in front of a running polymodal (`polymodal serve --preset tiny --no-ray`) by URL; the
    README's client example (examples/mcp_client.py) against it."""
    server = McpProcess("--url", tiny_server + "/v1")
    try:
        server.wait_ready()
        _run_over_http(server.url)
        example = [sys.executable, "examples/mcp_client.py", "--url", server.url]
        r = subprocess.run([*example, "generate_image", '{"prompt": "a red circle", "seed": 5}', "--out",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
        assert Image.open(tmp_path / "01.png").format == "PNG"
        r = subprocess.run([*example, "detect", '{"target": "unicorn"}'], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1 and "detect reads images" in r.stdout, r.stdout + r.stderr
    finally:
        server.stop()


def test_unreachable_service_fails_at_start():
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "mcp", "--url", f"http://127.0.0.1:{free_port()}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot reach polymodal at http://127.0.0.1"), r.stderr
    assert "Traceback" not in r.stderr  # a clear error, not a stack
    assert time.monotonic() - t0 < 30
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "mcp", "--url", "http://x", "--preset", "tiny"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "exactly one of --url" in r.stderr


def _fake_app(step_s: float = 0.0, **settings):
    """The ingress app over stand-in stages (tests/serve_fakes.py: image decoder only) and its backend."""
    from polymodal.modality import Modality
    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from tests.serve_fakes import fake_stages

    preset, llm, decoders = fake_stages((Modality.IMAGE,), step_s=step_s)
    backend = LocalBackend(preset, llm, decoders)
    return build_app(backend, ServerSettings(**settings)), backend, decoders[Modality.IMAGE]


def test_api_key_from_the_environment():
    """A keyed service: the first key of POLYMODAL_API_KEYS (what `polymodal serve` reads) is sent; a wrong
    POLYMODAL_API_KEY stops the command at start."""
    from tests.local_server import serve_app

    app, backend, _ = _fake_app(api_keys=("sekret",))
    urls = serve_app(app)
    url = next(urls)
    try:
        r = subprocess.run([sys.executable, "-m", "polymodal.cli", "mcp", "--url", url],
                           cwd=ROOT, env={**_env(), "POLYMODAL_API_KEY": "wrong"}, capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "refused the API key" in r.stderr and "Traceback" not in r.stderr, r.stderr
        server = McpProcess("--url", url, env={"POLYMODAL_API_KEYS": "sekret,other"})
        try:
            server.wait_ready()

            async def main():
                async with streamable_http_client(server.url) as (read, write), \
                        ClientSession(read, write) as session:
                    await session.initialize()
                    r = await session.call_tool("generate_image", {"prompt": "a dot", "seed": 1})
                    assert not r.is_error, _text(r)
                    assert [c.mime_type for c in r.content if c.type == "image"] == ["image/png"]

            anyio.run(main)
        finally:
            server.stop()
    finally:
        next(urls, None)
        anyio.run(backend.close)


async def _cancel_midway(mcp_url: str, backend, stage) -> None:
    """Start a slow generate_image (100 steps of 0.1 s), cancel it once the decoder runs, and check downstream: the
    decoder stops and its worker counts the item cancelled, long before the 100 steps; the server still serves."""
    async with streamable_http_client(mcp_url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        async with anyio.create_task_group() as tg:
            async def call():
                await session.call_tool("generate_image", {"prompt": "slow", "num_inference_steps": 100})

            tg.start_soon(call)
            with anyio.fail_after(30):
                while stage.steps < 3:  # the render is running
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled for the abandoned request
        with anyio.fail_after(10):
            while (await backend.stats())["image"]["cancelled"] < 1:
                await anyio.sleep(0.05)
        steps = stage.steps
        await anyio.sleep(0.5)
        assert stage.steps == steps < 60
        r = await session.call_tool("generate_image", {"prompt": "quick", "num_inference_steps": 1})
        assert not r.is_error, _text(r)


@pytest.mark.parametrize("mode", ["in-process", "url"])
def test_cancelled_call_stops_its_work(mode):
    """A call the client cancels stops its work downstream, not just the client's wait: in front of the in-process
    app (the task is cancelled through ASGI) and of a service by URL (the HTTP request is closed; the ingress sees
    the client gone)."""
    import httpx

    from services.mcp_server import IN_PROCESS_BASE_URL, http_app
    from services.mcp_tools import PolymodalTools
    from tests.local_server import serve_app

    app, backend, stage = _fake_app(step_s=0.1)
    if mode == "in-process":
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=IN_PROCESS_BASE_URL)
        servers = serve_app(http_app(anyio.run(PolymodalTools.connect, http)))
        mcp_url, proc = next(servers) + "/mcp", None
    else:
        servers = serve_app(app)
        proc = McpProcess("--url", next(servers))
        proc.wait_ready()
        mcp_url = proc.url
    try:
        anyio.run(_cancel_midway, mcp_url, backend, stage)
    finally:
        if proc is not None:
            proc.stop()
        next(servers, None)
        anyio.run(backend.close)


@pytest.mark.slow
def test_ray_serve_host(service):
    """The same server in front of the Ray Serve graph (tests/test_serve_ray.py's `service`: tiny, image and audio
    decoders, the skills-cpu deployment)."""
    server = McpProcess("--url", service.url)
    try:
        server.wait_ready()
        seen = _run_over_http(server.url)
        assert "generate_video" not in seen["tools"]  # no video decoder deployed there: no video tool
    finally:
        server.stop()


from tests.test_serve_ray import service  # noqa: E402,F401 - the Ray host fixture (module scope, started on demand)
