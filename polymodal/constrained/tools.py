"""Tool calling as text: the format a preset's model writes calls in, and the parser that reads them back.

SmolLM2 has no tool-call format of its own; we use the Hermes convention (NousResearch Hermes-2-Pro, also
Qwen2.5's template): the system text lists the tools as JSON inside ``<tools></tools>``, the assistant
writes each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, and a tool's
result comes back in a user turn as ``<tool_response>\\n...\\n</tool_response>``. NExT-GPT's Vicuna
template gets the same blocks laid out for its ``### Human / ### Assistant`` turns.

The format is data (:class:`ToolCallFormat`), so the grammar (:mod:`polymodal.constrained.grammars`), the
prompt rendering and the parser all read the same tags. No torch here: the ingress may import it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polymodal.constrained.errors import InvalidSchema
from polymodal.types import ToolCall  # noqa: F401 - re-exported: the call as the stages pass it

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names (so a name is always a plain JSON string and a Lark literal)."""


@dataclass(frozen=True)
class Tool:
    """One callable function, as OpenAI's ``tools[i].function``.

    Attributes:
        name: ``^[A-Za-z0-9_-]{1,64}$``.
        parameters: the JSON schema of the arguments (an object schema; ``{}`` = any object).
        description: shown to the model in the system text.
        strict: OpenAI's ``function.strict``: the arguments' objects are closed (``additionalProperties``
            false where unsaid) in the grammar.
    """

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    strict: bool = False

    def __post_init__(self):
        if not TOOL_NAME_RE.match(self.name):
            raise ValueError(f"tool name {self.name!r} must match {TOOL_NAME_RE.pattern}")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema object")

    def openai_dict(self) -> dict[str, Any]:
        """``{"type": "function", "function": {name, description, parameters}}`` (what the system text lists)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = dict(self.parameters) or {"type": "object"}
        return {"type": "function", "function": fn}


def _schema_type(schema: Mapping[str, Any]) -> str:
    """A JSON schema as a short type expression: enums as ``"a"|"b"``, ``anyOf`` / type lists joined by ``|``,
    arrays as ``T[]``, bounds as ``integer >= 0``; a schema with nested properties (or anything else) as its compact
    JSON, so nothing the schema says is dropped."""
    if "enum" in schema:
        return "|".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"], ensure_ascii=False)
    for key in ("anyOf", "oneOf"):
        if key in schema and set(schema) <= {key, "default", "description", "title"}:
            return "|".join(_schema_type(s) for s in schema[key])
    kind = schema.get("type")
    if isinstance(kind, list):
        return "|".join(kind)
    if kind == "array" and isinstance(schema.get("items"), Mapping) and set(schema) <= {
            "type", "items", "default", "description", "title"}:
        inner = _schema_type(schema["items"])
        return f"({inner})[]" if "|" in inner else f"{inner}[]"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if isinstance(kind, str) and set(schema) <= {"type", "default", "description", "title", *bounds}:
        return " ".join([kind, *(f"{op} {schema[k]}" for k, op in bounds.items() if k in schema)])
    rest = {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
    return json.dumps(rest, ensure_ascii=False, separators=(",", ":")) if rest else "any"


def tool_signature(tool: Tool) -> str:
    """One line describing ``tool`` as a call signature: ``name(arg: type, opt?: type = default): description``.

    Arguments in the schema's ``properties`` order; ``?`` marks an argument not in ``required``, ``= v`` its
    default; types as :func:`_schema_type` writes them. The argument descriptions are left out (the tool's own
    description says what it does); a schema without ``properties`` lists its compact JSON in the parentheses.
    About 40% of the tokens of the tool's :meth:`Tool.openai_dict` JSON (the ``toy-skills`` skills ``locate`` and
    ``count``: 198 vs 529 SmolLM2 tokens; with :func:`llava_plus`'s instructions the system text is 316 vs 664), for
    formats a model is trained on, whose training dialogues pay for every listed token at every step.
    """
    params = dict(tool.parameters)
    props = params.get("properties")
    if isinstance(props, Mapping):
        required = set(params.get("required", ()))
        args = []
        for name, schema in props.items():
            schema = schema if isinstance(schema, Mapping) else {}
            arg = f"{name}{'' if name in required else '?'}: {_schema_type(schema)}"
            if "default" in schema:
                arg += f" = {json.dumps(schema['default'], ensure_ascii=False)}"
            args.append(arg)
        inside = ", ".join(args)
    else:
        inside = _schema_type(params) if params else ""
    return f"{tool.name}({inside})" + (f": {tool.description}" if tool.description else "")


@dataclass(frozen=True)
class ToolResult:
    """A ``role: "tool"`` message: the result of the call ``tool_call_id`` (of tool ``name``)."""

    tool_call_id: str
    name: str
    content: str


def new_call_id() -> str:
    """``call_`` + 24 hex digits, as OpenAI's ids look."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCallFormat:
    """How a preset's model writes tool calls and reads tool results, as text.

    A call is ``open_tag + {"<name_key>": "<name>", "<arguments_key>": <arguments>} + close_tag``, the JSON
    laid out with ``key_separator`` / ``item_separator`` (also inside the arguments: the grammar enforces
    them, so whitespace is bounded); several calls are joined by ``call_separator``.

    Attributes:
        name: the format's registry name (``hermes``, ``vicuna-hermes``).
        system_template: system text listing the tools; ``{tools}`` is replaced by one JSON line per tool
            (:meth:`Tool.openai_dict`). Appended to the preset's or the request's system text.
        result_open / result_close: around each tool result in the turn that carries results.
        result_role: the chat role that turn is rendered as (``user`` for ChatML and Vicuna, which have no
            tool role).
        text_call_separator: between an assistant's free text and its first call.
        listing: how ``{tools}`` lists each tool: ``json`` (one :meth:`Tool.openai_dict` JSON line, the Hermes
            convention) or ``signature`` (one :func:`tool_signature` line, ~2.7x fewer tokens: for a trained format,
            whose training dialogues carry the listing).
    """

    name: str
    open_tag: str = "<tool_call>\n"
    close_tag: str = "\n</tool_call>"
    call_separator: str = "\n"
    name_key: str = "name"
    arguments_key: str = "arguments"
    key_separator: str = ": "
    item_separator: str = ", "
    system_template: str = (
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
        "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
        "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
    )
    result_open: str = "<tool_response>\n"
    result_close: str = "\n</tool_response>"
    result_separator: str = "\n"
    result_role: str = "user"
    text_call_separator: str = "\n"
    listing: str = "json"

    def __post_init__(self):
        if not self.open_tag.strip() or not self.close_tag.strip():
            raise ValueError(f"tool-call format {self.name!r}: open_tag and close_tag must not be blank")
        if "{tools}" not in self.system_template:
            raise ValueError(f"tool-call format {self.name!r}: system_template must contain {{tools}}")
        if self.listing not in ("json", "signature"):
            raise ValueError(f"tool-call format {self.name!r}: listing {self.listing!r}: expected json or signature")

    # ---------------------------------------------------------------------------------------------
    # prompt side
    def system_text(self, tools: Sequence[Tool], base: str = "") -> str:
        """``base`` (the preset's or request's system text) followed by the tool listing."""
        line = tool_signature if self.listing == "signature" else (
            lambda t: json.dumps(t.openai_dict(), ensure_ascii=False))
        listing = "\n".join(line(t) for t in tools)
        block = self.system_template.format(tools=listing)
        return f"{base.rstrip()}\n\n{block}" if base.strip() else block

    def dumps(self, value: Any) -> str:
        """JSON in this format's layout (the layout the grammar enforces)."""
        return json.dumps(value, ensure_ascii=False, separators=(self.item_separator, self.key_separator))

    def call_text(self, name: str, arguments: Mapping[str, Any] | str) -> str:
        """One call block. ``arguments`` as a dict or a JSON string (re-laid out; must be an object).

        Raises:
            ValueError: ``arguments`` is not a JSON object.
        """
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        if not isinstance(args, Mapping):
            raise ValueError(f"arguments of {name!r} must be a JSON object, got {type(args).__name__}")
        body = (f'{{{json.dumps(self.name_key)}{self.key_separator}{json.dumps(name)}{self.item_separator}'
                f'{json.dumps(self.arguments_key)}{self.key_separator}{self.dumps(dict(args))}}}')
        return self.open_tag + body + self.close_tag

    def assistant_text(self, text: str, calls: Sequence[ToolCall]) -> str:
        """An assistant turn that carried ``tool_calls``, as the model would have written it."""
        blocks = self.call_separator.join(self.call_text(c.name, c.arguments_json) for c in calls)
        if not calls:
            return text
        return f"{text.rstrip()}{self.text_call_separator}{blocks}" if text.strip() else blocks

    def results_text(self, results: Sequence[ToolResult]) -> str:
        """Consecutive ``tool`` messages, as one turn of role :attr:`result_role` (``{name}`` in
        :attr:`result_open` / :attr:`result_close` stands for the tool's name)."""
        return self.result_separator.join(self.result_open.replace("{name}", r.name) + r.content
                                          + self.result_close.replace("{name}", r.name) for r in results)

    # ---------------------------------------------------------------------------------------------
    # answer side
    def parse(self, text: str, *, id_factory: Callable[[], str] = new_call_id) -> "ParsedAnswer":
        """Split generated text into free text and calls (see :func:`parse_tool_calls`)."""
        return parse_tool_calls(text, self, id_factory=id_factory)


def hermes() -> ToolCallFormat:
    """Hermes-style blocks in ChatML (SmolLM2 presets): results come back in a user turn."""
    return ToolCallFormat(name="hermes")


def vicuna_hermes() -> ToolCallFormat:
    """The same blocks for NExT-GPT's Vicuna v0 template (``### Human: ... ### Assistant:``).

    The template has no system role and stops on ``###``: the tool listing is plain leading text, results
    come back as a ``### Human:`` turn. A decode loop that cuts text at stop strings must not cut inside a
    constrained call (the grammar ends it).
    """
    return ToolCallFormat(
        name="vicuna-hermes",
        system_template=(
            "The assistant can call functions. The available functions, one JSON per line, are within "
            "<tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, the assistant writes a JSON "
            "object with the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
            '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
            "A function's result comes back within <tool_response></tool_response> tags."
        ),
    )


LLAVA_PLUS_THOUGHTS = '"thoughts🤔" '
LLAVA_PLUS_ACTIONS = '"actions🚀" ['
LLAVA_PLUS_VALUE = '"value👉"'


def llava_plus() -> ToolCallFormat:
    """LLaVA-Plus's rendering (Liu et al., 2023, arXiv 2311.05437) of its four turns: human (image, question) ->
    assistant skill_use -> human skill_result -> assistant answer.

    - skill_use: ``"thoughts🤔" <why>`` then ``"actions🚀" [{"API_name": <skill>, "API_params": <arguments>}]`` then
      ``"value👉"`` (the call block is ``open_tag`` .. ``close_tag``; the thoughts are the turn's free text). Several
      calls repeat the block on new lines (LLaVA-Plus lists them in one array; its data has one per turn).
    - skill_result (a user turn): ``<skill> model outputs: <result JSON>`` then ``Please summarize the model outputs
      and answer my first question.``
    - answer: ``"thoughts🤔" <reading of the result>`` then ``"value👉" <answer>``. LLaVA-Plus writes an empty
      ``"actions🚀" []`` there; ours leaves the line out, because ``"actions🚀" [`` is the trigger after which the
      decode loop's grammar requires a complete call (a skill_use turn ends at its ``"value👉"``: the grammar ends the
      turn with the call).

    The call block's closing ``]\n"value👉"`` cannot occur inside the arguments (JSON laid out on one line), so a list
    argument such as a box does not end the block.
    """
    return ToolCallFormat(
        name="llava-plus",
        open_tag="\n" + LLAVA_PLUS_ACTIONS,
        close_tag="]\n" + LLAVA_PLUS_VALUE,
        call_separator="\n",
        name_key="API_name",
        arguments_key="API_params",
        system_template=(
            "Skills, one per line as name(arguments): what it does:\n{tools}\nTo use one: " + LLAVA_PLUS_THOUGHTS
            + "<why>\n" + LLAVA_PLUS_ACTIONS + '{{"API_name": <skill>, "API_params": <arguments>}}]\n' + LLAVA_PLUS_VALUE
            + "\nIts output comes back as: <skill> model outputs: <output>. Then answer: " + LLAVA_PLUS_THOUGHTS
            + "<reading of the output>\n" + LLAVA_PLUS_VALUE + " <answer>"
        ),
        result_open="{name} model outputs: ",
        result_close="\n\nPlease summarize the model outputs and answer my first question.",
        result_separator="\n\n",
        text_call_separator="",
        listing="signature",
    )


def llava_plus_answer(thoughts: str, answer: str) -> str:
    """An answer turn in :func:`llava_plus`'s rendering: ``"thoughts🤔" <thoughts>\n"value👉" <answer>``."""
    return f"{LLAVA_PLUS_THOUGHTS}{thoughts.strip()}\n{LLAVA_PLUS_VALUE} {answer.strip()}"


def llava_plus_value(text: str) -> str:
    """The answer of a turn in :func:`llava_plus`'s rendering: the text after its last ``"value👉"`` (stripped), or
    the whole text without one."""
    at = text.rfind(LLAVA_PLUS_VALUE)
    return (text[at + len(LLAVA_PLUS_VALUE):] if at >= 0 else text).strip()


TOOL_CALL_FORMATS: dict[str, Callable[[], ToolCallFormat]] = {"hermes": hermes, "vicuna-hermes": vicuna_hermes,
                                                              "llava-plus": llava_plus}


def tool_call_format(name: str) -> ToolCallFormat:
    """Registry lookup.

    Raises:
        ValueError: unknown name (lists the choices).
    """
    try:
        return TOOL_CALL_FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; choose from: {', '.join(TOOL_CALL_FORMATS)}") from None


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedAnswer:
    """Generated text split into parts.

    Attributes:
        text: the free text, call blocks removed (stripped at the seams).
        calls: the complete, well-formed calls in order.
        truncated: the text ended inside a call block (cut off by ``max_tokens``); that block is dropped.
        malformed: complete blocks whose JSON did not parse into ``{name, arguments: object}`` (kept in
            ``text`` verbatim, never turned into calls).
    """

    text: str
    calls: tuple[ToolCall, ...]
    truncated: bool = False
    malformed: int = 0


def _call_from_json(body: str, fmt: ToolCallFormat) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name, args = obj.get(fmt.name_key), obj.get(fmt.arguments_key, {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name) or not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def parse_tool_calls(text: str, fmt: ToolCallFormat, *, id_factory: Callable[[], str] = new_call_id) -> ParsedAnswer:
    """Split ``text`` into free text and :class:`ToolCall` s written in ``fmt``.

    Robust to a cut-off answer: an opening tag without its closing tag (at the end) is dropped and
    ``truncated`` set; a trailing partial opening tag (``"<tool_ca"``) is dropped too. Tags are matched
    ignoring the whitespace around them (``fmt.open_tag.strip()``), since an unconstrained model may not
    write the newlines.
    """
    open_t, close_t = fmt.open_tag.strip(), fmt.close_tag.strip()
    pieces: list[str] = []
    calls: list[ToolCall] = []
    truncated = False
    malformed = 0
    pos = 0
    while True:
        start = text.find(open_t, pos)
        if start < 0:
            tail = text[pos:]
            # a partial opening tag at the very end (the answer was cut while writing it)
            for k in range(len(open_t) - 1, 0, -1):
                if tail.endswith(open_t[:k]):
                    tail = tail[:-k]
                    truncated = True
                    break
            pieces.append(tail)
            break
        pieces.append(text[pos:start])
        end = text.find(close_t, start + len(open_t))
        if end < 0:
            truncated = True
            break
        body = text[start + len(open_t) : end].strip()
        hit = _call_from_json(body, fmt)
        if hit is None:
            malformed += 1
            pieces.append(text[start : end + len(close_t)])
        else:
            calls.append(ToolCall(id=id_factory(), name=hit[0], arguments_json=hit[1]))
        pos = end + len(close_t)
    free = "".join(p.strip("\n") if calls else p for p in pieces)
    return ParsedAnswer(text=free.strip() if calls or truncated else free, calls=tuple(calls),
                        truncated=truncated, malformed=malformed)


class StreamingToolCallParser:
    """Incremental :func:`parse_tool_calls` for streamed text deltas.

    :meth:`feed` returns ``(text_delta, calls)``: free text that can be shown now (a tail that may be the
    start of an opening tag is held back) and the calls completed by this delta. :meth:`finish` flushes.
    Inside a block nothing is shown; the call comes out whole when its closing tag arrives (OpenAI's
    protocol allows a call's arguments in one ``delta.tool_calls`` chunk).
    """

    def __init__(self, fmt: ToolCallFormat, *, id_factory: Callable[[], str] = new_call_id):
        self.fmt = fmt
        self.id_factory = id_factory
        self._open = fmt.open_tag.strip()
        self._close = fmt.close_tag.strip()
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self.malformed = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        shown: list[str] = []
        done: list[ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self._open)
                if i < 0:
                    hold = max((k for k in range(1, len(self._open)) if self._buf.endswith(self._open[:k])), default=0)
                    cut = len(self._buf) - hold
                    shown.append(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    break
                shown.append(self._buf[:i])
                self._buf = self._buf[i + len(self._open) :]
                self._in_call = True
            j = self._buf.find(self._close)
            if j < 0:
                break
            hit = _call_from_json(self._buf[:j].strip(), self.fmt)
            if hit is None:
                self.malformed += 1
                shown.append(self._open + self._buf[: j + len(self._close)])
            else:
                call = ToolCall(id=self.id_factory(), name=hit[0], arguments_json=hit[1])
                done.append(call)
                self.calls.append(call)
            self._buf = self._buf[j + len(self._close) :]
            self._in_call = False
        text = "".join(shown)
        if self.calls:  # blank lines that only separate blocks are not text
            text = text.strip("\n") if not text.strip() else text
        return text, done

    def finish(self) -> tuple[str, bool]:
        """Flush: ``(held-back text, truncated)``; an open block at the end is dropped (truncated)."""
        if self._in_call:
            self._buf = ""
            return "", True
        rest, self._buf = self._buf, ""
        return rest, False


def tools_from_openai(tools: Iterable[Mapping[str, Any]], *, param: str = "tools") -> list[Tool]:
    """OpenAI's ``tools`` list -> :class:`Tool` s.

    Raises:
        InvalidSchema: ``type`` other than ``function``, a missing or bad name, duplicate names, parameters
            that are not a JSON object; ``param`` names the entry (e.g. ``tools[2].function.name``).
    """
    out: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function":
            raise InvalidSchema("only type 'function' is supported", param=f"{param}[{i}].type")
        fn = t.get("function") or {}
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise InvalidSchema(f"must match {TOOL_NAME_RE.pattern}, got {name!r}", param=f"{param}[{i}].function.name")
        if name in seen:
            raise InvalidSchema(f"{name!r} is a duplicate tool name", param=f"{param}[{i}].function.name")
        seen.add(name)
        params = fn.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise InvalidSchema("must be a JSON schema object", param=f"{param}[{i}].function.parameters")
        out.append(Tool(name=name, parameters=params, description=str(fn.get("description") or ""),
                        strict=bool(fn.get("strict") or False)))
    return out
