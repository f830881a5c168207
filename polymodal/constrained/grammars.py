"""Grammars for the request-defined output formats, as llguidance grammar text (no torch).

Three kinds, each a :class:`Grammar` whose ``text`` is canonical (the compile cache's key):

- ``json_object``: any JSON object (``response_format: {"type": "json_object"}``);
- ``json_schema``: OpenAI's ``response_format.json_schema.schema`` (``strict`` closes objects);
- ``tool_calls``: calls in a preset's :class:`~polymodal.constrained.tools.ToolCallFormat`, one per tool
  name with its arguments' schema, for ``tool_choice`` ``required`` / a named function / ``auto`` and
  ``parallel_tool_calls``.

Whitespace inside JSON is fixed by :class:`JsonLayout` (llguidance's ``whitespace_flexible: false`` with
literal separators), so a small or random model cannot loop on it. Engine: llguidance (one Rust wheel, no
dependencies); grammar syntax: its Lark dialect with inline ``%json`` (llguidance ``docs/syntax.md``).
:func:`check` validates a grammar without a tokenizer, so the ingress can turn a bad schema into a 400
before any model work.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polymodal.constrained.errors import InvalidSchema, SchemaTooLarge
from polymodal.constrained.tools import Tool, ToolCallFormat

_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _regex_literal(s: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in s)


def _lark_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


@dataclass(frozen=True)
class JsonLayout:
    """The whitespace of constrained JSON: none except these literal separators (``json.dumps`` style)."""

    item_separator: str = ", "
    key_separator: str = ": "

    def x_guidance(self) -> dict[str, Any]:
        """llguidance's per-schema JSON options (its ``x-guidance`` key)."""
        return {
            "whitespace_flexible": False,
            "item_separator": _regex_literal(self.item_separator),
            "key_separator": _regex_literal(self.key_separator),
        }


@dataclass(frozen=True)
class ConstraintLimits:
    """Bounds on request-defined grammars (the server's settings; over a bound is a 400).

    Attributes:
        max_entries: compiled grammars kept (LRU) per tokenizer.
        max_schema_bytes: a schema's (or all tools' schemas') size as compact JSON.
        compile_timeout_s: wall time allowed for one compile.
        max_parallel_calls: calls in one answer with ``parallel_tool_calls`` (bounds a looping model).
    """

    max_entries: int = 256
    max_schema_bytes: int = 64 * 1024
    compile_timeout_s: float = 5.0
    max_parallel_calls: int = 8

    def __post_init__(self):
        if (self.max_entries < 1 or self.max_schema_bytes < 2 or self.compile_timeout_s <= 0
                or self.max_parallel_calls < 1):
            raise ValueError(f"ConstraintLimits out of range: {self}")


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar and where it came from.

    Attributes:
        kind: ``json_object`` | ``json_schema`` | ``tool_calls``.
        text: llguidance grammar text (canonical: equal requests give equal text; the cache key).
        param: the request field an error about it names (``response_format.json_schema.schema``, ``tools``).
        parts: for ``tool_calls``: per tool, ``(field of its parameters, grammar of them alone)``, to blame
            one tool when the whole fails.
        special_ids: special token ids the grammar itself admits (``tool_calls(free_special_ids=...)``);
            every other special token stays masked.
        free_text_until: the answer is free text up to the first occurrence of this string (``tool_calls``
            under ``auto``: the opening tag), structured after it; ``None``: structured from the first token.
            A decode loop applies the chat template's stop strings to the free text only, never inside the
            structure (NExT-GPT's Vicuna stops on ``###``, which a JSON string may hold).
    """

    kind: str
    text: str
    param: str
    parts: tuple[tuple[str, str], ...] = ()
    special_ids: tuple[int, ...] = ()
    free_text_until: str | None = None


def _compact_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _check_size(value: Any, limits: ConstraintLimits, param: str) -> None:
    try:
        n = _compact_size(value)
    except (TypeError, ValueError) as e:
        raise InvalidSchema(f"not JSON-serialisable: {e}", param=param) from e
    if n > limits.max_schema_bytes:
        raise SchemaTooLarge(f"schema is {n} bytes as compact JSON; the limit is {limits.max_schema_bytes}",
                             param=param)


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not")


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema with ``properties`` and no ``additionalProperties``
    gets ``additionalProperties: false`` (OpenAI's strict mode requires it; here we fill it in).

    Objects combined through ``allOf`` / ``$ref`` siblings are left open (closing each part of an
    intersection would reject the union of their keys). The result validates a subset of what ``schema``
    does, so an answer valid for it is valid for the caller's schema.
    """
    schema = copy.deepcopy(schema)

    def walk(s: Any) -> None:
        if not isinstance(s, dict):
            return
        if ("properties" in s and "additionalProperties" not in s
                and not any(k in s for k in ("allOf", "$ref", "unevaluatedProperties"))):
            s["additionalProperties"] = False
        for k in _SUBSCHEMA_MAPS:
            if isinstance(s.get(k), dict):
                for v in s[k].values():
                    walk(v)
        for k in _SUBSCHEMA_LISTS:
            if isinstance(s.get(k), list):
                for v in s[k]:
                    walk(v)
        for k in _SUBSCHEMA_ONE:
            walk(s.get(k))

    walk(schema)
    return schema


def _with_layout(schema: Mapping[str, Any], layout: JsonLayout) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if k != "x-guidance"}  # the caller never sets engine options
    return {"x-guidance": layout.x_guidance(), **out}


def json_object(layout: JsonLayout = JsonLayout()) -> Grammar:
    """Any JSON object (nothing else: no array, no scalar, no leading or trailing whitespace)."""
    return Grammar("json_object", _json_grammar({"type": "object"}, layout), "response_format")


def _json_grammar(schema: Mapping[str, Any], layout: JsonLayout) -> str:
    return "%llguidance {}\nstart: body\nbody: %json " + json.dumps(_with_layout(schema, layout), ensure_ascii=False)


def json_schema(
    schema: Any,
    *,
    strict: bool = False,
    layout: JsonLayout = JsonLayout(),
    limits: ConstraintLimits = ConstraintLimits(),
    param: str = "response_format.json_schema.schema",
) -> Grammar:
    """A JSON value that validates against ``schema`` (JSON Schema draft 2020-12, llguidance's coverage).

    ``strict`` (OpenAI's flag) closes objects that leave ``additionalProperties`` unsaid
    (:func:`close_objects`); the schema is enforced either way (OpenAI's non-strict mode is best effort;
    ours never is). Properties come out in the schema's order.

    Raises:
        SchemaTooLarge: over ``limits.max_schema_bytes``.
        InvalidSchema: not a JSON object. (Unsupported keywords surface in :func:`check`.)
    """
    if not isinstance(schema, Mapping):
        raise InvalidSchema(f"a JSON schema must be an object, got {type(schema).__name__}", param=param)
    _check_size(schema, limits, param)
    if strict:
        schema = close_objects(dict(schema))
    return Grammar("json_schema", _json_grammar(schema, layout), param)


def response_format(
    value: Mapping[str, Any] | None,
    *,
    layout: JsonLayout = JsonLayout(),
    limits: ConstraintLimits = ConstraintLimits(),
    param: str = "response_format",
) -> Grammar | None:
    """OpenAI's ``response_format`` dict -> a grammar (``None`` for absent or ``{"type": "text"}``).

    Raises:
        InvalidSchema / SchemaTooLarge: naming ``response_format.type`` / ``...json_schema.schema`` etc.
    """
    answer = response_schema(value, limits=limits, param=param)
    if answer is None:
        return None
    schema, where = answer
    if where == param:
        return json_object(layout)
    return Grammar("json_schema", _json_grammar(schema, layout), where)


def response_schema(
    value: Mapping[str, Any] | None,
    *,
    limits: ConstraintLimits = ConstraintLimits(),
    param: str = "response_format",
) -> tuple[dict[str, Any], str] | None:
    """OpenAI's ``response_format`` -> ``(the JSON schema the answer must match, the field an error names)``;
    ``None`` for absent or ``{"type": "text"}``. ``json_object`` is ``{"type": "object"}`` (named ``param``);
    a strict ``json_schema`` comes with its objects closed (:func:`close_objects`).

    Raises:
        InvalidSchema / SchemaTooLarge: naming ``response_format.type`` / ``...json_schema.schema`` etc.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidSchema('must be an object such as {"type": "json_object"}', param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, param
    if kind == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, Mapping):
            raise InvalidSchema("json_schema must be an object {name, schema, strict}", param=f"{param}.json_schema")
        if "schema" not in js:
            raise InvalidSchema("a schema is required", param=f"{param}.json_schema.schema")
        where = f"{param}.json_schema.schema"
        schema = js["schema"]
        if not isinstance(schema, Mapping):
            raise InvalidSchema(f"a JSON schema must be an object, got {type(schema).__name__}", param=where)
        _check_size(schema, limits, where)
        return (close_objects(dict(schema)) if js.get("strict") else dict(schema)), where
    raise InvalidSchema(f"unknown type {kind!r}; choose from: text, json_object, json_schema", param=f"{param}.type")


# --------------------------------------------------------------------------------------------------
# Tool calls


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's ``tool_choice``: ``mode`` is ``auto`` | ``none`` | ``required`` | ``function`` (then ``name``)."""

    mode: str = "auto"
    name: str | None = None

    def __post_init__(self):
        if self.mode not in ("auto", "none", "required", "function"):
            raise ValueError(f"unknown tool_choice mode {self.mode!r}; choose from: auto, none, required, function")
        if (self.mode == "function") != (self.name is not None):
            raise ValueError("tool_choice: a name goes with mode 'function' only")

    @classmethod
    def from_openai(cls, value: Any, tool_names: Sequence[str], *, param: str = "tool_choice") -> "ToolChoice":
        """``"auto"`` / ``"none"`` / ``"required"`` / ``{"type": "function", "function": {"name": ...}}``.

        Raises:
            InvalidSchema: an unknown string, a malformed object, or a name not in ``tool_names``.
        """
        if value is None:
            return cls("auto")
        if isinstance(value, str):
            if value in ("auto", "none", "required"):
                return cls(value)
            raise InvalidSchema(f"unknown value {value!r}; choose from: auto, none, required, or a function",
                                param=param)
        fn = value.get("function") if isinstance(value, Mapping) else None
        if isinstance(value, Mapping) and value.get("type") == "function" and isinstance(fn, Mapping):
            name = fn.get("name")
            if name not in tool_names:
                raise InvalidSchema(f"function {name!r} is not in tools ({', '.join(tool_names) or 'none given'})",
                                    param=f"{param}.function.name")
            return cls("function", name)
        raise InvalidSchema('must be a string or {"type": "function", "function": {"name": ...}}', param=param)


def _args_schema(tool: Tool, param: str) -> dict[str, Any]:
    params = dict(tool.parameters) or {"type": "object"}
    t = params.get("type", "object")
    if t != "object":
        raise InvalidSchema(f"the arguments' schema must have type 'object', got {t!r}", param=param)
    params["type"] = "object"
    return params


def tool_calls(
    tools: Sequence[Tool],
    choice: ToolChoice,
    fmt: ToolCallFormat,
    *,
    parallel: bool = True,
    strict: bool = False,
    free_special_ids: Sequence[int] = (),
    answer: tuple[Mapping[str, Any], str] | None = None,
    limits: ConstraintLimits = ConstraintLimits(),
    param: str = "tools",
) -> Grammar | None:
    """The grammar of an answer under ``tool_choice`` (``None`` for ``none``: no constraint).

    - ``required``: one call of any tool (``parallel``: 1 to ``limits.max_parallel_calls`` calls joined by
      ``fmt.call_separator``), nothing else: never plain text.
    - ``function``: exactly one call of that tool.
    - ``auto``: free text without the opening tag (the answer may end there), or free text then call(s):
      once the model writes the opening tag (``fmt.open_tag.strip()``), the call must be complete and valid.
    Each call is ``{"<name_key>": "<one tool's name>", "<arguments_key>": <that tool's arguments>}`` in the
    format's layout; ``strict`` (or a tool's own ``Tool.strict``) closes the arguments' objects
    (:func:`close_objects`).

    ``free_special_ids``: token ids (of the tokenizer the grammar is compiled for) allowed between pieces of
    the free text under ``auto``, e.g. the signal tokens of the modalities the answer may contain (teacher-
    forced group completion stays possible: any order is accepted). Nothing special is allowed anywhere
    else. :func:`check` cannot resolve ids without a tokenizer: the ingress checks the grammar built
    without them (same structure), the LLM side compiles the one with them.

    ``answer``: ``(schema, field)`` from :func:`response_schema` when the request also sets a JSON
    ``response_format``: under ``auto`` the answer is then either that JSON (no free text, no media tokens)
    or call(s) from the first token; ``required`` / named choices ignore it (the JSON answer comes in a later
    turn). ``none`` gives ``None`` here: the caller uses :func:`response_format` alone.

    Raises:
        InvalidSchema: no tools, a parameters schema that is not an object schema.
        SchemaTooLarge: the tools' schemas together over ``limits.max_schema_bytes``.
    """
    if choice.mode == "none":
        return None
    if not tools:
        raise InvalidSchema("tool_choice needs at least one tool", param=param)
    _check_size([dict(t.parameters) for t in tools], limits, param)
    names = [t.name for t in tools]
    if choice.mode == "function":
        if choice.name not in names:
            raise InvalidSchema(f"function {choice.name!r} is not in tools", param="tool_choice.function.name")
        chosen = [(i, t) for i, t in enumerate(tools) if t.name == choice.name]
    else:
        chosen = list(enumerate(tools))
    layout = JsonLayout(fmt.item_separator, fmt.key_separator)
    special: tuple[int, ...] = ()
    trigger = fmt.open_tag.strip()
    at = fmt.open_tag.index(trigger)
    lead, rest_open = fmt.open_tag[:at], fmt.open_tag[at + len(trigger):]
    lines = ["%llguidance {}"]
    bodies: list[str] = []
    parts: list[tuple[str, str]] = []
    for k, (i, t) in enumerate(chosen):
        p = f"{param}[{i}].function.parameters"
        schema = _args_schema(t, p)
        if strict or t.strict:
            schema = close_objects(schema)
        head = (f"{{{json.dumps(fmt.name_key)}{fmt.key_separator}{json.dumps(t.name)}{fmt.item_separator}"
                f"{json.dumps(fmt.arguments_key)}{fmt.key_separator}")
        lines.append(f"after_{k}: {_lark_literal(rest_open + head)} args_{k} {_lark_literal('}' + fmt.close_tag)}")
        args_json = json.dumps(_with_layout(schema, layout), ensure_ascii=False)
        lines.append(f"args_{k}: %json {args_json}")
        bodies.append(f"after_{k}")
        parts.append((p, f"%llguidance {{}}\nstart: body\nbody: %json {args_json}"))
    lines.append("after_open: " + " | ".join(bodies))
    open_lit = _lark_literal(lead + trigger) if lead else _lark_literal(trigger)
    lines.append(f"call: {open_lit} after_open")
    n_more = limits.max_parallel_calls - 1 if parallel and choice.mode != "function" else 0
    more = f" (CALL_SEP call){{0,{n_more}}}" if n_more > 0 else ""
    if n_more > 0:
        lines.append(f"CALL_SEP: {_lark_literal(fmt.call_separator)}")
    free_until = None
    if choice.mode == "auto" and answer is not None:
        # a JSON answer (response_format) or call(s): nothing free
        a_schema, a_param = answer
        a_json = json.dumps(_with_layout(a_schema, layout), ensure_ascii=False)
        lines.append(f"answer: %json {a_json}")
        parts.append((a_param, f"%llguidance {{}}\nstart: body\nbody: %json {a_json}"))
        lines.append(f"start: answer | call{more}")
    elif choice.mode == "auto":
        free_until = trigger
        # free text that never contains the trigger, or the shortest text ending in it (lazy) then a call
        t_re = _regex_literal(trigger)
        lines.append(f"FREE: /(?s:.*)/ & ~/(?s:.*){t_re}(?s:.*)/")
        lines.append(f"head[lazy]: /(?s:.*)/ {_lark_literal(trigger)}")
        if free_special_ids:
            # text pieces and these special tokens (signal tokens: media in a free answer), in any order
            special = tuple(sorted({int(i) for i in free_special_ids}))
            ids = ",".join(map(str, special))
            lines.append(f"free: (FREE | <[{ids}]>)*")
            lines.append(f"start: free | free head after_open{more}")
        else:
            lines.append(f"start: FREE | head after_open{more}")
    else:
        lines.append(f"start: call{more}")
    return Grammar("tool_calls", "\n".join(lines), param, tuple(parts), special if free_until is not None else (),
                   free_until)


# --------------------------------------------------------------------------------------------------
# Validation without a tokenizer


def check(grammar: Grammar) -> None:
    """Validate ``grammar`` with llguidance (no tokenizer: the ingress can call it; ~ms).

    Raises:
        InvalidSchema: the engine's message, naming ``grammar.param`` or, for tool calls, the tool whose
            parameters fail (``tools[i].function.parameters``).
    """
    from llguidance import LLMatcher

    err, msgs = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(grammar.text), None)
    if err:
        raise InvalidSchema(_engine_message(msgs), param=blame(grammar, msgs))


def _engine_message(msgs: Sequence[str]) -> str:
    msg = "; ".join(m.strip() for m in msgs) or "the grammar engine refused it"
    return f"unsupported or malformed schema: {msg[:500]}"


def blame(grammar: Grammar, msgs: Sequence[str] = ()) -> str:
    """The request field to name for an error in ``grammar``: for tool calls, the first tool whose
    parameters alone fail validation (else ``grammar.param``)."""
    from llguidance import LLMatcher

    for param, text in grammar.parts:
        if LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(text), None)[0]:
            return param
    return grammar.param
