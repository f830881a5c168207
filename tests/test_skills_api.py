"""Skills through the service (issue #23): ``GET /v1/skills``, ``POST /v1/skills/{name}``, the skill loop of chat
completions over HTTP with the official ``openai`` client, and ``polymodal skill``.

Two hosts: a ``--no-ray`` host of the ``tiny`` preset (its random LLM makes the forced call through the grammar,
with valid but random arguments) and an app over the in-process backend whose LLM is scripted to call ``detect``
with real arguments (what a trained model would write), so the real Haar cascade's box on ``astronaut()`` can be
checked against a box written by hand. The Ray Serve graph: tests/test_serve_ray.py.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from skimage import data as skimage_data

from polymodal.grounding.boxes import box_iou
from tests.local_server import serve_app
from tests.serve_fakes import ScriptedToolLLMStage

# the astronaut's face in astronaut() (512 x 512), by hand: hairline to chin, ear to ear (as tests/test_skills.py)
ASTRONAUT_FACE_PX = (180.0, 75.0, 268.0, 165.0)


def _data_url(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def astronaut_url() -> str:
    return _data_url(skimage_data.astronaut())


@pytest.fixture(scope="module")
def scripted():
    """An app over the in-process backend: scripted LLM, no decoders, the real CPU skills."""
    from polymodal.presets import get_preset
    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from services.skill_host import SkillHost

    stage = ScriptedToolLLMStage({"detect": {"target": "face"},
                                  "segment": {"box_px": list(ASTRONAUT_FACE_PX), "label": "face"}})
    backend = LocalBackend(get_preset("tiny"), stage, {}, skill_host=SkillHost.build(["detect", "segment"]))
    app = build_app(backend, ServerSettings(request_timeout_s=60))
    for url in serve_app(app):
        yield url, stage


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _chat(client, image_url: str | None, **kw):
    content = [{"type": "text", "text": "Where is the face?"}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_openai_client_skill_loop_detects_the_astronauts_face(scripted, astronaut_url):
    url, stage = scripted
    n0 = len(stage.calls)
    r = _chat(_client(url), astronaut_url, max_tokens=64,
              tool_choice={"type": "function", "function": {"name": "detect"}},
              extra_body={"skills": ["detect", "segment"], "box_overlay": True})
    msg = r.choices[0].message
    extra = msg.model_extra
    calls = extra["skill_calls"]
    assert [c["name"] for c in calls] == ["detect"] and calls[0]["deployment"] == "in-process"
    assert json.loads(calls[0]["arguments"]) == {"target": "face"}
    res = calls[0]["result"]
    assert res["error"] is None and len(res["boxes"]) >= 1
    assert box_iou(tuple(res["boxes"][0]["box_px"]), ASTRONAUT_FACE_PX) >= 0.5
    assert box_iou(tuple(extra["boxes"][0]["box"]), ASTRONAUT_FACE_PX) >= 0.5 and extra["boxes"][0]["skill"] == "detect"
    # the answer: the model read the result turn and answered in text; the client got no tool_calls
    assert msg.content.startswith("I read: ") and '"skill": "detect"' in msg.content and not msg.tool_calls
    assert r.choices[0].finish_reason == "stop"
    # the loop: the forced call offered both skills; the second round offered them with tool_choice auto
    first, second = stage.calls[n0], stage.calls[n0 + 1]
    assert first["tools"] == ["detect", "segment"] and first["tool_choice"].name == "detect"
    assert second["tool_choice"].mode == "auto" and [t.role for t in second["turns"]][-2:] == ["assistant", "tool"]
    # the overlay: the astronaut with the detected box drawn, the last image of the answer
    overlay = extra["images"][-1]
    assert overlay["overlay"] is True
    from PIL import Image

    png = base64.b64decode(overlay["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    assert extra["masks"] == []


def test_a_bad_image_is_an_error_result_not_a_5xx(scripted):
    url, _ = scripted
    client = _client(url)
    # no image at all: the skill's error is the model's result and the request still answers
    r = _chat(client, None, tool_choice={"type": "function", "function": {"name": "detect"}},
              extra_body={"skills": ["detect"]})
    res = r.choices[0].message.model_extra["skill_calls"][0]["result"]
    assert res["error_code"] == "invalid_input" and "needs an image" in res["error"]
    assert "needs an image" in r.choices[0].message.content
    # a file that is no image: refused when the request is read (400 naming the part), before any model or skill runs
    with httpx.Client(base_url=url, timeout=60) as h:
        bad = h.post("/v1/chat/completions", json={
            "model": "tiny", "skills": ["detect"], "tool_choice": {"type": "function", "function": {"name": "detect"}},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("messages[0].content[0]")
        unknown = h.post("/v1/chat/completions", json={"model": "tiny", "skills": ["teleport"],
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "skills[0]"
        assert "detect" in unknown.json()["error"]["message"]


def test_skills_endpoints_list_and_direct_calls(scripted, astronaut_url):
    url, _ = scripted
    with httpx.Client(base_url=url, timeout=60) as h:
        listed = h.get("/v1/skills").json()["data"]
        assert [s["name"] for s in listed] == ["detect", "segment"]
        det = listed[0]
        assert det["deployment"] == "in-process" and "face" in det["parameters"]["properties"]["target"]["enum"]
        ok = h.post("/v1/skills/detect", json={"arguments": {"target": "face"},
                                               "input": [{"type": "image_url", "image_url": {"url": astronaut_url}}]})
        assert ok.status_code == 200, ok.text
        assert box_iou(tuple(ok.json()["boxes"][0]["box_px"]), ASTRONAUT_FACE_PX) >= 0.5
        seg = h.post("/v1/skills/segment", json={"arguments": {"box_px": list(ASTRONAUT_FACE_PX)},
                                                 "input": [{"type": "image_url", "image_url": {"url": astronaut_url}}]})
        assert seg.status_code == 200 and seg.json()["masks"][0]["rle"]["size"] == [512, 512]
        for path, body, status, code in [
            ("/v1/skills/teleport", {}, 404, "skill_not_found"),
            ("/v1/skills/detect", {"arguments": {"target": "dog"}}, 400, "invalid_arguments"),
            ("/v1/skills/detect", {"arguments": {}}, 400, "invalid_input"),  # no image
            ("/v1/skills/detect", {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
             400, None),
        ]:
            r = h.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert err["message"] and (code is None or err["code"] == code)


def test_tiny_model_makes_the_forced_call_through_its_grammar(tiny_server, astronaut_url):
    """The real LLM stage (random tiny weights): the forced ``detect`` call is written under the grammar, so its
    arguments validate against the skill's schema; the skill runs; the answer comes back (200, never a 5xx)."""
    from skills import DetectParams

    r = _chat(_client(tiny_server), astronaut_url, max_tokens=64, seed=3,
              tool_choice={"type": "function", "function": {"name": "detect"}},
              extra_body={"skills": ["detect"], "max_skill_rounds": 1})
    calls = r.choices[0].message.model_extra["skill_calls"]
    assert len(calls) == 1 and calls[0]["name"] == "detect" and calls[0]["round"] == 0
    DetectParams.model_validate_json(calls[0]["arguments"])  # the grammar kept it inside the schema
    res = calls[0]["result"]
    assert res["error"] is None or res["error_code"] == "invalid_input"  # e.g. a random image_index out of range
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls


def test_cli_skill_command(tmp_path):
    from typer.testing import CliRunner
    from PIL import Image

    from polymodal.cli import app

    img = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(img)
    runner = CliRunner()
    ok = runner.invoke(app, ["skill", "detect", "--image", str(img), "--args", '{"target": "face"}'])
    assert ok.exit_code == 0, ok.output
    assert box_iou(tuple(json.loads(ok.stdout)["boxes"][0]["box_px"]), ASTRONAUT_FACE_PX) >= 0.5
    for argv, code, needle in [
        (["skill", "teleport"], 2, "unknown skill"),
        (["skill", "detect", "--image", str(img), "--args", '{"target": "dog"}'], 2, "target"),
        (["skill", "detect", "--image", str(tmp_path / "missing.png")], 2, "not found"),
        (["skill", "detect"], 1, "needs an image"),
    ]:
        r = runner.invoke(app, argv)
        assert r.exit_code == code and needle in r.output, (argv, r.exit_code, r.output)


def test_streamed_skill_loop(scripted, astronaut_url):
    url, _ = scripted
    chunks = list(_chat(_client(url), astronaut_url, stream=True, tool_choice="required",
                        extra_body={"skills": ["segment"]}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [sc for d in deltas for sc in (d.model_extra or {}).get("skill_calls", ())]
    assert [c["name"] for c in calls] == ["segment"] and calls[0]["result"]["error"] is None
    assert calls[0]["result"]["masks"][0]["rle"]["size"] == [512, 512]
    content = "".join(d.content or "" for d in deltas)
    assert content.startswith("I read: ") and '"masks"' in content and not any(d.tool_calls for d in deltas)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.delta.model_extra["masks"][0]["skill"] == "segment"


def test_a_skill_past_its_time_is_an_error_result(astronaut_url):
    """A skill call over ``skill_timeout_s``: the model reads a timeout error, the request still answers (200)."""
    import time

    from polymodal.presets import get_preset
    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from services.skill_host import SkillHost
    from skills import DetectSkill

    class SlowDetect(DetectSkill):
        def run(self, arguments=None, media=()):
            time.sleep(3.0)
            return super().run(arguments, media)

    stage = ScriptedToolLLMStage({"detect": {"target": "face"}})
    backend = LocalBackend(get_preset("tiny"), stage, {}, skill_host=SkillHost({"detect": SlowDetect()}))
    app = build_app(backend, ServerSettings(request_timeout_s=30, skill_timeout_s=0.5))
    for url in serve_app(app):
        r = _chat(_client(url), astronaut_url, tool_choice={"type": "function", "function": {"name": "detect"}},
                  extra_body={"skills": ["detect"]})  # (the skill would have found the face: it finishes in 3 s)
        res = r.choices[0].message.model_extra["skill_calls"][0]["result"]
        assert res["error_code"] == "failed" and "did not finish within 0.5 s" in res["error"]
        assert "did not finish" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
