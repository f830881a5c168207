"""Output formats defined by the request through the LLM stage (issue #22), on the ``tiny`` preset (random weights:
whatever the model picks, the grammar holds): ``response_format``, tool calls (forced, named, auto, parallel), a
history with calls and results rendered into the chat template, NExT-GPT's ``###`` stop string against
constrained output, ``logprobs`` of the masked distribution, and the presets' tool-call formats.
"""

from __future__ import annotations

import json
import math
import pickle

import jsonschema
import pytest

from polymodal.constrained import ConstraintError, InvalidSchema, Tool, ToolChoice
from polymodal.modality import Modality
from polymodal.pipeline import build_llm_stage
from polymodal.presets import get_preset
from polymodal.signals import ChatFormat
from polymodal.types import LLMResult, TextDelta, TextPart, ToolCall, Turn

IMAGE = Modality.IMAGE

PERSON = {  # nested objects, enums, arrays, bounded numbers, booleans; strict (objects closed)
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "height_m", "role", "tags", "address", "active"],
}
SCHEMA_RF = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = Tool("get_weather", {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]},
    description="Current weather in a city", strict=True)
TIME = Tool("get_time", {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
                         "required": ["zone"]}, strict=True)


@pytest.fixture(scope="module")
def stage():
    return build_llm_stage("tiny")


@pytest.fixture(scope="module")
def vicuna():
    """The tiny LLM under NExT-GPT's Vicuna template (stops on ``###``; the ``vicuna-hermes`` tool format)."""
    preset = get_preset("tiny").model_copy(update={"name": "tiny-vicuna", "chat": ChatFormat.vicuna_v0()})
    return build_llm_stage(preset)


def user(text: str) -> list[Turn]:
    return [Turn("user", (TextPart(text),))]


def script(stage, text: str, then_eos: bool = True):
    """A ``propose`` hook writing ``text`` token by token (then EOS)."""
    ids = stage.engine.tokenizer.encode(text, add_special_tokens=False)
    eos = stage.engine.tokenizer.eos_token_id
    return lambda step, _logits: ids[step] if step < len(ids) else (eos if then_eos else None)


# ---- response_format ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_json_schema_answers_always_validate(stage, seed):
    r = stage.generate(user("who?"), response_format=SCHEMA_RF, max_new_tokens=400, temperature=1.0, seed=seed)
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), PERSON)
    assert list(json.loads(r.text)) == list(PERSON["properties"])  # the schema's order, closed: nothing else


def test_a_cut_answer_says_length(stage):
    r = stage.generate(user("who?"), response_format=SCHEMA_RF, max_new_tokens=6, seed=0)
    assert r.finish_reason == "length" and r.text.startswith('{"na')
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_json_object_and_streaming_equal_the_result(stage):
    items = list(stage.stream(user("hi"), response_format={"type": "json_object"}, max_new_tokens=300, seed=3,
                              temperature=1.0))
    result = items[-1]
    assert isinstance(result, LLMResult) and result.finish_reason == "stop"
    assert isinstance(json.loads(result.text), dict)
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == result.text


def test_required_media_come_after_the_json_never_inside(stage):
    r = stage.generate(user("draw"), response_format=SCHEMA_RF, modalities=[IMAGE], allowed_modalities=[IMAGE],
                       max_new_tokens=400, seed=1)
    jsonschema.validate(json.loads(r.text), PERSON)
    [g] = r.groups
    assert g.modality is IMAGE and g.forced and g.text_offset == len(r.text)


def test_bad_schema_is_a_constraint_error_naming_the_field(stage):
    with pytest.raises(ConstraintError) as e:
        stage.generate(user("x"), response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}})
    assert e.value.param == "response_format.json_schema.schema"
    back = pickle.loads(pickle.dumps(e.value))  # crosses Ray intact
    assert type(back) is type(e.value) and back.param == e.value.param and str(back) == str(e.value)


# ---- tool calls ----------------------------------------------------------------------------------
def _valid_call(call: ToolCall, tools=(WEATHER, TIME)) -> None:
    tool = next(t for t in tools if t.name == call.name)
    jsonschema.validate(call.arguments, tool.parameters)
    assert call.id.startswith("call_")


@pytest.mark.parametrize("seed", range(3))
def test_required_yields_valid_calls_and_never_text(stage, seed):
    items = list(stage.stream(user("weather in Paris?"), tools=[WEATHER, TIME], tool_choice=ToolChoice("required"),
                              max_new_tokens=400, temperature=1.0, seed=seed))
    r = items[-1]
    assert r.finish_reason == "tool_calls" and r.text == "" and 1 <= len(r.tool_calls) <= 8
    assert [i for i in items if isinstance(i, ToolCall)] == list(r.tool_calls)  # streamed as they closed
    assert not [i for i in items if isinstance(i, TextDelta) and i.text]
    for c in r.tool_calls:
        _valid_call(c)


def test_named_choice_and_no_parallel_calls_give_exactly_one_call(stage):
    r = stage.generate(user("time?"), tools=[WEATHER, TIME], tool_choice=ToolChoice("function", "get_time"),
                       max_new_tokens=200, seed=0)
    assert [c.name for c in r.tool_calls] == ["get_time"] and r.finish_reason == "tool_calls"
    r = stage.generate(user("weather?"), tools=[WEATHER, TIME], tool_choice=ToolChoice("required"),
                       parallel_tool_calls=False, max_new_tokens=300, temperature=1.0, seed=4)
    assert len(r.tool_calls) == 1
    _valid_call(r.tool_calls[0])


def test_auto_takes_free_text_or_a_call_whose_arguments_are_constrained(stage):
    free = stage.generate(user("hello"), tools=[WEATHER], max_new_tokens=30, seed=0)
    assert free.tool_calls == () and free.finish_reason in ("stop", "length")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>'
    items = list(stage.stream(user("weather?"), tools=[WEATHER], max_new_tokens=200,
                              propose=script(stage, "Let me check.\n" + call)))
    r = items[-1]
    assert r.finish_reason == "tool_calls" and r.text == "Let me check."
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("get_weather", {"city": "Rome", "unit": "celsius"})]
    shown = "".join(i.text for i in items if isinstance(i, TextDelta))
    assert "<tool" not in shown and shown.strip() == "Let me check."
    # a call started with an argument outside the schema: the mask refuses it, the model's own valid choice is taken
    bad = call.replace("Rome", "Roma")
    r = stage.generate(user("weather?"), tools=[WEATHER], max_new_tokens=200, propose=script(stage, bad))
    assert r.tool_calls and all(c.arguments["city"] in ("Paris", "Rome", "Oslo") for c in r.tool_calls)


def test_tool_choice_none_lists_no_tools_and_constrains_nothing(stage):
    assert stage.grammar(tools=[WEATHER], tool_choice=ToolChoice("none")) is None
    r = stage.generate(user("hi"), tools=[WEATHER], tool_choice=ToolChoice("none"), max_new_tokens=8, seed=0)
    assert r.tool_calls == ()


def test_forced_call_with_required_media_is_refused(stage):
    with pytest.raises(InvalidSchema) as e:
        stage.generate(user("x"), tools=[WEATHER], tool_choice=ToolChoice("required"), modalities=[IMAGE])
    assert e.value.param == "tool_choice"


def test_history_with_calls_and_results_renders_into_the_template(stage):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}')
    turns = [*user("weather in Paris?"), Turn("assistant", (), tool_calls=(call,)),
             Turn("tool", (TextPart('{"temp": 21}'),), tool_call_id="call_1")]
    system = stage.tool_format.system_text([WEATHER], base=stage.engine.chat_format.system)
    text = "".join(s.text for s in stage.segments(turns, system=system))
    f = stage.engine.chat_format
    assert '"name": "get_weather"' in text.split(f.user_prefix)[0]  # the tool listing in the system text
    assert (f.assistant_prefix + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call>' + f.assistant_suffix) in text
    assert text.endswith(f.user_prefix + '<tool_response>\n{"temp": 21}\n</tool_response>' + f.user_suffix
                         + f.assistant_prefix)
    r = stage.generate(turns, tools=[WEATHER], max_new_tokens=12, seed=0)  # a tool result ends the conversation
    assert isinstance(r.text, str) and r.finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(ValueError, match="tool_call_id"):
        stage.generate([*turns[:2], Turn("tool", (TextPart("x"),), tool_call_id="call_9")], max_new_tokens=2)


def test_free_text_of_auto_may_hold_the_allowed_signal_tokens_only(stage):
    g = stage.grammar(tools=[WEATHER], allowed_modalities=[IMAGE])
    assert set(g.special_ids) == set(stage.engine.signal_ids[IMAGE])
    assert stage.grammar(tools=[WEATHER], allowed_modalities=[]).special_ids == ()
    assert stage.grammar(tools=[WEATHER], tool_choice=ToolChoice("required")).special_ids == ()


def test_json_response_format_with_auto_tools_is_json_or_calls(stage):
    r = stage.generate(user("x"), tools=[WEATHER], response_format=SCHEMA_RF, max_new_tokens=400, seed=2,
                       temperature=1.0)
    if r.tool_calls:
        assert r.finish_reason == "tool_calls"
    else:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), PERSON)


# ---- NExT-GPT's Vicuna template: "###" stops free text, never structured output -------------------
def test_vicuna_stop_string_never_cuts_constrained_json(vicuna):
    answer = '{"note": "a ### b", "n": 1}'
    r = vicuna.generate(user("x"), response_format={"type": "json_object"}, max_new_tokens=60,
                        propose=script(vicuna, answer))
    assert r.finish_reason == "stop" and r.text == answer
    plain = vicuna.generate(user("x"), max_new_tokens=60, propose=script(vicuna, answer))
    assert plain.text == '{"note": "a '  # control: without a grammar the stop string cuts there


def test_vicuna_stop_string_ends_free_text_but_not_a_call(vicuna):
    assert vicuna.tool_format.name == "vicuna-hermes"
    free = vicuna.generate(user("x"), tools=[TIME], max_new_tokens=60, propose=script(vicuna, "sure ### Human: more"))
    assert free.finish_reason == "stop" and free.text.strip() == "sure" and free.tool_calls == ()
    note = Tool("note", {"type": "object", "properties": {"text": {"type": "string", "maxLength": 12}},
                         "required": ["text"]}, strict=True)
    call = '<tool_call>\n{"name": "note", "arguments": {"text": "x ### y"}}\n</tool_call>'
    r = vicuna.generate(user("x"), tools=[note], tool_choice=ToolChoice("required"), parallel_tool_calls=False,
                        max_new_tokens=120, propose=script(vicuna, call))
    assert r.finish_reason == "tool_calls" and [c.arguments for c in r.tool_calls] == [{"text": "x ### y"}]


# ---- logprobs -------------------------------------------------------------------------------------
def test_logprobs_are_of_the_masked_renormalised_distribution(stage):
    items = list(stage.stream(user("who?"), response_format=SCHEMA_RF, max_new_tokens=400, seed=0, logprobs=5))
    r = items[-1]
    entries = r.logprobs
    assert entries is not None and b"".join(bytes(e.bytes) for e in entries).decode() == r.text  # one per token
    assert entries[0].token == "{" and entries[0].logprob == pytest.approx(0.0, abs=1e-5)  # forced: p = 1
    for e in entries:
        assert e.logprob <= 1e-6 and 1 <= len(e.top) <= 5
        assert e.top[0].logprob == pytest.approx(e.logprob, abs=1e-5)  # greedy: the chosen token is the likeliest
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert sum(math.exp(t.logprob) for t in e.top) <= 1 + 1e-4
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    # after '"role": "' the mask leaves the enum's first tokens only: every alternative starts one of them
    at = r.text.index('"role": "') + len('"role": "')
    k = next(i for i, n in enumerate(_cumulative(entries)) if n > at)
    assert all(any(v.startswith(t.token) for v in ("admin", "user", "guest")) for t in entries[k].top)
    streamed = [e for i in items if isinstance(i, TextDelta) and i.logprobs for e in i.logprobs]
    assert streamed == list(entries)


def _cumulative(entries):
    n = b""
    for e in entries:
        n += bytes(e.bytes)
        yield len(n.decode(errors="ignore"))


def test_logprobs_with_sampling_and_without_asking(stage):
    r = stage.generate(user("hi"), max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1, logprobs=0,
                       allowed_modalities=[])
    assert r.logprobs is not None and all(e.top == () and e.logprob <= 0 for e in r.logprobs)
    assert stage.generate(user("hi"), max_new_tokens=4, seed=1).logprobs is None


# ---- presets ---------------------------------------------------------------------------------------
def test_every_preset_names_its_tool_call_format():
    from polymodal.constrained import tool_call_format

    expected = {"tiny": "hermes", "tiny-grounding": "hermes", "smol": "hermes", "toy": "hermes",
                "nextgpt-7b": "vicuna-hermes", "nextgpt-7b-random": "vicuna-hermes"}
    for name, fmt in expected.items():
        chat = get_preset(name).chat
        assert chat.tool_format == fmt and tool_call_format(chat.tool_format).name == fmt
    p = get_preset("nextgpt-7b")
    assert type(p).from_yaml(p.to_yaml()).chat.tool_format == "vicuna-hermes"


def test_a_preset_may_word_the_tool_listing_itself():
    chat = ChatFormat(system="sys", tools_system="Functions:\n{tools}\nCall one as <tool_call>{{...}}</tool_call>.")
    stage = build_llm_stage(get_preset("tiny").model_copy(update={"name": "tiny-tools", "chat": chat}))
    text = stage.tool_format.system_text([TIME], base="sys")
    assert text.startswith("sys\n\nFunctions:\n{\"type\": \"function\"") and text.endswith("<tool_call>{...}</tool_call>.")
    with pytest.raises(ValueError, match="hermes"):
        build_llm_stage(get_preset("tiny").model_copy(update={"name": "t", "chat": ChatFormat(tool_format="nope")}))
