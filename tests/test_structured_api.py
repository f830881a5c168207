"""Structured outputs, tool calling and logprobs over HTTP (issue #22), against a real ``polymodal serve --no-ray``
of the ``tiny`` preset (random weights: the grammar alone makes the answers valid) with the official ``openai``
client, unchanged, and litellm; the 4xx table of the issue (none of these inputs gives a 5xx).
"""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.timeout(600)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 2},
        "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["zip"]},
    },
    "required": ["name", "age", "role", "scores", "address"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_PARAMS, "strict": True}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    import openai

    return openai.OpenAI(base_url=tiny_server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture
def llm_calls(monkeypatch):
    """What every request hands the LLM stage: (turns, keyword arguments) (the server runs in this process)."""
    from polymodal.pipeline import LLMStage

    seen: list[tuple[list, dict]] = []
    original = LLMStage.stream

    def stream(self, turns, **kw):
        seen.append((list(turns), kw))
        return original(self, turns, **kw)

    monkeypatch.setattr(LLMStage, "stream", stream)
    return seen


def _stream(client, **kw) -> tuple[list, list]:
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    return chunks, [c.choices[0] for c in chunks if c.choices]


# ---- response_format --------------------------------------------------------------------------------
def test_json_schema_answer_validates_plain_and_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=300,
                                       seed=1, temperature=1.0)
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)
    _, choices = _stream(client, messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=300, seed=1,
                         temperature=1.0)
    streamed = "".join(ch.delta.content or "" for ch in choices)
    assert streamed == c.message.content and choices[-1].finish_reason == "stop"  # the JSON as text deltas
    cut = client.chat.completions.create(model="tiny", messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=4,
                                         seed=1).choices[0]
    assert cut.finish_reason == "length"


def test_json_answer_keeps_its_media_out_of_content(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format=RESPONSE_FORMAT,
                                       max_tokens=300, seed=2, extra_body={"modalities": ["text", "image"]})
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and "artifacts" not in m.content  # the JSON alone
    jsonschema.validate(json.loads(m.content), PERSON)
    assert len(m.images) == 1 and m.images[0]["image_url"]["url"].startswith("data:image/png")
    _, choices = _stream(client, messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=300, seed=2,
                         extra_body={"modalities": ["text", "image"]})
    assert "".join(ch.delta.content or "" for ch in choices) == m.content
    assert sum(len(getattr(ch.delta, "images", None) or []) for ch in choices) == 1


# ---- tools ----------------------------------------------------------------------------------------
def test_required_tool_call_validates_and_a_second_turn_is_answered(client, llm_calls):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, seed=3)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls[:1]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    for tc in c.message.tool_calls:
        jsonschema.validate(json.loads(tc.function.arguments), WEATHER_PARAMS)
    # the second turn: the client's own message object and the tool's result
    history = [*ASK, c.message, *({"role": "tool", "tool_call_id": tc.id, "content": '{"temperature": 21}'}
                                  for tc in c.message.tool_calls)]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=16, seed=4)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert isinstance(answer.message.content, str) or answer.message.tool_calls
    turns, kw = llm_calls[-1]
    assert [t.role for t in turns] == ["user", "assistant", *["tool"] * len(c.message.tool_calls)]
    assert turns[1].tool_calls[0].id == call.id and turns[2].tool_call_id == call.id
    assert kw["tools"][0].name == "get_weather" and kw["tool_choice"] is None


def test_tool_calls_stream_as_openai_sends_them(client):
    chunks, choices = _stream(client, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=3,
                              parallel_tool_calls=False)
    deltas = [ch.delta.tool_calls for ch in choices if ch.delta.tool_calls]
    assert len(deltas) == 2  # one call: its header, then its arguments
    head, args = deltas[0][0], deltas[1][0]
    assert (head.index, head.type, head.function.name, head.function.arguments) == (0, "function", "get_weather", "")
    assert head.id.startswith("call_") and args.index == 0 and args.id is None
    jsonschema.validate(json.loads(args.function.arguments), WEATHER_PARAMS)
    assert choices[-1].finish_reason == "tool_calls" and "".join(ch.delta.content or "" for ch in choices) == ""
    # the SDK's own accumulation of a stream gives the same call as a whole answer
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, seed=3, parallel_tool_calls=False).choices[0].message
    assert plain.tool_calls[0].function.arguments == args.function.arguments
    # a streamed second turn with the tool's result
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": head.id, "type": "function", "function": {"name": "get_weather", "arguments": args.function.arguments}}]},
        {"role": "tool", "tool_call_id": head.id, "content": "21 C, sunny"}]
    _, choices = _stream(client, messages=history, tools=TOOLS, max_tokens=12, seed=5)
    assert choices[-1].finish_reason in ("stop", "length", "tool_calls")


def test_named_tool_choice_and_none(client):
    two = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}}}]
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=two, max_tokens=100, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [tc.function.name for tc in r.choices[0].message.tool_calls] == ["get_time"]
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=two, tool_choice="none", max_tokens=8, seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


# ---- the SDK's structured-output helpers (pydantic models -> strict schemas with $defs, anyOf, enums) -----------
def test_sdk_parse_helpers_with_pydantic_models(client):
    from typing import Literal, Optional

    import openai
    import pydantic

    class Address(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)
        zip: int = pydantic.Field(ge=0, le=99999)

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        role: Literal["admin", "user"]
        nick: Optional[str] = pydantic.Field(default=None, max_length=4)
        addresses: list[Address] = pydantic.Field(max_length=2)

    class GetWeather(pydantic.BaseModel):
        city: Literal["Paris", "Rome"]
        days: int = pydantic.Field(ge=1, le=7)

    r = client.beta.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=300, seed=1)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Person)
    with client.chat.completions.stream(model="tiny", messages=ASK, response_format=Person, max_tokens=300,
                                        seed=1) as s:
        assert s.get_final_completion().choices[0].message.parsed == r.choices[0].message.parsed
    tools = [openai.pydantic_function_tool(GetWeather)]
    r = client.chat.completions.parse(model="tiny", messages=ASK, tools=tools, tool_choice="required",
                                      max_tokens=200, seed=1)
    assert r.choices[0].finish_reason == "tool_calls"
    assert all(isinstance(tc.function.parsed_arguments, GetWeather) for tc in r.choices[0].message.tool_calls)
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=tools, tool_choice="required",
                                        max_tokens=200, seed=1) as s:
        final = s.get_final_completion().choices[0].message
    assert [tc.function.parsed_arguments for tc in final.tool_calls] == [
        tc.function.parsed_arguments for tc in r.choices[0].message.tool_calls]


# ---- logprobs -------------------------------------------------------------------------------------
def test_logprobs_plain_and_streamed(client):
    kw = dict(model="tiny", messages=ASK, max_tokens=12, seed=6, logprobs=True, top_logprobs=3,
              extra_body={"modalities": ["text"]})
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    assert entries and all(e.logprob <= 0 and len(e.top_logprobs) <= 3 and bytes(e.bytes).decode(errors="replace")
                           == e.token for e in entries)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries if e.top_logprobs)  # greedy
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, seed=6)
    assert plain.choices[0].logprobs is None


# ---- litellm ----------------------------------------------------------------------------------------
def test_litellm_passes_tools_through(tiny_server):
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    r = litellm.completion(model="openai/tiny", api_base=tiny_server + "/v1", api_key="none", messages=ASK,
                           tools=TOOLS, tool_choice="required", max_tokens=200, seed=3)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


# ---- the 4xx table ------------------------------------------------------------------------------------
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
BAD = [
    ("unknown tool_call_id", {"messages": [*ASK, CALL, {"role": "tool", "tool_call_id": "call_2", "content": "x"}]},
     "messages[2].tool_call_id"),
    ("tool message without tool_call_id", {"messages": [*ASK, CALL, {"role": "tool", "content": "x"}]},
     "messages[2].tool_call_id"),
    ("duplicate tool names", {"tools": TOOLS * 2}, "tools[1].function.name"),
    ("malformed tool schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools[0].function.parameters"),
    ("tool parameters not an object schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
    ("bad tool name", {"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ("named tool_choice not in tools", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "get_time"}}}, "tool_choice.function.name"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("unknown tool_choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("forced call with required media", {"tools": TOOLS, "tool_choice": "required", "modalities": ["text", "image"]},
     "tool_choice"),
    ("malformed json_schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": []}}}}, "response_format.json_schema.schema"),
    ("json_schema without schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("oversize schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 70_000}}}}, "response_format.json_schema.schema"),
    ("unknown response_format type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs over 20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("call arguments not an object", {"messages": [*ASK, {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "[1]"}}]}, {"role": "user", "content": "x"}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("legacy functions", {"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("what,fields,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_field(tiny_server, what, fields, param):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **fields}
    r = httpx.post(tiny_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, (what, r.status_code, r.text)
    assert r.json()["error"]["param"] == param, r.json()
