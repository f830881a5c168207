"""A real ``polymodal serve --no-ray`` host (``services.run.serve_main`` under uvicorn, in a thread of the test
process) on a free loopback port, for tests that use real HTTP clients (tests/test_clients.py, tests/test_readme.py).

The session fixtures of tests/conftest.py start one per preset, the first time a test asks for it, and stop it at
the end of the session.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(preset: str, start_timeout_s: float = 240.0, api_keys: tuple[str, ...] = ()) -> Iterator[str]:
    """Start ``preset`` in this process (``api_keys``: the keys it requires, none by default); yields its base URL
    (``http://127.0.0.1:PORT``); stops it after."""
    from services.run import serve_main

    port = free_port()
    stop = threading.Event()
    out = io.StringIO()
    result: dict = {}

    def run() -> None:
        try:
            result["rc"] = serve_main(preset, host="127.0.0.1", port=port, no_ray=True, api_keys=api_keys,
                                      stop_event=stop, out=out)
        except BaseException as e:  # noqa: BLE001 - reported by the fixture
            result["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"serve-{preset}")
    t.start()
    deadline = time.monotonic() + start_timeout_s
    while "serving preset" not in out.getvalue():
        if "error" in result:
            pytest.fail(f"polymodal serve --preset {preset} --no-ray did not start: {result['error']!r}")
        if not t.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"polymodal serve --preset {preset} --no-ray did not start: {out.getvalue()}")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    stop.set()
    t.join(60)


def serve_app(app, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve a built FastAPI ``app`` (e.g. ``build_app`` over a ``LocalBackend`` with stand-in stages) under uvicorn
    in a thread on a free loopback port; yields its base URL; stops it after."""
    import asyncio

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None
    t = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True, name="serve-app")
    t.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            pytest.fail("the app did not start under uvicorn")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(30)
