"""The chat page against the Ray Serve host (``polymodal serve --preset toy``: its own local Ray cluster, as
``make serve`` runs it), in headless Chromium: the page loads from the Serve proxy, streams the text, then the image,
and the image is red. The browser: tests/page_browser.py (skips without Chromium, fails under ``CI=true``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.local_server import free_port
from tests.page_browser import browser_fixture, require_browser
from tests.test_page import _red_share

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
APP_ARGS = {  # the toy graph with its image decoder only (what this test asks for), fractional CPUs for 2 cores
    "preset": "toy", "modalities": ["image"],
    "llm": {"num_cpus": 0.3}, "decoders": {"image": {"num_cpus": 0.2}}, "ingress": {"num_cpus": 0.1},
}


@pytest.fixture(scope="module")
def ray_toy(tmp_path_factory):
    require_browser()  # before a cluster is started for nothing
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    (tmp / "args.json").write_text(json.dumps(APP_ARGS))
    log = tmp / "serve.log"
    code = ("import json, sys; from services.run import serve_main; "
            f"sys.exit(serve_main('toy', host='127.0.0.1', port={port}, num_cpus=2, "
            f"app_args=json.load(open({str(tmp / 'args.json')!r}))))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the service did not start (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
            if "serving preset" in log.read_text():
                try:
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
                proc.wait(30)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = Path(os.environ["POLYMODAL_PAGE_SHOTS"]) if os.environ.get("POLYMODAL_PAGE_SHOTS") else \
        tmp_path_factory.mktemp("page-screenshots")
    yield from browser_fixture(path)


def test_page_on_the_ray_serve_host_draws_a_red_circle(ray_toy, page):
    page.open(ray_toy)
    assert page.js("return document.getElementById('model-name').textContent") == "toy"
    assert page.js("return [...document.querySelectorAll('#output-boxes input')].map(i => i.value)") == ["image"]
    page.type_and_send("Please draw a red circle.")  # a bare order gets the image alone (tests/test_page.py)
    assert page.wait_answer(1, timeout_s=300) == "done"
    page.shot("11-ray-serve-red-circle")
    order = page.js("""
        const a = document.querySelector('.msg.assistant');
        const text = a.querySelector('.body .text'), fig = a.querySelector('.body figure.medium-image');
        return {text: text.textContent, following: !!(text.compareDocumentPosition(fig) & Node.DOCUMENT_POSITION_FOLLOWING)};""")
    assert "circle" in order["text"].lower() and order["following"]
    px = _red_share(page, ".msg.assistant .medium-image img")
    assert px["coloured"] >= 0.1 * px["w"] * px["h"] and px["red"] >= 0.8 * px["coloured"], px
