"""The HTTP API over fake stages (no Ray, no model): every rule of the API, SSE, cancellation on timeout and
disconnect, admission, keys, the store shared by replicas (the answer's shape itself: tests/test_answer_shape.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from polymodal.modality import Modality
from services.errors import Overloaded
from services.ingress import build_app
from services.local import LocalBackend
from services.protocol import Backend
from services.settings import Limits, ServerSettings
from services.store import FileStore
from services.workers import BatchItem, DecoderWorker
from tests.media_fixtures import photo_png, speech_wav
from tests.serve_fakes import FakeLLMStage, fake_stages

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def make(settings: ServerSettings | None = None, modalities=(IMAGE, AUDIO, VIDEO), step_s=0.0, store_dir=None,
         **decoder_kw):
    preset, llm, decoders = fake_stages(modalities, step_s=step_s, **decoder_kw)
    backend = LocalBackend(preset, llm, decoders)
    settings = settings or ServerSettings()
    store = FileStore(store_dir) if store_dir else None
    return build_app(backend, settings, store=store), llm, decoders


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with client(app) as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def chat(app, messages, **fields) -> httpx.Response:
    return call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": messages, **fields})


def user(*parts):
    return [{"role": "user", "content": list(parts) if len(parts) != 1 or not isinstance(parts[0], str) else parts[0]}]


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def data_of(url: str) -> bytes:
    """The bytes of a data URL."""
    assert url.startswith("data:"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def img_part(data: bytes | None = None):
    return {"type": "image_url", "image_url": {"url": data_url(data or photo_png(), "image/png")}}


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def steps_metric(app, modality="image") -> float:
    text = call(app, "GET", "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'polymodal_decoder_steps_total{{modality="{modality}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no steps metric for {modality} in:\n{text}")


@pytest.fixture(scope="module")
def app_llm_dec():
    return make()


# ---- chat ------------------------------------------------------------------------------------------
def test_text_only_answer_keeps_content_a_string(app_llm_dec):
    app, llm, _ = app_llm_dec
    r = chat(app, user("hello there"), seed=3, max_tokens=5, temperature=0.5)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert isinstance(msg["content"], str) and "HELLO THERE" in msg["content"]
    assert body["id"].startswith("chatcmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert "audio" not in msg and "images" not in msg
    assert msg["parts"] == [{"type": "text", "text": msg["content"]}]
    call_ = llm.calls[-1]
    assert (call_["seed"], call_["max_new_tokens"], call_["temperature"], call_["top_p"]) == (3, 5, 0.5, None)


def test_image_input_and_image_audio_output(app_llm_dec):
    app, llm, decs = app_llm_dec
    r = chat(app, user({"type": "text", "text": "describe it and make a sound"}, img_part()),
             modalities=["text", "image", "audio"], seed=11)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert isinstance(msg["content"], str) and msg["content"].startswith("Seen 1 media.")
    parts = msg["parts"]
    assert [p["type"] for p in parts] == ["text", "image_url", "audio_url"]
    assert "Seen 1 media." in parts[0]["text"]
    # the LLM got the decoded photo as an array
    media = [p for p in llm.calls[-1]["turns"][-1].parts if hasattr(p, "modality")]
    assert media[0].modality is IMAGE and media[0].data.dtype == np.uint8 and media[0].data.shape[2] == 3
    png = data_of(msg["images"][0]["image_url"]["url"])
    im = Image.open(io.BytesIO(png))
    d = decs[IMAGE].defaults
    assert im.format == "PNG" and im.size == (d.width_px, d.height_px)
    import soundfile as sf

    wav = data_of(msg["audios"][0]["audio_url"]["url"])
    samples, sr = sf.read(io.BytesIO(wav))
    assert sr == 16000 and len(samples) == round(decs[AUDIO].defaults.duration_s * 16000)
    # first audio also as OpenAI's message.audio, same bytes
    assert base64.b64decode(msg["audio"]["data"]) == wav and msg["audio"]["format"] == "wav"
    # medium k is rendered with seed + k
    assert (parts[1]["seed"], parts[2]["seed"]) == (11, 12)


def test_defaults_kept_and_overrides_applied(app_llm_dec):
    app, _, decs = app_llm_dec
    r = chat(app, user("x"), modalities=["image"], image={"height_px": 48})
    assert r.status_code == 200, r.text
    opts = decs[IMAGE].calls[-1]["options"]
    d = decs[IMAGE].defaults
    assert opts.height_px == 48 and (opts.width_px, opts.num_inference_steps, opts.guidance_scale) == (
        d.width_px, d.num_inference_steps, d.guidance_scale)
    r = chat(app, user("x"), modalities=["image"])
    assert decs[IMAGE].calls[-1]["options"] == d


def test_same_seed_same_media(app_llm_dec):
    app, _, _ = app_llm_dec
    a, b, c = (chat(app, user("x"), modalities=["image"], seed=s).json()["choices"][0]["message"]["images"][0]
               for s in (5, 5, 6))
    assert a["image_url"]["url"] == b["image_url"]["url"] != c["image_url"]["url"]


def test_system_message_and_input_audio(app_llm_dec):
    app, llm, _ = app_llm_dec
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech_wav()).decode(), "format": "wav"}}
    r = chat(app, [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "listen"}, audio]}])
    assert r.status_code == 200, r.text
    c = llm.calls[-1]
    assert c["system"] == "be brief"
    part = c["turns"][0].parts[1]
    assert part.modality is AUDIO and part.sample_rate_hz == 16000 and part.data.ndim == 1 and len(part.data) > 1000


# ---- rules -------------------------------------------------------------------------------------------
def test_unknown_model_is_400(app_llm_dec):
    app, _, _ = app_llm_dec
    r = call(app, "POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": user("x")})
    e = err(r)
    assert r.status_code == 400 and e["param"] == "model" and e["code"] == "model_not_found"
    r = call(app, "POST", "/v1/images/generations", json={"model": "dall-e-3", "prompt": "x"})
    assert r.status_code == 400 and err(r)["param"] == "model"
    r = call(app, "GET", "/v1/models/gpt-4o")
    assert r.status_code == 404 and err(r)["code"] == "model_not_found"


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 2000}, "max_tokens"),                    # over the server limit (1024)
    ({"image": {"height_px": 4096}}, "image.height_px"),
    ({"image": {"width_px": 30}}, "image.width_px"),        # not a multiple of 8
    ({"image": {"num_inference_steps": 150}}, "image.num_inference_steps"),  # over the server limit (100)
    ({"audio": {"duration_s": 0}}, "audio.duration_s"),
    ({"video": {"fps": 100}}, "video.fps"),
    ({"video": {"crf": 52}}, "video.crf"),
    ({"image": {"bogus": 1}}, "image.bogus"),                # our own option objects refuse unknown keys
    ({"audio": {"num_steps": 4}}, "audio.num_steps"),
    ({"modalities": ["smell"]}, "modalities"),
    ({"messages": []}, "messages"),
])
def test_out_of_range_is_400_naming_the_field(app_llm_dec, fields, param):
    app, _, _ = app_llm_dec
    body = {"model": "tiny", "messages": user("x"), **fields}
    r = call(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    e = err(r)
    assert e["param"] == param and param in e["message"] and e["type"] == "invalid_request_error"


def test_bad_conversations_are_400(app_llm_dec):
    app, _, _ = app_llm_dec
    r = chat(app, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert r.status_code == 400 and err(r)["param"] == "messages"
    r = chat(app, user({"type": "image_url", "image_url": {"url": data_url(b"not an image", "image/png")}}))
    assert r.status_code == 400 and err(r)["param"] == "messages[0].content[0].image_url.url"
    r = chat(app, user({"type": "image_url", "image_url": {"url": data_url(speech_wav(), "audio/wav")}}))
    assert r.status_code == 400
    r = call(app, "POST", "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and err(r)["code"] == "invalid_json"


def test_unsupported_output_modality_is_400_and_never_dropped():
    app, llm, decs = make(modalities=(IMAGE,))
    r = chat(app, user("x"), modalities=["image", "video"])
    assert r.status_code == 400 and err(r)["param"] == "modalities" and "video" in err(r)["message"]
    assert llm.calls == []  # refused before any model work
    # the model "forgets" the requested group: an error, not a silent text-only answer
    llm.force_groups = False
    r = chat(app, user("x"), modalities=["image"])
    assert r.status_code == 500 and err(r)["code"] == "generation_failed" and "image" in err(r)["message"]


def test_render_failure_fails_only_that_request():
    app, _, decs = make(modalities=(IMAGE,), degenerate_seeds=(7,))
    bad = chat(app, user("x"), modalities=["image"], seed=7)
    good = chat(app, user("x"), modalities=["image"], seed=8)
    assert bad.status_code == 500 and err(bad)["code"] == "generation_failed" and "all black" in err(bad)["message"]
    assert good.status_code == 200


def test_decoder_worker_groups_batches_and_isolates_failures():
    preset, _, decs = fake_stages((IMAGE,), poison_seeds=(2,))
    stage = decs[IMAGE]
    worker = DecoderWorker(stage)
    base = stage.defaults
    llm = FakeLLMStage()
    group = next(x for x in llm.stream([_turn("x")], modalities=[IMAGE], seed=0) if hasattr(x, "hidden_states"))
    from services.protocol import RenderRequest

    def item(seed, **opt):
        return BatchItem(RenderRequest("r", group, seed, base.model_copy(update=opt)))

    items = [item(1), item(2), item(3), item(4, height_px=48)]
    out = worker.run_batch(items)
    # settings groups: {1,2,3} at the defaults (failed as a batch -> retried one by one) and {4} at 48 px
    assert [c["seeds"] for c in stage.calls] == [[1, 2, 3], [1], [2], [3], [4]]
    assert [type(o).__name__ for o in out] == ["EncodedMedium", "RenderFailed", "EncodedMedium", "EncodedMedium"]
    assert out[3].batch_size == 1 and Image.open(io.BytesIO(out[3].data)).size == (base.width_px, 48)
    assert worker.counters.snapshot()["max_batch_size"] == 3


def _turn(text):
    from polymodal.types import TextPart, Turn

    return Turn("user", (TextPart(text),))


def test_request_ids_unique_under_concurrency(app_llm_dec):
    app, _, _ = app_llm_dec

    async def go():
        async with client(app) as c:
            rs = await asyncio.gather(*[
                c.post("/v1/chat/completions", json={"model": "tiny", "messages": user(f"q{i}"),
                                                     "modalities": ["image"] if i % 2 else None})
                for i in range(16)])
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    ids = [r.json()["id"] for r in rs]
    assert len(set(ids)) == 16


def test_body_and_media_size_limits_413():
    app, llm, _ = make(ServerSettings(limits=Limits(max_body_bytes=4096, max_media_bytes=2048)))
    big = "y" * 10_000
    r = chat(app, user(big))
    assert r.status_code == 413 and err(r)["code"] == "request_too_large"
    app, llm, _ = make(ServerSettings(limits=Limits(max_media_bytes=2048)))
    r = chat(app, user(img_part(photo_png(width_px=96))))
    assert r.status_code == 413 and err(r)["param"] == "messages[0].content[0].image_url.url"
    assert llm.calls == []


def test_timeout_is_504_and_cancels_the_work():
    app, _, decs = make(ServerSettings(request_timeout_s=0.5), modalities=(IMAGE,), step_s=0.02)
    t0 = time.monotonic()
    r = chat(app, user("x"), modalities=["image"], image={"num_inference_steps": 100})
    assert r.status_code == 504 and err(r)["code"] == "timeout" and "0.5 s" in err(r)["message"]
    assert time.monotonic() - t0 < 3
    time.sleep(0.1)  # the step running at the timeout ends
    s1 = decs[IMAGE].steps
    time.sleep(0.3)
    assert decs[IMAGE].steps == s1 < 100  # stopped, not finished in the background
    assert steps_metric(app) == s1


async def _asgi_disconnecting(app, path: str, body: dict, disconnect_after_s: float) -> list[dict]:
    """Drive the ASGI app directly: send the body, then report a client disconnect."""
    raw = json.dumps(body).encode()
    sent = []
    state = {"body_sent": False}
    gone_at = time.monotonic() + disconnect_after_s

    async def receive():  # like uvicorn: once the client is gone, answers at once
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if time.monotonic() < gone_at:
            await asyncio.sleep(gone_at - time.monotonic())
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("test", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_decoder_steps(stream):
    app, _, decs = make(modalities=(IMAGE,), step_s=0.02)
    body = {"model": "tiny", "messages": user("x"), "modalities": ["image"], "stream": stream,
            "image": {"num_inference_steps": 100}}
    t0 = time.monotonic()
    asyncio.run(_asgi_disconnecting(app, "/v1/chat/completions", body, 0.4))
    assert time.monotonic() - t0 < 2.5  # 100 steps would take 2 s
    time.sleep(0.2)
    s1 = decs[IMAGE].steps
    time.sleep(0.3)
    assert 0 < decs[IMAGE].steps == s1 < 100
    assert steps_metric(app) == s1
    assert 'polymodal_rejected_total{reason="disconnect"}' in call(app, "GET", "/metrics").text or stream


def test_overload_is_503_with_retry_after():
    app, _, _ = make(ServerSettings(max_concurrent_requests=2, retry_after_s=3), modalities=(IMAGE,), step_s=0.02)

    async def go():
        async with client(app) as c:
            slow = [asyncio.ensure_future(c.post("/v1/chat/completions", json={
                "model": "tiny", "messages": user("x"), "modalities": ["image"],
                "image": {"num_inference_steps": 15}})) for _ in range(2)]
            await asyncio.sleep(0.15)
            third = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": user("y")})
            return third, await asyncio.gather(*slow)

    third, slow = asyncio.run(go())
    assert third.status_code == 503 and third.headers["retry-after"] == "3" and err(third)["code"] == "overloaded"
    assert [r.status_code for r in slow] == [200, 200]
    assert chat(app, user("z")).status_code == 200  # slots released


class _FullBackend(Backend):
    """A backend whose stage queue is full (what RayBackend raises on Ray's BackPressureError)."""

    def __init__(self, preset):
        self.preset = preset

    async def generate(self, request):
        raise Overloaded("the LLM stage's queue is full; retry later", 2)
        yield  # pragma: no cover

    async def render(self, request):
        raise AssertionError

    async def describe(self):
        return {"ready": True}


def test_stage_backpressure_is_503_with_retry_after():
    preset, _, _ = fake_stages()
    app = build_app(_FullBackend(preset))
    r = chat(app, user("x"))
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and "queue is full" in err(r)["message"]


def test_ray_backpressure_error_maps_to_overloaded():
    from ray.serve.exceptions import BackPressureError

    from services.ray_backend import RayBackend

    class Resp:
        def __await__(self):
            raise BackPressureError(num_queued_requests=3, max_queued_requests=3)
            yield  # pragma: no cover

        def cancel(self):
            pass

    class Handle:
        class render:  # noqa: N801
            @staticmethod
            def remote(req):
                return Resp()

    preset, llm, _ = fake_stages()
    rb = RayBackend(preset, None, {"image": Handle()}, retry_after_s=4)
    group = next(x for x in llm.stream([_turn("x")], modalities=[IMAGE], seed=0) if hasattr(x, "hidden_states"))
    from services.protocol import RenderRequest

    with pytest.raises(Overloaded) as e:
        asyncio.run(rb.render(RenderRequest("r", group, 0, preset.decoders[IMAGE].defaults)))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "4"


def test_api_keys():
    app, _, _ = make(ServerSettings(api_keys=("sekret",)))
    r = chat(app, user("x"))
    assert r.status_code == 401 and err(r)["type"] == "authentication_error"
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": user("x")},
             headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": user("x")},
             headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 200
    assert call(app, "GET", "/v1/models").status_code == 401
    assert call(app, "GET", "/health").status_code == 200


def test_remote_urls_refused_unless_allow_listed(monkeypatch):
    app, llm, _ = make()
    r = chat(app, user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    assert r.status_code == 400 and err(r)["code"] == "remote_url_not_allowed"
    assert llm.calls == []
    app, llm, _ = make(ServerSettings(allowed_remote_hosts=("media.example.org",)))
    fetched = []

    async def fake_fetch(self, url, param):
        fetched.append(url)
        return "image/png", photo_png()

    from services.ingress.media_input import MediaReader

    monkeypatch.setattr(MediaReader, "_fetch", fake_fetch)
    r = chat(app, user({"type": "image_url", "image_url": {"url": "https://media.example.org/cat.png"}}))
    assert r.status_code == 200 and fetched == ["https://media.example.org/cat.png"]
    r = chat(app, user({"type": "image_url", "image_url": {"url": "https://evil.example.com/cat.png"}}))
    assert r.status_code == 400 and len(fetched) == 1


def test_unknown_route_has_openai_error_body(app_llm_dec):
    app, _, _ = app_llm_dec
    r = call(app, "GET", "/v1/nothing")
    assert r.status_code == 404 and err(r)["type"] == "not_found_error"


# ---- streaming ---------------------------------------------------------------------------------------
def _sse(r: httpx.Response) -> list:
    events = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_text_then_media(app_llm_dec):
    app, _, _ = app_llm_dec
    body = {"model": "tiny", "messages": user("make noise please"), "modalities": ["audio", "image"],
            "stream": True, "seed": 21, "stream_options": {"include_usage": True}}
    r = call(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = _sse(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    images = [d for d in deltas if "images" in d]
    audios = [d for d in deltas if "audios" in d]
    assert len(images) == len(audios) == 1 and not any("media" in d for d in deltas)
    assert audios[0]["audio"]["data"] == audios[0]["audios"][0]["audio_url"]["url"].split(",", 1)[1]
    # each reference came in the content before its medium was sent
    for d, label in ((images[0], "![image 1]("), (audios[0], "[audio 1](")):
        before = "".join(x.get("content") or "" for x in deltas[:deltas.index(d)])
        assert label in before, (label, before)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    plain = chat(app, user("make noise please"), modalities=["audio", "image"], seed=21).json()
    assert plain["choices"][0]["message"]["content"].split("\n\n")[0] == content.split("\n\n")[0]


def test_streaming_error_is_an_error_event():
    app, _, _ = make(modalities=(IMAGE,), degenerate_seeds=(9,))
    r = call(app, "POST", "/v1/chat/completions", json={
        "model": "tiny", "messages": user("x"), "modalities": ["image"], "stream": True, "seed": 9})
    ev = _sse(r)
    assert "error" in ev[-1] and ev[-1]["error"]["code"] == "generation_failed"


# ---- images / audio / videos / artifacts -------------------------------------------------------------
def test_images_endpoint_b64_and_url(app_llm_dec):
    app, llm, decs = app_llm_dec
    r = call(app, "POST", "/v1/images/generations", json={"prompt": "a red fox", "n": 2, "size": "48x40", "seed": 4})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [4, 5]
    ims = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    assert all(im.size == (48, 40) for im in ims) and ims[0].tobytes() != ims[1].tobytes()
    assert llm.calls[-1]["modalities"] == [IMAGE] and "RED FOX" in data[0]["revised_prompt"]
    from services.ingress import PROMPT_ENDPOINT_MAX_NEW_TOKENS

    assert llm.calls[-1]["max_new_tokens"] == PROMPT_ENDPOINT_MAX_NEW_TOKENS  # a short lead-in, then the group
    r = call(app, "POST", "/v1/images/generations", json={"prompt": "a fox", "response_format": "url"})
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://test/v1/artifacts/") and r.json()["data"][0]["expires_at"] > time.time()
    got = call(app, "GET", url.replace("http://test", ""))
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(got.content)).verify()
    assert call(app, "GET", "/v1/artifacts/art_doesnotexist123.png").status_code == 404
    for bad, param in (({"size": "100x100"}, "size"), ({"n": 20}, "n"), ({"size": "4096x4096"}, "size")):
        r = call(app, "POST", "/v1/images/generations", json={"prompt": "x", **bad})
        assert r.status_code == 400 and err(r)["param"] == param


def test_audio_endpoint(app_llm_dec):
    app, _, _ = app_llm_dec
    import soundfile as sf

    r = call(app, "POST", "/v1/audio/generations", json={"prompt": "rain", "duration_s": 0.25})
    assert r.status_code == 200, r.text
    samples, sr = sf.read(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert sr == 16000 and len(samples) == 4000
    r = call(app, "POST", "/v1/audio/generations", json={"prompt": "rain", "duration_s": 60})
    assert r.status_code == 400 and err(r)["param"] == "duration_s"


def test_video_jobs_survive_another_replica(tmp_path):
    app, _, decs = make(modalities=(IMAGE, VIDEO), step_s=0.01, store_dir=tmp_path)
    other, _, _ = make(modalities=(IMAGE, VIDEO), store_dir=tmp_path)  # a second ingress replica, same store

    async def go():
        async with client(app) as c, client(other) as c2:
            r = await c.post("/v1/videos", json={"prompt": "waves", "seconds": "1", "size": "32x32", "fps": 4,
                                                 "num_inference_steps": 20, "crf": 14})
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["status"] in ("queued", "in_progress") and job["num_frames"] == 4 and job["object"] == "video"
            early = await c2.get(f"/v1/videos/{job['id']}/content")
            for _ in range(100):
                st = (await c2.get(f"/v1/videos/{job['id']}")).json()
                if st["status"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            content = await c2.get(f"/v1/videos/{job['id']}/content")
            return early, st, content

    early, st, content = asyncio.run(go())
    assert early.status_code == 409 and err(early)["code"] == "video_not_ready"
    assert st["status"] == "completed" and st["progress"] == 100
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content.startswith(b"FAKEMP4")
    assert decs[VIDEO].calls[-1]["options"].num_frames == 4 and decs[VIDEO].calls[-1]["options"].crf == 14
    assert call(other, "GET", "/v1/videos/video_unknown123").status_code == 404


def test_video_refused_without_decoder():
    app, _, _ = make(modalities=(IMAGE,))
    r = call(app, "POST", "/v1/videos", json={"prompt": "x"})
    assert r.status_code == 400 and "video" in err(r)["message"]


# ---- models / health / metrics ---------------------------------------------------------------------
def test_models_ready_metrics(app_llm_dec):
    app, _, _ = app_llm_dec
    card = call(app, "GET", "/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["output_modalities"] == ["text", "image", "audio", "video"]
    assert card["parts"]["decoders"]["image"]["init_state"] == "random"
    assert call(app, "GET", "/ready").status_code == 200
    text = call(app, "GET", "/metrics").text
    assert "polymodal_decoder_steps_total" in text and "polymodal_requests_total" in text


def test_ready_is_503_when_a_stage_is_unusable():
    preset, llm, decs = fake_stages((IMAGE,))
    backend = LocalBackend(preset, llm, decs)
    backend._decoders[IMAGE].healthy = False
    r = call(build_app(backend), "GET", "/ready")
    assert r.status_code == 503 and r.json()["status"] == "not_ready"


def test_openai_client_async(app_llm_dec):
    import openai

    app, _, _ = app_llm_dec

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as h:
            c = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=h, max_retries=0)
            resp = await c.chat.completions.create(
                model="tiny", modalities=["text", "image"],
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, img_part()]}])
            imgs = await c.images.generate(model="tiny", prompt="a cat", response_format="b64_json")
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            stream = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b"}],
                                                     stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            return resp, imgs, e.value, text

    resp, imgs, bad, text = asyncio.run(go())
    content = resp.choices[0].message.content
    assert isinstance(content, str) and "![image 1](http://test/v1/artifacts/" in content
    assert resp.choices[0].message.images[0]["image_url"]["url"].startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(imgs.data[0].b64_json))).verify()
    assert bad.status_code == 400 and bad.body["param"] == "model"
    assert text.strip().endswith("A B")


def test_ingress_imports_no_torch():
    code = ("import sys; import services.ingress, services.app, services.deployments, services.ray_backend, "
            "services.local, services.run; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_streaming_timeout_is_an_error_event_and_cancels():
    app, _, decs = make(ServerSettings(request_timeout_s=0.5), modalities=(IMAGE,), step_s=0.02)
    r = call(app, "POST", "/v1/chat/completions", json={
        "model": "tiny", "messages": user("x"), "modalities": ["image"], "stream": True,
        "image": {"num_inference_steps": 100}})
    ev = _sse(r)
    assert ev[-1]["error"]["code"] == "timeout" and "[DONE]" not in ev
    time.sleep(0.1)
    s1 = decs[IMAGE].steps
    time.sleep(0.3)
    assert decs[IMAGE].steps == s1 < 100


def test_disconnect_during_text_stops_the_llm():
    app, llm, decs = make(modalities=(IMAGE,))
    llm.token_s = 0.1  # ~3 s of text for a long prompt
    body = {"model": "tiny", "messages": user(" ".join(f"w{i}" for i in range(30))), "stream": True}
    t0 = time.monotonic()
    asyncio.run(_asgi_disconnecting(app, "/v1/chat/completions", body, 0.4))
    assert time.monotonic() - t0 < 2
    time.sleep(0.3)
    assert llm.cancelled == 1


def test_stats_server_sums_replicas():
    from services.deployments import StatsServer

    s = StatsServer()
    s.report("r1", "image", {"steps": 10, "max_batch_size": 2, "batches": 5})
    s.report("r2", "image", {"steps": 4, "max_batch_size": 3, "batches": 1})
    s.report("r1", "image", {"steps": 12, "max_batch_size": 2, "batches": 6})  # latest per replica wins
    assert s.snapshot() == {"image": {"steps": 16, "max_batch_size": 3, "batches": 7}}


@pytest.mark.parametrize("fields,param", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_legacy_function_calling_fields_are_refused(app_llm_dec, fields, param):
    app, _, _ = app_llm_dec
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": user("x"), **fields})
    assert r.status_code == 400 and err(r)["param"] == param


def test_chunked_body_over_limit_is_413():
    app, llm, _ = make(ServerSettings(limits=Limits(max_body_bytes=4096)))

    async def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = call(app, "POST", "/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and err(r)["code"] == "request_too_large" and llm.calls == []


def test_a_wrong_content_part_is_named(app_llm_dec):
    app, _, _ = app_llm_dec
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": "not-an-object"}]}]}
    r = call(app, "POST", "/v1/chat/completions", json=body)
    e = err(r)
    assert r.status_code == 400
    assert e["param"].startswith("messages[0].content[1]"), e
