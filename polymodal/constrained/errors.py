"""Typed errors of constrained decoding (no torch, no llguidance: the ingress may import them).

:class:`ConstraintError` and its subclasses are the caller's mistakes: the API answers them with a 400
whose ``param`` is :attr:`ConstraintError.param` (e.g. ``response_format.json_schema.schema``,
``tools[1].function.parameters``). :class:`TokenRejected` is the decode loop's bug (a token fed that the
mask did not allow): a 500.
"""

from __future__ import annotations


class ConstraintError(ValueError):
    """A request's grammar input cannot be used. ``param`` names the request field (OpenAI's error ``param``)."""

    def __init__(self, message: str, *, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message

    def __reduce__(self):  # pickled across Ray with its keyword-only ``param``
        return _rebuild, (type(self), self.reason, self.param)


def _rebuild(cls: type, message: str, param: str) -> ConstraintError:
    return cls(message, param=param)


class InvalidSchema(ConstraintError):
    """The schema (or tool list) is malformed, or uses a feature the grammar engine does not support."""


class SchemaTooLarge(ConstraintError):
    """The schema is over ``ConstraintLimits.max_schema_bytes`` (compact JSON bytes)."""


class CompileTimeout(ConstraintError):
    """Compiling the grammar took longer than ``ConstraintLimits.compile_timeout_s``."""


class TokenRejected(RuntimeError):
    """``accept(token_id)`` got a token the grammar does not allow in its state (a decode-loop bug:
    sample from the masked logits)."""
