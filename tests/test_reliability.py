"""Issue #21's findings, each pinned: wrong paths stop the start (1, 6), ``modalities`` is the floor and the
ceiling (2), admission by what the service can finish and one request timeout (3), bad input is a 400 (4), a
decoder replica that dies is retried and no task exception is left unread (5). Fast: fake stages, in-process
tiny stages, two short subprocesses. The heavy runs (schemathesis, 200 concurrent on Ray, a replica killed) are
in ``bench/reliability.py`` and ``tests/test_reliability_slow.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from polymodal.modality import Modality
from services.errors import RenderFailed, StageUnavailable
from services.ingress import build_app
from services.ingress.admission import Admission
from services.local import LocalBackend
from services.metrics import APIMetrics
from services.settings import ServerSettings
from tests.serve_fakes import FakeLLMStage, fake_stages
from tests.test_ingress import _asgi_disconnecting, call, chat, err, user

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
ROOT = Path(__file__).resolve().parents[1]
TOY_EXPORT = ROOT / "polymodal" / "assets" / "toy" / "export"


def make(settings=None, modalities=(IMAGE, AUDIO, VIDEO), step_s=0.0, volunteer=(), preset_update=None, **kw):
    preset, _, decoders = fake_stages(modalities, step_s=step_s, **kw)
    if preset_update:
        preset = preset.model_copy(update=preset_update)
    llm = FakeLLMStage(volunteer=volunteer)
    return build_app(LocalBackend(preset, llm, decoders), settings or ServerSettings()), llm, decoders


def message(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def media_kinds(msg: dict) -> list[str]:
    """The media of an answer, whatever its shape (a list of parts, or ``images`` / ``audio`` fields)."""
    kinds = [p["type"] for p in msg["content"] if p["type"] != "text"] if isinstance(msg["content"], list) else []
    if msg.get("images"):
        kinds += ["image_url"] * len(msg["images"])
    if msg.get("audio") and "audio_url" not in kinds:
        kinds.append("audio_url")
    return kinds


# ---- 1 and 6: every path is checked at start ---------------------------------------------------------


def _run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


@pytest.mark.parametrize("no_ray", [True, False])
def test_serve_with_a_missing_projectors_folder_stops_within_seconds(no_ray):
    t0 = time.monotonic()
    try:
        r = _run_cli("serve", "--preset", "tiny", "--projectors", "/nonexistent/exp", "--port", "18731",
                     *(["--no-ray"] if no_ray else []), timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started instead of refusing the missing --projectors folder")
    assert r.returncode != 0 and time.monotonic() - t0 < 40
    assert "/nonexistent/exp" in r.stderr and "no such folder" in r.stderr


def test_generate_and_app_builder_check_projectors(tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app as cli
    from polymodal.preflight import StartupError
    from services.app import app_builder

    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(cli, ["generate", "hi", "--preset", "tiny", "--projectors", str(empty),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "holds none of the parts" in r.output and not (tmp_path / "out").exists()
    with pytest.raises(StartupError, match="no such folder"):
        app_builder({"preset": "tiny", "export_dir": str(tmp_path / "missing")})


def test_every_part_an_export_lists_must_exist_and_read(tmp_path):
    from polymodal.export import ExportError
    from polymodal.pipeline import build_decoder_stage
    from polymodal.preflight import StartupError, check_start

    exp = tmp_path / "export"
    shutil.copytree(TOY_EXPORT, exp)
    (exp / "output_image.safetensors").unlink()
    (exp / "output_audio.safetensors").write_bytes(b"\x00" * 16)  # truncated
    with pytest.raises(StartupError) as e:
        check_start("toy", export_dir=exp)
    assert "lists 'output_image' but output_image.safetensors is missing" in str(e.value)
    assert "output_audio.safetensors: not a readable safetensors file" in str(e.value)
    # and a stage refuses to load from it (a replica started another way)
    with pytest.raises(ExportError, match="output_image"):
        build_decoder_stage("toy", IMAGE, export_dir=str(exp), d_llm=576)


def test_nextgpt_without_weights_names_the_vicuna_folder_and_variable(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from polymodal.cli import app as cli

    monkeypatch.delenv("POLYMODAL_VICUNA_V0", raising=False)
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["generate", "hi", "--preset", "nextgpt-7b", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "POLYMODAL_VICUNA_V0" in r.output and str(tmp_path / "cache" / "models" / "vicuna-7b-v0") in r.output
    assert "Repo id" not in r.output and "imagebind" in r.output.lower()  # the other missing parts too
    assert time.monotonic() - t0 < 30


def test_preset_file_that_does_not_exist_says_no_such_file(tmp_path):
    from polymodal.preflight import StartupError, check_start
    from polymodal.presets import get_preset

    with pytest.raises(ValueError, match="no such file"):
        get_preset(str(tmp_path / "mine.yaml"))
    with pytest.raises(StartupError, match="no such file"):
        check_start(str(tmp_path / "mine.yaml"))
    with pytest.raises(ValueError, match="unknown preset 'tyni'; choose from"):
        get_preset("tyni")


def test_cache_that_is_not_a_folder_is_refused(tmp_path, monkeypatch):
    from polymodal.preflight import StartupError, check_start

    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(StartupError, match="not a folder"):
        check_start("tiny", cache=f)
    monkeypatch.setenv("POLYMODAL_CACHE", str(f))
    with pytest.raises(StartupError, match="POLYMODAL_CACHE"):
        check_start("tiny")


# ---- 2: modalities is the floor and the ceiling ---------------------------------------------------------


def test_modalities_text_means_no_media_masked_in_the_llm():
    app, llm, _ = make(volunteer=(AUDIO, IMAGE))  # a model that draws and sings unasked
    msg = message(chat(app, user("what is 2+2?"), modalities=["text"]))
    assert media_kinds(msg) == [] and isinstance(msg["content"], str) and msg.get("audio") is None
    assert llm.calls[-1]["allowed_modalities"] == [] and llm.calls[-1]["modalities"] == []


def test_modalities_image_gets_the_image_and_nothing_else():
    app, llm, _ = make(volunteer=(AUDIO,))
    msg = message(chat(app, user("draw"), modalities=["text", "image"]))
    assert media_kinds(msg) == ["image_url"] and msg.get("audio") is None
    assert llm.calls[-1]["allowed_modalities"] == [IMAGE] and llm.calls[-1]["modalities"] == [IMAGE]


def test_without_modalities_the_preset_policy_decides():
    app, llm, _ = make(volunteer=(AUDIO,))
    msg = message(chat(app, user("sing")))
    assert media_kinds(msg) == ["audio_url"] and llm.calls[-1]["modalities"] == []
    assert llm.calls[-1]["allowed_modalities"] == [IMAGE, AUDIO, VIDEO]  # every decoder served
    from polymodal.presets import get_preset

    quiet = get_preset("tiny").generation.model_copy(update={"media_without_modalities": "none"})
    app, llm, _ = make(volunteer=(AUDIO,), preset_update={"generation": quiet})
    assert media_kinds(message(chat(app, user("sing")))) == [] and llm.calls[-1]["allowed_modalities"] == []


def test_served_decoders_bound_the_ceiling():
    app, llm, _ = make(modalities=(IMAGE,), volunteer=(AUDIO,))
    assert media_kinds(message(chat(app, user("sing")))) == []
    assert llm.calls[-1]["allowed_modalities"] == [IMAGE]


def test_audio_voice_without_a_speech_stage_is_503():
    """A spoken answer needs the speech stage (tests/test_speech.py speaks); none deployed: 503, the LLM not run."""
    app, llm, _ = make()
    r = chat(app, user("say hi"), modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert r.status_code == 503 and err(r)["code"] == "stage_unavailable" and "speech" in err(r)["message"]
    assert llm.calls == []


def test_one_medium_endpoints_allow_only_their_medium():
    app, llm, _ = make(volunteer=(AUDIO, VIDEO))
    r = call(app, "POST", "/v1/images/generations", json={"prompt": "a fox", "n": 1})
    assert r.status_code == 200 and llm.calls[-1]["allowed_modalities"] == [IMAGE]


def test_llm_stage_masks_what_is_not_allowed():
    """The real decode loop (tiny preset): a model pushed to emit image signal tokens makes no group when the
    ceiling is text only, and makes one when images are allowed."""
    from polymodal.pipeline import build_llm_stage
    from polymodal.types import SignalGroup, TextPart, Turn

    stage = build_llm_stage("tiny")
    img = stage.engine.signal_ids[IMAGE]

    def propose(step, logits):
        return img[step] if step < len(img) else None

    turns = [Turn("user", (TextPart("hi"),))]
    kw = dict(max_new_tokens=8, seed=0, propose=propose)
    assert not [x for x in stage.stream(turns, allowed_modalities=[], **kw) if isinstance(x, SignalGroup)]
    groups = [x for x in stage.stream(turns, allowed_modalities=[IMAGE], **kw) if isinstance(x, SignalGroup)]
    assert [g.modality for g in groups] == [IMAGE]


# ---- 3: admission by what the service can finish; one timeout -------------------------------------------


def test_admission_predicts_from_seconds_per_place():
    now = [0.0]
    adm = Admission(64, 1, APIMetrics(), timeout_s=10.0, target=0.8, cold_start=2, clock=lambda: now[0])
    a, b = adm.acquire("chat"), adm.acquire("chat")
    with pytest.raises(Exception) as e:  # cold start: nothing measured, 2 running
        adm.acquire("chat")
    assert e.value.status == 503 and "starting up" in e.value.message
    now[0] = 1.0
    a.completed(), a.release()  # 1 s with 0 ahead: 1 s per place
    now[0] = 2.0
    b.completed(), b.release()  # 2 s with 1 ahead: 1 s per place
    assert adm.seconds_per_place("chat") == pytest.approx(1.0)
    slots = [adm.acquire("chat") for _ in range(8)]  # predicted 1..8 s <= 8 s
    with pytest.raises(Exception) as e:
        adm.acquire("chat")  # 9 s > 0.8 * 10 s
    assert e.value.status == 503 and e.value.code == "overloaded" and int(e.value.headers["Retry-After"]) >= 1
    assert "timeout" in e.value.message
    assert adm.predicted_s("images") == pytest.approx(9.0)  # an unseen kind: the overall average
    for s in slots:
        s.release()  # failed or cancelled: no measurement
    assert adm.seconds_per_place("chat") == pytest.approx(1.0) and adm.active == 0


def test_overload_is_refused_up_front_instead_of_504():
    """Each request takes ~0.3 s of a serial decoder; the timeout is 2 s: 16 at once cannot all finish. Before,
    every one was admitted and the late ones ran into 504; now they are refused (503 + Retry-After) up front."""
    app, _, decs = make(ServerSettings(request_timeout_s=2.0, retry_after_s=1), modalities=(IMAGE,), step_s=0.03)
    body = {"model": "tiny", "messages": user("x"), "modalities": ["image"], "image": {"num_inference_steps": 10}}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            first = await c.post("/v1/chat/completions", json=body)  # measured once (a warm service)
            rest = await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(16)])
            return [first, *rest]

    rs = asyncio.run(go())
    codes = [r.status_code for r in rs]
    assert 504 not in codes and set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 3, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1 and err(busy)["code"] == "overloaded"
    assert 'polymodal_rejected_total{reason="predicted_timeout"}' in call(app, "GET", "/metrics").text


def test_queued_request_is_dropped_when_its_client_goes():
    app, llm, _ = make(modalities=(IMAGE,))
    llm.token_s = 0.05  # the first request holds the LLM for ~1.5 s
    long_body = {"model": "tiny", "messages": user(" ".join(f"w{i}" for i in range(30)))}
    queued = {"model": "tiny", "messages": user("QUEUED"), "stream": False}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            first = asyncio.ensure_future(c.post("/v1/chat/completions", json=long_body))
            await asyncio.sleep(0.2)
            await _asgi_disconnecting(app, "/v1/chat/completions", queued, 0.3)
            return await first

    assert asyncio.run(go()).status_code == 200
    time.sleep(0.3)
    assert not any("QUEUED" in str(c["turns"]) for c in llm.calls)  # never reached the model


def test_one_request_timeout_everywhere():
    from services.app import AppArgs
    from services.settings import REQUEST_TIMEOUT_S

    assert ServerSettings().request_timeout_s == REQUEST_TIMEOUT_S == AppArgs().server.request_timeout_s
    for f in sorted((ROOT / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            for found in _find_key(doc, "request_timeout_s"):
                assert found == REQUEST_TIMEOUT_S, f"{f.name}: request_timeout_s {found}"
            for text in _find_key(doc, "serveConfigV2"):  # the RayService embeds the serve config as text
                for found in _find_key(yaml.safe_load(text), "request_timeout_s"):
                    assert found == REQUEST_TIMEOUT_S, f"{f.name}: request_timeout_s {found}"


def _find_key(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find_key(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find_key(v, key)


# ---- 4: bad input never 500s ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_audio_app():
    backend = LocalBackend.from_preset("tiny", modalities=[AUDIO])
    return build_app(backend, ServerSettings())


@pytest.mark.parametrize("seconds", [0.001, 0.015])
def test_too_short_audio_is_400_naming_the_field(tiny_audio_app, seconds):
    r = call(tiny_audio_app, "POST", "/v1/audio/generations", json={"prompt": "a beep", "duration_s": seconds})
    assert r.status_code == 400 and err(r)["param"] == "duration_s", r.text
    r = chat(tiny_audio_app, user("beep"), modalities=["audio"], audio={"duration_s": seconds}, max_tokens=2)
    assert r.status_code == 400 and err(r)["param"] == "audio.duration_s", r.text
    r = chat(tiny_audio_app, user("beep"), modalities=["audio"], audio={"duration_s": 0.02}, max_tokens=2)
    assert r.status_code == 200, r.text  # the shortest the decoder renders


# ---- 5: a decoder replica that dies -----------------------------------------------------------------------


class _Resp:
    def __init__(self, outcome):
        self.outcome = outcome

    def __await__(self):
        async def go():
            await asyncio.sleep(0)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
        return go().__await__()

    def cancel(self):
        pass


class _Method:
    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def remote(self, *_):
        self.calls += 1
        return _Resp(self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0])


class _Handle:
    def __init__(self, outcomes):
        self.render = _Method(outcomes)


def _render_request():
    from polymodal.config import DecoderDefaults
    from polymodal.types import SignalGroup
    from services.protocol import RenderRequest

    g = SignalGroup(IMAGE, np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32), index=0, text_offset=0)
    return RenderRequest("req", g, 7, DecoderDefaults())


def test_a_render_whose_replica_died_is_sent_again():
    from ray.exceptions import ActorDiedError

    from polymodal.presets import get_preset
    from services.protocol import EncodedMedium
    from services.ray_backend import RayBackend

    medium = EncodedMedium(IMAGE, b"png", "image/png", "png", seed=7, index=0, text_offset=0)
    handle = _Handle([ActorDiedError(), medium])
    backend = RayBackend(get_preset("tiny"), llm=None, decoders={"image": handle})
    assert asyncio.run(backend.render(_render_request())) == medium and handle.render.calls == 2
    assert backend.retried == {"image": 1}  # polymodal_decoder_retried_total{modality="image"}


def test_a_render_whose_replica_stays_dead_is_503_before_the_deadline():
    from ray.exceptions import ActorDiedError

    from polymodal.presets import get_preset
    from services.protocol import REQUEST_DEADLINE
    from services.ray_backend import RayBackend

    handle = _Handle([ActorDiedError()])
    backend = RayBackend(get_preset("tiny"), llm=None, decoders={"image": handle})

    async def go():
        REQUEST_DEADLINE.set(time.monotonic() + 3.0)
        t0 = time.monotonic()
        with pytest.raises(StageUnavailable) as e:
            await backend.render(_render_request())
        return e.value, time.monotonic() - t0

    e, took = asyncio.run(go())
    assert e.status == 503 and int(e.headers["Retry-After"]) >= 1 and "died" in e.message
    assert took < 3.0 and handle.render.calls >= 2


def test_the_other_failed_media_of_a_request_are_retrieved(caplog):
    """Two media of one request fail at once: the request gets the first error; the second's exception is
    retrieved, so asyncio never logs "Task exception was never retrieved"."""
    from services.protocol import Backend

    preset, llm, _ = fake_stages((IMAGE, AUDIO))

    class Failing(Backend):
        def __init__(self):
            self.preset = preset

        async def generate(self, request):
            async for x in _aiter(llm.stream(list(request.turns), modalities=list(request.modalities))):
                yield x

        async def render(self, request):
            raise RenderFailed(f"{request.group.modality.value} failed")

        async def describe(self):
            return {"ready": True}

    app = build_app(Failing(), ServerSettings())
    reported = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx["message"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": user("x"),
                                                          "modalities": ["image", "audio"]})
        gc.collect()
        await asyncio.sleep(0.05)
        return r

    r = asyncio.run(go())
    gc.collect()
    assert r.status_code == 500 and err(r)["code"] == "generation_failed"
    assert not [m for m in reported if "never retrieved" in m], reported


async def _aiter(it):
    for x in it:
        yield x


def test_reliability_extra_pins_schemathesis():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("schemathesis==") for d in extras["reliability"])


def test_openapi_bounds_the_audio_duration():
    app, _, _ = make()
    spec = json.loads(call(app, "GET", "/openapi.json").text)
    audio = spec["components"]["schemas"]["AudioGenerationRequest"]["properties"]["duration_s"]
    bounds = [s for s in audio.get("anyOf", [audio]) if s.get("type") == "number"][0]
    assert bounds["minimum"] == 0.02
