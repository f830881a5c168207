"""The output formats a chat request defines (issue #22): ``response_format``, ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``logprobs`` / ``top_logprobs`` -> the :class:`services.protocol.LLMRequest` fields.

The answer's grammar is built as the LLM stage will build it (without the signal token ids, which need the
tokenizer: the same structure) and checked by the grammar engine here, so a schema it cannot compile is a 400
before any model work. No torch.
"""

from __future__ import annotations

import json
from typing import Any

from polymodal.constrained.errors import ConstraintError
from polymodal.constrained.grammars import ToolChoice, check as check_grammar, response_schema
from polymodal.constrained.grammars import response_format as response_format_grammar
from polymodal.constrained.grammars import tool_calls as tool_calls_grammar
from polymodal.constrained.tools import TOOL_NAME_RE, Tool, tool_call_format, tools_from_openai
from polymodal.modality import Modality
from polymodal.types import TextPart, ToolCall, Turn

from services.errors import bad_request
from services.schemas import ChatCompletionRequest, TextContent
from services.settings import Limits


def output_format(req: ChatCompletionRequest, requested: tuple[Modality, ...], limits: Limits,
                  tool_format: str) -> dict[str, Any]:
    """``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``logprobs`` /
    ``top_logprobs`` -> the :class:`LLMRequest` fields (only those the request sets).

    The answer's grammar is built as the LLM stage will build it (without the signal token ids, which need
    the tokenizer: same structure) and checked by the grammar engine here, so a schema it cannot compile is a
    400 before any model work.

    Raises:
        APIError: 400 naming the field: a malformed ``response_format`` or schema, one over
        ``limits.max_schema_bytes``; a bad tool list (type, name, duplicate names, parameters), more than
        ``limits.max_tools``; ``tool_choice`` without tools or naming a function not in ``tools``; a forced
        call (``required`` / named) with ``modalities`` that require media; ``top_logprobs`` without
        ``logprobs``.
    """
    out: dict[str, Any] = {}
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
    if req.logprobs:
        out["logprobs"] = int(req.top_logprobs or 0)
    constraint_limits = limits.constraint_limits()
    try:
        answer = response_schema(req.response_format, limits=constraint_limits)
        tools: list[Tool] = []
        if req.tools:
            if len(req.tools) > limits.max_tools:
                raise bad_request(f"tools: at most {limits.max_tools} tools on this server", param="tools",
                                  code="invalid_value")
            tools = tools_from_openai(req.tools)
        choice: ToolChoice | None = None
        if req.tool_choice is not None:
            if not tools and req.tool_choice != "none":
                raise bad_request("tool_choice: only allowed when tools are given", param="tool_choice",
                                  code="invalid_value")
            choice = ToolChoice.from_openai(req.tool_choice, [t.name for t in tools])
        grammar = None
        if tools and (choice is None or choice.mode != "none"):
            if choice is not None and choice.mode in ("required", "function") and requested:
                raise bad_request(
                    f"tool_choice: a forced tool call ({req.tool_choice!r}) cannot carry the media modalities "
                    f"requires ({', '.join(m.value for m in requested)}): the answer would be a call; ask for "
                    "the media in a later turn, or use tool_choice 'auto'", param="tool_choice",
                    code="invalid_value")
            fmt = tool_call_format(tool_format)
            grammar = tool_calls_grammar(tools, choice or ToolChoice("auto"), fmt,
                                         parallel=req.parallel_tool_calls is not False, answer=answer,
                                         limits=constraint_limits)
        elif answer is not None:
            grammar = response_format_grammar(req.response_format, limits=constraint_limits)
        if grammar is not None:
            check_grammar(grammar)
    except ConstraintError as e:
        raise bad_request(str(e).splitlines()[0], param=e.param, code="invalid_schema") from None
    if answer is not None:
        out["response_format"] = dict(req.response_format)
    if tools:
        out.update(tools=tuple(tools), tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False)
    if out:
        out["constraint_limits"] = constraint_limits
    return out


# ---- tool turns of the history ---------------------------------------------------------------------
def history_tool_calls(msg, p: str, call_ids: set[str]) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls`` -> :class:`ToolCall` s (their ids added to ``call_ids``).

    Raises:
        APIError: 400 naming ``messages[i].tool_calls[j]...``: a duplicate id, a bad function name, arguments
        that are not a JSON object.
    """
    out: list[ToolCall] = []
    for j, c in enumerate(msg.tool_calls or ()):
        pj = f"{p}.tool_calls[{j}]"
        if c.id in call_ids:
            raise bad_request(f"{pj}.id: {c.id!r} is already the id of an earlier tool call", param=f"{pj}.id",
                              code="invalid_value")
        if not TOOL_NAME_RE.match(c.function.name):
            raise bad_request(f"{pj}.function.name: must match {TOOL_NAME_RE.pattern}",
                              param=f"{pj}.function.name", code="invalid_value")
        try:
            args = json.loads(c.function.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise bad_request(f"{pj}.function.arguments: must be a JSON object (as a string)",
                              param=f"{pj}.function.arguments", code="invalid_value")
        call_ids.add(c.id)
        out.append(ToolCall(c.id, c.function.name, json.dumps(args, ensure_ascii=False)))
    return tuple(out)

def tool_turn(msg, p: str, call_ids: set[str]) -> Turn:
    """A ``tool`` message -> a ``tool`` turn (its text content, the call it answers).

    Raises:
        APIError: 400 naming ``messages[i].tool_call_id`` (missing, or no earlier assistant message made that
        call) or ``messages[i].content`` (not text).
    """
    if not msg.tool_call_id:
        raise bad_request(f"{p}.tool_call_id: a tool message needs the id of the call it answers",
                          param=f"{p}.tool_call_id")
    if msg.tool_call_id not in call_ids:
        raise bad_request(f"{p}.tool_call_id: {msg.tool_call_id!r} is not the id of a tool call of an earlier "
                          "assistant message", param=f"{p}.tool_call_id", code="invalid_tool_call_id")
    content = msg.content
    if isinstance(content, list):
        if any(not isinstance(c, TextContent) for c in content):
            raise bad_request(f"{p}.content: a tool message may only hold text", param=f"{p}.content")
        content = "".join(c.text for c in content)
    return Turn("tool", (TextPart(content or ""),), tool_call_id=msg.tool_call_id)
