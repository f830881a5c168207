"""LLaVA-Plus's four-turn rendering as a preset-declared tool-call format (issue #25): ``chat.tool_format:
llava-plus``. Rendered and parsed text (the format's own methods, the streaming parser), and the real decode loop of
the tiny LLM under that format (a scripted ``propose`` writes what a trained skill-use model would write; the
grammar of the auto tool choice accepts it and the stage returns the call), and the prompt the next round reads.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from polymodal.constrained.tools import (
    LLAVA_PLUS_VALUE,
    StreamingToolCallParser,
    Tool,
    ToolResult,
    llava_plus,
    llava_plus_answer,
    llava_plus_value,
    parse_tool_calls,
    tool_call_format,
)
from polymodal.types import TextPart, ToolCall, Turn

LOCATE = Tool("locate", {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
    "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow"]}},
    "required": ["shape", "colour"]}, strict=True)
THOUGHTS = '"thoughts🤔" The question asks where the red circle is; the locate skill finds it.'
SKILL_USE = (THOUGHTS + '\n"actions🚀" [{"API_name": "locate", "API_params": {"shape": "circle", "colour": "red"}}]'
             '\n"value👉"')


def test_the_skill_use_turn_renders_and_parses_back():
    fmt = tool_call_format("llava-plus")
    assert fmt == llava_plus() and fmt.name_key == "API_name" and fmt.arguments_key == "API_params"
    call = ToolCall("c1", "locate", '{"shape": "circle", "colour": "red"}')
    assert fmt.assistant_text(THOUGHTS, [call]) == SKILL_USE
    parsed = parse_tool_calls(SKILL_USE, fmt)
    assert parsed.text == THOUGHTS and not parsed.truncated and parsed.malformed == 0
    assert [(c.name, c.arguments) for c in parsed.calls] == [("locate", {"shape": "circle", "colour": "red"})]
    # a list argument (a box) does not end the block: the closing tag is ']' + newline + "value👉"
    seg = fmt.assistant_text("", [ToolCall("c2", "segment", '{"box_px": [1, 2, 30, 40]}')])
    assert [c.arguments for c in parse_tool_calls(seg, fmt).calls] == [{"box_px": [1, 2, 30, 40]}]
    # streamed a few characters at a time: the same call, the thoughts shown, nothing of the block
    p = StreamingToolCallParser(fmt)
    shown, calls = "", []
    for k in range(0, len(SKILL_USE), 3):
        text, done = p.feed(SKILL_USE[k:k + 3])
        shown += text
        calls += done
    shown += p.finish()[0]
    assert shown.strip() == THOUGHTS and [c.name for c in calls] == ["locate"]


def test_the_result_and_answer_turns():
    fmt = llava_plus()
    out = '{"skill": "locate", "boxes": [{"label": "red circle", "box": [4.0, 5.0, 20.0, 21.0]}]}'
    assert fmt.results_text([ToolResult("c1", "locate", out)]) == (
        "locate model outputs: " + out + "\n\nPlease summarize the model outputs and answer my first question.")
    answer = llava_plus_answer("locate found one red circle.", "The red circle is at [4, 5, 20, 21].")
    assert answer == '"thoughts🤔" locate found one red circle.\n"value👉" The red circle is at [4, 5, 20, 21].'
    assert parse_tool_calls(answer, fmt).calls == ()  # no actions line: an answer, not a call
    assert llava_plus_value(answer) == "The red circle is at [4, 5, 20, 21]."
    assert llava_plus_value("no markers") == "no markers" and LLAVA_PLUS_VALUE == '"value👉"'
    listing = fmt.system_text([LOCATE])
    assert "\nlocate(" in listing and '"actions🚀" [{"API_name": <skill>' in listing  # the signature listing


@pytest.fixture(scope="module")
def llava_stage():
    from polymodal.pipeline import build_llm_stage
    from polymodal.presets import get_preset

    import dataclasses

    tiny = get_preset("tiny")
    chat = dataclasses.replace(tiny.chat, tool_format="llava-plus")  # what a preset declares
    return build_llm_stage(tiny.model_copy(update={"name": "tiny-llava-plus", "chat": chat}))


def _script(stage, text: str):
    ids = stage.engine.tokenizer.encode(text, add_special_tokens=False)
    eos = stage.engine.tokenizer.eos_token_id
    return lambda step, _logits: ids[step] if step < len(ids) else eos


def test_a_preset_declaring_llava_plus_emits_and_parses_it_in_the_decode_loop(llava_stage):
    stage = llava_stage
    assert stage.tool_format.name == "llava-plus"
    turns = [Turn("user", (TextPart("Where is the red circle?"),))]
    r = stage.generate(turns, tools=[LOCATE], max_new_tokens=200, propose=_script(stage, SKILL_USE))
    assert r.finish_reason == "tool_calls", r.text
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("locate", {"shape": "circle", "colour": "red"})]
    assert r.text == THOUGHTS
    # the next round's prompt: the skill_use turn as the model wrote it, the result as LLaVA-Plus's human turn
    call = r.tool_calls[0]
    more = [*turns, Turn("assistant", (TextPart(r.text),), tool_calls=(call,)),
            Turn("tool", (TextPart(json.dumps({"skill": "locate", "boxes": []})),), tool_call_id=call.id)]
    prompt = "".join(s.text or "" for s in stage.segments(more))
    assert SKILL_USE in prompt
    assert 'locate model outputs: {"skill": "locate", "boxes": []}\n\nPlease summarize the model outputs' in prompt
    # the answer round (no tools offered: the loop's last round): free text in the format, no call
    answer = llava_plus_answer("locate found nothing.", "There is no red circle.")
    a = stage.generate(more, max_new_tokens=200, propose=_script(stage, answer))
    assert a.tool_calls == () and llava_plus_value(a.text) == "There is no red circle."


def test_the_signature_listing_keeps_what_the_schema_says_in_fewer_tokens():
    """``listing="signature"`` (llava-plus's): one ``name(arg: type, opt?: type = default): description`` line per
    tool; enums, unions, bounds, arrays and defaults survive; a nested object schema falls back to its JSON."""
    from polymodal.constrained.tools import hermes, tool_signature

    tool = Tool("find", {"type": "object", "required": ["shape"], "properties": {
        "shape": {"enum": ["circle", "square"]},
        "colour": {"anyOf": [{"enum": ["red"], "type": "string"}, {"type": "null"}], "default": None},
        "k": {"type": "integer", "minimum": 0, "maximum": 9, "default": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"type": "object", "properties": {"x": {"type": "number"}}}}}, "Find things.")
    line = tool_signature(tool)
    assert line == ('find(shape: "circle"|"square", colour?: "red"|null = null, k?: integer >= 0 <= 9 = 1, '
                    'tags?: string[], where?: {"type":"object","properties":{"x":{"type":"number"}}}): Find things.')
    assert tool_signature(Tool("ping")) == "ping()"
    listing = llava_plus().system_text([LOCATE, tool])
    assert line in listing.splitlines() and '"name": "find"' not in listing
    assert '"name": "find"' in hermes().system_text([tool])  # the Hermes formats keep OpenAI's JSON
    assert len(listing) < len(json.dumps(tool.openai_dict())) + len(json.dumps(LOCATE.openai_dict())) + 400
    with pytest.raises(ValueError, match="listing"):
        dataclasses.replace(llava_plus(), listing="yaml")
