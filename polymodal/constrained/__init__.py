"""Output formats defined by the request: grammar-constrained decoding (issue #22).

- :mod:`~polymodal.constrained.grammars` (no torch): ``response_format`` and tool-call grammars as
  llguidance grammar text, :class:`ConstraintLimits`, :func:`check` (validation without a tokenizer).
- :mod:`~polymodal.constrained.tools` (no torch): :class:`ToolCallFormat` (``hermes``, ``vicuna-hermes``),
  prompt rendering of tools / calls / results, and the parser of generated text into calls.
- :mod:`~polymodal.constrained.matcher` (torch): the tokenizer adapter, :class:`GrammarCompiler` (LRU
  cache), :class:`GrammarConstraint` (the per-request :class:`TokenConstraint` the decode loop drives).
- :mod:`~polymodal.constrained.errors`: :class:`ConstraintError` (a 400 naming ``param``), :class:`TokenRejected`.

This package imports no torch at import time; ``matcher`` names are loaded on first use.
"""

from polymodal.constrained.errors import CompileTimeout, ConstraintError, InvalidSchema, SchemaTooLarge, TokenRejected
from polymodal.constrained.grammars import (
    ConstraintLimits,
    Grammar,
    JsonLayout,
    ToolChoice,
    check,
    close_objects,
    json_object,
    json_schema,
    response_format,
    response_schema,
    tool_calls,
)
from polymodal.constrained.tools import (
    TOOL_CALL_FORMATS,
    ParsedAnswer,
    StreamingToolCallParser,
    Tool,
    ToolCall,
    ToolCallFormat,
    ToolResult,
    hermes,
    parse_tool_calls,
    tool_call_format,
    tools_from_openai,
    vicuna_hermes,
)

_MATCHER_NAMES = ("TokenConstraint", "GrammarConstraint", "GrammarCompiler", "CompiledGrammar", "TokenizerAdapter",
                  "tokenizer_adapter", "compiler_for", "constraint_for", "unpack_bitmask")


def __getattr__(name: str):
    if name in _MATCHER_NAMES:
        from polymodal.constrained import matcher

        return getattr(matcher, name)
    raise AttributeError(f"module 'polymodal.constrained' has no attribute {name!r}")


__all__ = [
    "CompileTimeout", "ConstraintError", "InvalidSchema", "SchemaTooLarge", "TokenRejected",
    "ConstraintLimits", "Grammar", "JsonLayout", "ToolChoice", "check", "close_objects", "json_object",
    "json_schema", "response_format", "response_schema", "tool_calls",
    "TOOL_CALL_FORMATS", "ParsedAnswer", "StreamingToolCallParser", "Tool", "ToolCall", "ToolCallFormat",
    "ToolResult", "hermes", "parse_tool_calls", "tool_call_format", "tools_from_openai", "vicuna_hermes",
    *_MATCHER_NAMES,
]
