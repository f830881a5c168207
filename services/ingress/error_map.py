"""Error mapping: every failure becomes OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

- :class:`services.errors.APIError` (and its kinds: Overloaded, RenderFailed, ...): its own status and headers.
- Request validation (pydantic): 400 naming the field as a dotted path (``messages[0].content[1].image_url``);
  a body that is not JSON: 400 ``invalid_json``.
- Starlette's HTTP errors (404 route, 405 method, 413 from the body limit): their status, our body.
- Anything else: 500 ``internal_error`` (logged), never a stack trace to the client.
- A stage's exception (:func:`stage_error`): a ``ValueError`` of the LLM stage (it refuses the conversation) is
  the caller's mistake (400; a ``ConstraintError``, a schema the grammar engine refused, names its field); any
  other is a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymodal.constrained.errors import ConstraintError

from services.errors import APIError, bad_request

log = logging.getLogger(__name__)


def loc_to_param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "list[...]", 1, "image_url")`` -> ``messages[0].content[1].image_url``."""
    out = ""
    for item in loc:
        if item in ("body", "query", "path"):
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str) and (any(c in item for c in "[(-") or item in ("str", "int", "float", "bool")):
            continue  # union-member tags pydantic adds to the location
        else:
            out += f".{item}" if out else str(item)
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's errors -> one 400 naming the most specific field (and how many more problems there are)."""
    if not errors:
        errors = [{"loc": (), "msg": "invalid request"}]
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    # for a union (content: str | list of parts) pydantic reports one error per member: the deepest
    # location names the part that is actually wrong
    first = bad_json[0] if bad_json else max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    param = loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param, code="invalid_value")


def stage_error(e: BaseException) -> APIError:
    """A model stage's exception as the API error the client gets."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ConstraintError):  # a schema the grammar engine refused with the tokenizer: names the field
        return bad_request(str(e).splitlines()[0], param=e.param, code="invalid_schema")
    if isinstance(e, ValueError):  # the LLM stage refuses the conversation (caller's mistake)
        return bad_request(str(e).splitlines()[0] if str(e) else "invalid request", code="invalid_request")
    log.error("stage failure: %r", e, exc_info=e)
    return APIError(500, f"internal error in a model stage ({type(e).__name__})", type="server_error",
                    code="internal_error")


async def api_error_handler(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def validation_handler(_: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(list(e.errors()))
    return JSONResponse(err.body(), status_code=400)


async def http_error_handler(_: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status_code, "invalid_request_error")
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    err = APIError(e.status_code, str(e.detail), type=kind, code=code)
    return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))


async def internal_error_handler(_: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    err = APIError(500, f"internal server error ({type(e).__name__})", type="server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
