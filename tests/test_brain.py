"""Zero-shot skill use (Visual ChatGPT, issue #25): an external OpenAI-compatible brain drives the skill loop.

A scripted brain (a small FastAPI app under uvicorn on the loopback) records every request it gets and answers from
a script: a tool call for the user's question, then a final answer built from the tool result it was sent. polymodal
serves the ``tiny`` preset in process (its image decoder and the real ``detect`` / ``segment`` skills) with
``ServerSettings.brain`` pointing at it. Checked: the tool list and the prompt the brain got, the call, its result fed
back as a ``tool`` message, the final answer in the chat shape, an image made by the decoder called as a tool, errors
(unknown tool, bad arguments: results the brain reads; unreachable or failing brain: 503 / 502 bodies), the bound on
rounds.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest

from tests.local_server import free_port, serve_app

ROUNDS = 2  # the server's max_skill_rounds in these tests


class ScriptedBrain:
    """An OpenAI-compatible ``/v1/chat/completions`` that answers by the user's last words (recorded in ``seen``).

    - "face": call ``detect`` with ``{"target": "face"}``; "draw": call ``generate_image``; "nonsense": call an unknown
      tool and ``detect`` with bad arguments; "forever": call ``detect`` whenever tools are offered.
    - after tool results: "Answer: " + the results' JSON, joined by " | ".
    - ``fail_with``: answer every request with this HTTP status.
    """

    def __init__(self):
        self.seen: list[dict] = []
        self.fail_with: int | None = None

    def app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            self.seen.append(body)
            if self.fail_with is not None:
                return JSONResponse({"error": {"message": "brain down"}}, status_code=self.fail_with)
            msgs = body["messages"]
            user = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
            tools = [t["function"]["name"] for t in body.get("tools", [])]
            if "forever" in user and tools:
                return self.calls([("detect", {"target": "face"})])
            if msgs[-1]["role"] == "tool" or not tools:
                results = [m["content"] for m in msgs if m["role"] == "tool"]
                return self.answer("Answer: " + " | ".join(results))
            if "face" in user:
                return self.calls([("detect", {"target": "face", "min_size_px": 40})])
            if "draw" in user:
                return self.calls([("generate_image", {"caption": "a red square", "seed": 3})])
            if "nonsense" in user:
                return self.calls([("teleport", {"to": "mars"}), ("detect", {"target": 42})])
            return self.answer("I have nothing to do.")

        return app

    @staticmethod
    def answer(text: str) -> dict:
        return {"id": "b", "object": "chat.completion", "model": "scripted",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7}}

    @staticmethod
    def calls(calls: list[tuple[str, dict]]) -> dict:
        tc = [{"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
              for k, (n, a) in enumerate(calls)]
        return {"id": "b", "object": "chat.completion", "model": "scripted",
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": tc}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


@pytest.fixture(scope="module")
def brain():
    b = ScriptedBrain()
    for url in serve_app(b.app()):
        yield url, b


def _server(brain_url: str, **brain_kw):
    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import BrainConfig, ServerSettings

    backend = LocalBackend.from_preset("tiny", modalities=["image"], skills=["detect", "segment", "generate_image"])
    cfg = BrainConfig(base_url=brain_url + "/v1", model="scripted-brain", max_retries=0, **brain_kw)
    return build_app(backend, ServerSettings(request_timeout_s=60, max_skill_rounds=ROUNDS, brain=cfg))


@pytest.fixture(scope="module")
def served(brain):
    url, b = brain
    for s in serve_app(_server(url)):
        yield s, b


@pytest.fixture(scope="module")
def astronaut_url() -> str:
    from PIL import Image
    from skimage import data as skimage_data

    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(url: str, text: str, image_url: str | None = None, **kw) -> httpx.Response:
    content = [{"type": "text", "text": text}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    with httpx.Client(base_url=url, timeout=60) as h:
        return h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": content}],
                                                    **kw})


def test_the_brain_gets_the_tools_calls_a_skill_reads_its_result_and_answers(served, astronaut_url):
    url, b = served
    n0 = len(b.seen)
    r = _chat(url, "Where is the face?", astronaut_url, max_tokens=50, seed=5)
    assert r.status_code == 200, r.text
    first, second = b.seen[n0], b.seen[n0 + 1]
    assert len(b.seen) == n0 + 2
    # the prompt manager: the skills and the decoder as OpenAI tools, with their JSON schemas; the system text; the
    # image as a placeholder the tools can refer to; the request's options
    tools = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(tools) == {"detect", "segment", "generate_image"}
    assert "face" in tools["detect"]["parameters"]["properties"]["target"]["enum"]
    assert tools["generate_image"]["parameters"]["required"] == ["caption"]
    assert first["model"] == "scripted-brain" and first["max_tokens"] == 50 and first["seed"] == 5
    assert first["messages"][0]["role"] == "system" and "generate_image" in first["messages"][0]["content"]
    assert first["messages"][1] == {"role": "user", "content": "Where is the face? [image 0: 512x512 px]"}
    # the call went back to the brain with its result
    call_turn, result_turn = second["messages"][-2], second["messages"][-1]
    assert call_turn["tool_calls"][0]["function"]["name"] == "detect"
    assert result_turn["role"] == "tool" and result_turn["tool_call_id"] == call_turn["tool_calls"][0]["id"]
    result = json.loads(result_turn["content"])
    assert result["skill"] == "detect" and len(result["boxes"]) >= 1
    # the answer: chat's shape, the brain's text, the call in message.skill_calls, its boxes in message.boxes
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg["content"] == "Answer: " + result_turn["content"]
    assert body["choices"][0]["finish_reason"] == "stop" and not msg.get("tool_calls")
    assert [c["name"] for c in msg["skill_calls"]] == ["detect"]
    assert json.loads(msg["skill_calls"][0]["arguments"]) == {"target": "face", "min_size_px": 40}
    assert msg["boxes"] and msg["boxes"][0]["skill"] == "detect"
    assert body["usage"]["prompt_tokens"] == 16 and body["usage"]["completion_tokens"] == 10  # both rounds


def test_a_decoder_called_as_a_tool_puts_its_medium_in_the_answer(served):
    from PIL import Image

    url, b = served
    n0 = len(b.seen)
    r = _chat(url, "Please draw something.", media_format="inline")
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert [c["name"] for c in msg["skill_calls"]] == ["generate_image"]
    assert len(msg["images"]) == 1
    png = base64.b64decode(msg["images"][0]["image_url"]["url"].split(",", 1)[1])
    w, h = Image.open(io.BytesIO(png)).size
    assert w > 0 and h > 0
    assert "![image 1](" in msg["content"]  # the medium is referenced in the text, as chat's media are
    fed = json.loads(b.seen[n0 + 1]["messages"][-1]["content"])
    assert fed["media"] == ["image 1"]
    # a request that allows no image gets no generate_image tool
    r2 = _chat(url, "Please draw something.", modalities=["text"])
    assert r2.status_code == 200, r2.text
    assert "generate_image" not in {t["function"]["name"] for t in b.seen[-1].get("tools", [])}


def test_unknown_tools_and_bad_arguments_go_back_to_the_brain_as_error_results(served):
    url, b = served
    n0 = len(b.seen)
    r = _chat(url, "nonsense please")
    assert r.status_code == 200, r.text
    results = [json.loads(m["content"]) for m in b.seen[n0 + 1]["messages"] if m["role"] == "tool"]
    assert [x["error_code"] for x in results] == ["unknown_skill", "invalid_arguments"]
    assert "teleport" in results[0]["error"] and "detect" in results[0]["error"]
    calls = r.json()["choices"][0]["message"]["skill_calls"]
    assert [c["result"]["error_code"] for c in calls] == ["unknown_skill", "invalid_arguments"]


def test_rounds_are_bounded_then_the_brain_answers_without_tools(served, astronaut_url):
    url, b = served
    n0 = len(b.seen)
    r = _chat(url, "forever face", astronaut_url)
    assert r.status_code == 200, r.text
    asked = b.seen[n0:]
    assert len(asked) == ROUNDS + 1
    assert all("tools" in a for a in asked[:ROUNDS]) and "tools" not in asked[-1]
    assert len(r.json()["choices"][0]["message"]["skill_calls"]) == ROUNDS


def test_a_failing_or_unreachable_brain_is_a_clear_5xx(brain):
    url, b = brain
    dead = f"http://127.0.0.1:{free_port()}"
    for s in serve_app(_server(dead)):
        r = _chat(s, "hello")
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "brain_unavailable" and dead in err["message"] and err["type"] == "server_error"
    for s in serve_app(_server(url)):
        b.fail_with = 500
        try:
            r = _chat(s, "hello")
        finally:
            b.fail_with = None
        assert r.status_code == 502 and r.json()["error"]["code"] == "brain_error"
        assert "HTTP 500" in r.json()["error"]["message"]


def test_prompt_manager_renders_media_and_tool_turns():
    from polymodal.constrained.grammars import ToolChoice
    from polymodal.constrained.tools import Tool
    from polymodal.modality import Modality
    from polymodal.types import MediaPart, TextPart, ToolCall, Turn
    from services.brain import brain_body
    from services.protocol import LLMRequest
    from services.settings import BrainConfig

    img = MediaPart(Modality.IMAGE, np.zeros((32, 48, 3), np.uint8))
    aud = MediaPart(Modality.AUDIO, np.zeros(16000, np.float32), sample_rate_hz=16000)
    call = ToolCall("c1", "detect", '{"target": "eye"}')
    turns = (Turn("user", (TextPart("look"), img, img, aud)), Turn("assistant", (), tool_calls=(call,)),
             Turn("tool", (TextPart('{"skill": "detect"}'),), tool_call_id="c1"))
    req = LLMRequest("r", turns, system="Be brief.", tools=(Tool("detect", {"type": "object"}),),
                     tool_choice=ToolChoice("function", "detect"), temperature=0.0)
    body = brain_body(req, BrainConfig(base_url="http://x/v1", model="m", system="SYS"))
    m = body["messages"]
    assert m[0] == {"role": "system", "content": "SYS\n\nBe brief."}
    assert m[1]["content"] == "look [image 0: 48x32 px] [image 1: 48x32 px] [audio 0: 1.0 s]"
    assert m[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "detect", "arguments": '{"target": "eye"}'}}]}
    assert m[3] == {"role": "tool", "tool_call_id": "c1", "content": '{"skill": "detect"}'}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "detect"}}
    assert body["temperature"] == 0.0 and "max_tokens" not in body


def test_serve_takes_a_brain_on_the_command_line(monkeypatch):
    from typer.testing import CliRunner

    import services.run
    from polymodal.cli import app

    seen = {}
    monkeypatch.setattr(services.run, "serve_main", lambda preset, **kw: seen.update(preset=preset, **kw) or 0)
    r = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--no-ray", "--toy-skills", "--brain-url",
                                 "http://127.0.0.1:9/v1", "--brain-model", "smol", "--brain-key-env", "KEY"])
    assert r.exit_code == 0, r.output
    assert seen["brain"] == {"base_url": "http://127.0.0.1:9/v1", "model": "smol", "api_key_env": "KEY"}
    assert seen["toy_skills"] is True
    bad = CliRunner().invoke(app, ["serve", "--brain-url", "http://127.0.0.1:9/v1"])
    assert bad.exit_code != 0 and "go together" in bad.output


def test_the_brains_key_comes_from_the_environment(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from polymodal.types import TextPart, Turn
    from services.brain import BrainBackend
    from services.protocol import LLMRequest
    from services.settings import BrainConfig

    cfg = BrainConfig(base_url="http://brain.test/v1", model="m", api_key_env="POLYMODAL_TEST_BRAIN_KEY")
    inner = SimpleNamespace(preset=None)
    monkeypatch.delenv("POLYMODAL_TEST_BRAIN_KEY", raising=False)
    with pytest.raises(ValueError, match="POLYMODAL_TEST_BRAIN_KEY"):
        BrainBackend(inner, cfg)
    monkeypatch.setenv("POLYMODAL_TEST_BRAIN_KEY", "sk-test")
    got = {}

    def handler(request: httpx.Request) -> httpx.Response:
        got["auth"], got["url"] = request.headers.get("authorization"), str(request.url)
        return httpx.Response(200, json=ScriptedBrain.answer("hi"))

    b = BrainBackend(inner, cfg, transport=httpx.MockTransport(handler))
    r = asyncio.run(b.ask(LLMRequest("r", (Turn("user", (TextPart("hello"),)),))))
    assert r.text == "hi" and got == {"auth": "Bearer sk-test", "url": "http://brain.test/v1/chat/completions"}
