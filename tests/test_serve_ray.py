"""End to end on a real local Ray cluster with the ``tiny`` preset, over HTTP and the official ``openai`` client.

One cluster for the module: ``services.run.serve_main`` runs in a subprocess (its own Ray cluster in its own
temp dir, fractional CPUs), and the last test stops it with SIGTERM and checks it shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from polymodal.presets import get_preset
from tests.media_fixtures import photo_png

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
PRESET = get_preset("tiny")

APP_ARGS = {
    "preset": "tiny",
    "modalities": ["image", "audio"],  # no video decoder: a video request must be refused
    "llm": {"num_cpus": 0.3, "max_ongoing_requests": 4, "max_queued_requests": 16},
    "decoders": {
        "image": {"num_cpus": 0.2, "max_batch_size": 8, "batch_wait_timeout_s": 0.3},
        "audio": {"num_cpus": 0.2, "max_batch_size": 8, "batch_wait_timeout_s": 0.3},
    },
    "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 200},
    "server": {"request_timeout_s": 120, "max_concurrent_requests": 100,
               "limits": {"max_inference_steps": 200, "max_body_bytes": 2 * 1024 * 1024}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def metric(self, name: str, modality: str = "image") -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        m = re.search(rf'^{name}{{modality="{modality}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    (tmp / "args.json").write_text(json.dumps(APP_ARGS))
    log = tmp / "serve.log"
    code = ("import json, sys; from services.run import serve_main; "
            f"sys.exit(serve_main('tiny', host='127.0.0.1', port={port}, num_cpus=2, "
            f"app_args=json.load(open({str(tmp / 'args.json')!r}))))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while "serving preset" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the service did not start (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Service(proc, f"http://127.0.0.1:{port}", log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
                proc.wait(30)


def _openai(service):
    import openai

    return openai.OpenAI(base_url=service.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_ready_and_models(service):
    r = httpx.get(service.url + "/ready", timeout=60)
    assert r.status_code == 200, r.text
    parts = r.json()["parts"]
    assert parts["llm_stage"]["llm"]["init_state"] == "random"
    assert set(parts["decoders"]) == {"image", "audio"}
    models = _openai(service).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_openai_chat_image_in_image_and_audio_out(service):
    import soundfile as sf

    client = _openai(service)
    resp = client.chat.completions.create(
        model="tiny", modalities=["text", "image", "audio"], seed=3,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe it and make a matching sound"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(photo_png()).decode()}},
        ]}],
    )
    msg = resp.choices[0].message
    assert isinstance(msg.content, str) and "![image 1](" in msg.content and "[audio 1](" in msg.content
    kinds = [p["type"] for p in msg.parts]
    assert "image_url" in kinds and "audio_url" in kinds
    image = next(p for p in msg.parts if p["type"] == "image_url")
    audio = next(p for p in msg.parts if p["type"] == "audio_url")
    im = Image.open(io.BytesIO(base64.b64decode(msg.images[0]["image_url"]["url"].split(",", 1)[1])))
    d_img = PRESET.decoders[_m("image")].defaults
    assert im.format == "PNG" and im.size == (d_img.width_px, d_img.height_px)
    im.load()
    wav = base64.b64decode(msg.audios[0]["audio_url"]["url"].split(",", 1)[1])
    samples, sr = sf.read(io.BytesIO(wav))
    d_aud = PRESET.decoders[_m("audio")].defaults
    assert sr > 0 and abs(len(samples) / sr - d_aud.duration_s) < 0.1 and abs(samples).max() > 0
    assert base64.b64decode(msg.audio.data) == wav
    assert {image["seed"], audio["seed"]} == {3, 4}
    # the reference in content is the stored artifact: the same PNG
    assert httpx.get(image["image_url"]["url"], timeout=60).content == base64.b64decode(
        msg.images[0]["image_url"]["url"].split(",", 1)[1])


def _m(name):
    from polymodal.modality import Modality

    return Modality(name)


def test_images_endpoint(service):
    client = _openai(service)
    out = client.images.generate(model="tiny", prompt="a red fox", n=2, size="32x32", response_format="b64_json")
    ims = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert [im.size for im in ims] == [(32, 32), (32, 32)] and ims[0].tobytes() != ims[1].tobytes()


def test_images_edits_over_ray(service):
    """/v1/images/edits over the Ray graph: the source and its mask cross to the image decoder replica (issue #27)."""
    client = _openai(service)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:16] = 0  # the top half may change
    bufs = []
    for im in (Image.fromarray(src), Image.fromarray(np.dstack([src, alpha]), "RGBA")):
        bufs.append(io.BytesIO())
        im.save(bufs[-1], format="PNG")
    out = client.images.edit(image=("src.png", bufs[0].getvalue(), "image/png"),
                             mask=("mask.png", bufs[1].getvalue(), "image/png"), prompt="a red fox", n=2,
                             size="32x32", extra_body={"seed": 3, "num_inference_steps": 2, "strength": 1.0})
    ims = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB")) for d in out.data]
    assert all(np.array_equal(im[16:], src[16:]) for im in ims)  # kept outside the mask, exactly
    assert not np.array_equal(ims[0][:16], ims[1][:16])


def test_sse_streaming(service):
    events = []
    with httpx.stream("POST", service.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "sing"}], "modalities": ["audio"],
        "stream": True, "max_tokens": 6,
    }) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    media = [d for d in deltas if "audios" in d]
    assert len(media) == 1 and media[0]["audios"][0]["type"] == "audio_url" and "audio" in media[0]
    content = "".join(d.get("content") or "" for d in deltas[:deltas.index(media[0])])
    assert "[audio 1](" in content and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # and through the openai client
    stream = _openai(service).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=4)
    ids = {ch.id for ch in stream}
    assert len(ids) == 1


def test_16_concurrent_requests_distinct_ids_and_decoder_batches(service):
    items0 = service.metric("polymodal_decoder_batch_items_total")

    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[c.post(service.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}], "modalities": ["image"],
                "max_tokens": 2}) for i in range(16)])

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 16, [r.text for r in rs if r.status_code != 200][:1]
    assert len({r.json()["id"] for r in rs}) == 16
    deadline = time.monotonic() + 10  # counters reach the stats deployment within a period (1 s) of changing
    while service.metric("polymodal_decoder_batch_items_total") < items0 + 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.metric("polymodal_decoder_max_batch_size") > 1
    assert service.metric("polymodal_decoder_batch_items_total") > service.metric("polymodal_decoder_batches_total")


def test_client_disconnect_stops_decoder_steps(service):
    s0 = service.metric("polymodal_decoder_steps_total")
    c0 = service.metric("polymodal_decoder_cancelled_total")
    with httpx.stream("POST", service.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "modalities": ["image"],
        "max_tokens": 2, "stream": True, "image": {"num_inference_steps": 200},
    }) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 60
        while service.metric("polymodal_decoder_steps_total") < s0 + 2:
            assert time.monotonic() < deadline, "the decoder never started"
            time.sleep(0.1)
    # the client has gone: the steps stop well short of 200
    time.sleep(2.0)
    s1 = service.metric("polymodal_decoder_steps_total")
    time.sleep(1.5)
    s2 = service.metric("polymodal_decoder_steps_total")
    assert s2 == s1 and s1 - s0 < 200
    assert service.metric("polymodal_decoder_cancelled_total") == c0 + 1


def test_full_queue_is_503_with_retry_after(service):
    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[c.post(service.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": f"b{i}"}], "max_tokens": 1})
                for i in range(48)])

    rs = asyncio.run(go())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 16
    busy = next(r for r in rs if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "overloaded"


def test_rules_over_ray(service):
    post = lambda body, **kw: httpx.post(service.url + "/v1/chat/completions", json=body, timeout=60, **kw)  # noqa: E731
    msgs = [{"role": "user", "content": "x"}]
    r = post({"model": "gpt-4o", "messages": msgs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post({"model": "tiny", "messages": msgs, "image": {"height_px": 4000}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image.height_px"
    r = post({"model": "tiny", "messages": msgs, "modalities": ["video"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "modalities"
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "y" * (3 * 1024 * 1024)}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(service.url + "/v1/videos", json={"prompt": "waves"}, timeout=60)
    assert r.status_code == 400


def test_speech_over_ray(service):
    """The speech deployment (flite + pocketsphinx) behind the ingress's handles: the official client's speech ->
    transcription round trip, a streamed answer that joins to the whole one, an unknown voice as a 400 from the
    replica, and /ready listing the stage."""
    import openai

    from tests.media_fixtures import require_program

    require_program("flite")
    said = "I would like a cup of coffee please"
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="none", max_retries=0, timeout=120)
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input=said + ".")
    assert speech.content[:4] == b"RIFF"
    heard = client.audio.transcriptions.create(file=("s.wav", speech.content, "audio/wav"), model="whisper-1")
    assert len(set(heard.text.split()) & set(said.lower().split())) >= 6, heard.text
    body = {"model": "tts-1", "voice": "echo", "input": "Hello there. How are you today?", "response_format": "pcm"}
    whole = httpx.post(service.url + "/v1/audio/speech", json=body, timeout=120)
    with httpx.stream("POST", service.url + "/v1/audio/speech", json={**body, "stream_format": "audio"},
                      timeout=120) as r:
        streamed = b"".join(r.iter_bytes())
    assert whole.status_code == 200 and len(whole.content) > 24000 and streamed == whole.content
    bad = httpx.post(service.url + "/v1/audio/speech", json={**body, "voice": "nope"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_voice", bad.text
    parts = httpx.get(service.url + "/ready", timeout=30).json()["parts"]
    assert parts["speech"]["healthy"] and parts["speech"]["asr"]["backend"] == "pocketsphinx"


def test_structured_outputs_over_ray(service):
    """Issue #22 through the graph: the grammar is compiled in the LLM replica, its errors cross Ray as 400s."""
    import jsonschema

    client = _openai(service)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(model="tiny", messages=ask, max_tokens=100, seed=1, logprobs=True,
                                       top_logprobs=2, response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": person, "strict": True}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].logprobs.content
    jsonschema.validate(json.loads(r.choices[0].message.content), person)
    params = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    chunks = list(client.chat.completions.create(model="tiny", messages=ask, tools=tools, tool_choice="required",
                                                 parallel_tool_calls=False, max_tokens=100, seed=2, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), params)
    history = [*ask, {"role": "assistant", "content": None, "tool_calls": [{"id": deltas[0].id, "type": "function",
               "function": {"name": "get_weather", "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": deltas[0].id, "content": "21 C"}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=8, seed=3)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bad = httpx.post(service.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ask, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.json_schema.schema"


def test_skills_through_the_graph(service):
    """Issue #23 through the graph: detect runs in the skills-cpu deployment (real Haar cascade on the astronaut,
    directly and in the skill loop of a chat with the tiny LLM's forced call); a bad call is an error result."""
    from skimage import data as skimage_data

    from polymodal.grounding.boxes import box_iou

    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    listed = httpx.get(service.url + "/v1/skills", timeout=30).json()["data"]
    assert {s["name"]: s["deployment"] for s in listed} == {"detect": "skills-cpu", "segment": "skills-cpu",
                                                            "ocr": "skills-cpu"}
    direct = httpx.post(service.url + "/v1/skills/detect", timeout=120, json={
        "arguments": {"target": "face"}, "input": [{"type": "image_url", "image_url": {"url": url}}]})
    assert direct.status_code == 200, direct.text
    assert box_iou(tuple(direct.json()["boxes"][0]["box_px"]), (180.0, 75.0, 268.0, 165.0)) >= 0.5
    r = _openai(service).chat.completions.create(
        model="tiny", max_tokens=64, seed=4, tool_choice={"type": "function", "function": {"name": "detect"}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "find the face"},
                                               {"type": "image_url", "image_url": {"url": url}}]}],
        extra_body={"skills": ["detect"], "max_skill_rounds": 1, "modalities": ["text"]})
    call = r.choices[0].message.model_extra["skill_calls"][0]
    assert call["name"] == "detect" and call["deployment"] == "skills-cpu"
    assert call["result"]["error"] is None or call["result"]["error_code"] == "invalid_input"
    no_image = _openai(service).chat.completions.create(
        model="tiny", max_tokens=64, seed=5, tool_choice={"type": "function", "function": {"name": "detect"}},
        messages=[{"role": "user", "content": "find the face"}], extra_body={"skills": ["detect"],
                                                                           "max_skill_rounds": 1,
                                                                           "modalities": ["text"]})
    res = no_image.choices[0].message.model_extra["skill_calls"][0]["result"]
    assert res["error_code"] == "invalid_input" and "needs an image" in res["error"]


def test_sigterm_shuts_down_cleanly(service):
    service.proc.send_signal(signal.SIGTERM)
    rc = service.proc.wait(90)
    log = service.log.read_text()
    assert rc == 0, log[-3000:]
    assert "polymodal: stopping" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(service.url + "/health", timeout=5)
