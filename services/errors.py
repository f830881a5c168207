"""API errors with the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``.

Every failure the ingress reports is an :class:`APIError` (or is mapped to one): 4xx for the caller's
mistakes, 5xx for ours. Backends translate host-specific failures (Ray's ``BackPressureError``, a
decoder's per-item failure) into the errors below, so the ingress never imports Ray.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error answered with the OpenAI error body.

    Attributes:
        status: HTTP status code.
        message: human-readable explanation (what was wrong and what is allowed).
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ``server_error``, ...).
        param: the request field at fault (dotted path, e.g. ``image.height_px``), or ``None``.
        code: a short machine-readable code (``model_not_found``, ``timeout``, ...), or ``None``.
        headers: extra response headers (``Retry-After`` for 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # picklable across Ray with its keyword arguments
        return (_rebuild_api_error, (type(self), self.status, self.message, self.type, self.param, self.code,
                                     self.headers))


def _rebuild_api_error(cls, status, message, type_, param, code, headers):
    err = cls.__new__(cls)
    APIError.__init__(err, status, message, type=type_, param=param, code=code, headers=headers)
    return err


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


class Overloaded(APIError):
    """503: the service (or one of its stages) has no room for another request; retry later."""

    def __init__(self, message: str = "the server is at capacity; retry later", retry_after_s: int = 1):
        super().__init__(503, message, type="server_error", code="overloaded",
                         headers={"Retry-After": str(int(retry_after_s))})


class RenderFailed(APIError):
    """500: a decoder could not render this request's medium (the other items of its batch are unaffected)."""

    def __init__(self, message: str):
        super().__init__(500, message, type="server_error", code="generation_failed")


class StageUnavailable(APIError):
    """503: a stage is not running (not deployed, unhealthy, or failed to load its weights)."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(503, message, type="server_error", code="stage_unavailable",
                         headers={"Retry-After": str(int(retry_after_s))})


class Cancelled(Exception):
    """The work was cancelled (client disconnect or request timeout); never shown to a client as such."""
