"""The ingress as a package: no module over 450 lines, one router per resource, routes and handlers defined at
module level (never closures inside ``build_app``), the whole endpoint list kept, the contract documented."""

from __future__ import annotations

from pathlib import Path

from fastapi.routing import APIRoute

import services.ingress
from services.ingress import build_app
from services.local import LocalBackend
from services.settings import ServerSettings
from tests.serve_fakes import fake_stages

PACKAGE = Path(services.ingress.__file__).parent
MAX_LINES = 450

# (methods, path, router module) of every endpoint of the contract
ENDPOINTS = {
    ("POST", "/v1/chat/completions", "chat"),
    ("POST", "/v1/images/generations", "generations"),
    ("POST", "/v1/audio/generations", "generations"),
    ("POST", "/v1/images/edits", "edits"),
    ("POST", "/v1/audio/speech", "speech"),
    ("GET", "/v1/audio/voices", "speech"),
    ("POST", "/v1/audio/transcriptions", "transcriptions"),
    ("POST", "/v1/videos", "videos"),
    ("GET", "/v1/videos/{video_id}", "videos"),
    ("GET", "/v1/videos/{video_id}/content", "videos"),
    ("GET", "/v1/artifacts/{name}", "artifacts"),
    ("GET", "/v1/skills", "skills"),
    ("GET", "/v1/skills/{name}", "skills"),
    ("POST", "/v1/skills/{name}", "skills"),
    ("GET", "/v1/models", "system"),
    ("GET", "/v1/models/{model_id}", "system"),
    ("GET", "/health", "system"),
    ("GET", "/ready", "system"),
    ("GET", "/metrics", "system"),
    ("GET", "/", "page"),
    ("GET", "/page/{name}", "page"),
}


def _app():
    preset, llm, decoders = fake_stages()
    return build_app(LocalBackend(preset, llm, decoders), ServerSettings())


def _api_routes(routes):
    """Every APIRoute of ``app.routes``, through included routers (FastAPI >= 0.165 keeps an included router as
    one entry of ``app.routes``, its routes in ``original_router.routes``; older versions flatten them)."""
    for r in routes:
        if isinstance(r, APIRoute):
            yield r
        elif getattr(r, "original_router", None) is not None:
            yield from _api_routes(r.original_router.routes)


def test_no_ingress_module_is_over_450_lines():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10, files  # a package of modules, not one file
    sizes = {str(f.relative_to(PACKAGE)): len(f.read_text().splitlines()) for f in files}
    too_big = {k: n for k, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"over {MAX_LINES} lines: {too_big}"
    assert not (PACKAGE.parent / "ingress.py").exists()  # the old module is gone (it would be shadowed)


def test_routes_are_module_level_functions_on_one_router_per_resource():
    app = _app()
    routes = list(_api_routes(app.routes))
    got = set()
    for r in routes:
        ep = r.endpoint
        assert "<locals>" not in ep.__qualname__, f"{r.path}: {ep.__qualname__} is a closure"
        assert ep.__module__.startswith("services.ingress.routes."), (r.path, ep.__module__)
        for method in r.methods:
            got.add((method, r.path, ep.__module__.rsplit(".", 1)[1]))
    assert got == ENDPOINTS
    # FastAPI's own documentation routes (/openapi.json, /docs, ...) are its closures, not ours
    others = [r for r in app.routes if getattr(r, "endpoint", None) is not None and not isinstance(r, APIRoute)]
    assert all(r.path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc") for r in others), others


def test_error_handlers_and_lifespan_are_module_level():
    app = _app()
    handlers = app.exception_handlers
    assert {"APIError", "RequestValidationError", "HTTPException", "Exception"} <= {
        k.__name__ for k in handlers if isinstance(k, type)}
    for h in handlers.values():
        assert "<locals>" not in h.__qualname__, h.__qualname__
    assert app.state.service.__class__.__module__ == "services.ingress.service"


def test_the_contract_is_the_package_docstring():
    doc = services.ingress.__doc__
    for needle in ("POST /v1/chat/completions", "Streaming (``stream: true``)", "delta: {\"images\": [item]}",
                   "The answer's shape", "message.images", "GET /v1/artifacts/{id}.{ext}", "architecture",
                   "data: [DONE]", "Retry-After", "message.boxes", "box_overlay", "crf",
                   "413", "504", "allowed_remote_hosts"):
        assert needle in doc, needle
    # every module says what it is for
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text().lstrip()
        assert text.startswith('"""'), f"{f.name} has no module docstring"
