"""``polymodal mcp``: polymodal as a Model Context Protocol server (issue #24), over the official ``mcp`` SDK's
low-level ``Server`` (the tools' schemas come from the service at start, so they are not Python signatures).

In front of either
- a running polymodal service (``url``; its API key from ``POLYMODAL_API_KEY``, else the first key of
  ``POLYMODAL_API_KEYS``, the variable ``polymodal serve`` reads): checked at start (``GET /v1/models`` and
  ``/v1/skills``); unreachable, or the key refused: :class:`~services.mcp_tools.StartError` within seconds; or
- the in-process pipeline (``preset``): the ingress app over a :class:`services.local.LocalBackend` (what
  ``polymodal serve --no-ray`` serves), reached through ``httpx.ASGITransport``, so the tools see the same API.

Transports: ``stdio`` (the host starts the command; nothing else may write to stdout, so the pipeline is loaded
after the SDK has moved fd 1 to stderr) and ``http`` (the SDK's streamable HTTP app at ``http://HOST:PORT/mcp``,
under uvicorn).

Tools, arguments and results: :mod:`services.mcp_tools`. Long calls report progress (``notifications/progress``,
seconds elapsed) when the caller sent a progress token; a call the client cancels (``notifications/cancelled``)
is interrupted by the SDK, which closes its HTTP request to polymodal, and the ingress cancels that request's
LLM generation and renders (a client that went away).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from services.mcp_tools import PolymodalTools, StartError

SERVER_NAME = "polymodal"
IN_PROCESS_BASE_URL = "http://polymodal.in-process"
"""The base URL of the in-process app (artifact URLs in its answers use it; nothing listens there)."""

API_KEY_ENV = "POLYMODAL_API_KEY"
"""The API key sent to a service given by URL (``Authorization: Bearer``); else the first of
``POLYMODAL_API_KEYS``."""


def api_key_from_env(env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    key = env.get(API_KEY_ENV, "").strip()
    if key:
        return key
    keys = [k.strip() for k in env.get("POLYMODAL_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def service_root(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/``, ``http://host:8000/v1`` -> ``http://host:8000``.

    Raises:
        ValueError: not an http(s) URL.
    """
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http(s) URL of a polymodal service, got {url!r}")
    return u.removesuffix("/v1")


@dataclass
class Target:
    """Where the tools send their requests: the HTTP client and what to close after (the in-process backend)."""

    http: httpx.AsyncClient
    backend: Any = None

    async def close(self) -> None:
        await self.http.aclose()
        if self.backend is not None:
            await self.backend.close()


def remote_target(url: str, api_key: str | None = None, connect_timeout_s: float = 5.0) -> Target:
    """An HTTP client for the service at ``url`` (no read timeout: the service bounds its requests itself)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return Target(httpx.AsyncClient(base_url=service_root(url), headers=headers,
                                    timeout=httpx.Timeout(None, connect=connect_timeout_s)))


def in_process_target(preset: str, *, device: str | None = None, export_dir: str | None = None,
                      settings: Any = None) -> Target:
    """Load ``preset`` in this process (the backend and skills of ``polymodal serve --no-ray``) and an HTTP client
    that reaches its app through ASGI.

    Raises:
        polymodal.preflight.StartupError / ValueError: a bad preset or path. The stages' load errors.
    """
    from polymodal.preflight import check_start
    from services.app import AppArgs
    from services.ingress import build_app
    from services.run import local_backend
    from services.settings import ServerSettings

    check_start(preset, export_dir=export_dir)
    args = AppArgs.model_validate({"preset": preset, "device": device, "export_dir": export_dir})
    backend = local_backend(args)
    app = build_app(backend, settings or ServerSettings())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=IN_PROCESS_BASE_URL,
                             timeout=httpx.Timeout(None))
    return Target(http, backend)


def build_server(tools: PolymodalTools):
    """The MCP server (``mcp.server.lowlevel.Server``) over ``tools``: ``tools/list`` and ``tools/call``."""
    import mcp_types as types
    from mcp.server.lowlevel import Server

    async def list_tools(ctx, params) -> types.ListToolsResult:  # noqa: ARG001
        return types.ListToolsResult(tools=tools.tools())

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await tools.call(params.name, params.arguments, ctx.session.report_progress)

    model = tools.model.get("id", "?")
    return Server(SERVER_NAME, version="0.1.0", title="polymodal",
                  instructions=f"polymodal ({model}): any-to-any generation (images, sounds, videos), chat with media "
                               "in and out, and vision skills. Media arguments are data URLs or base64.",
                  on_list_tools=list_tools, on_call_tool=call_tool)


@contextlib.asynccontextmanager
async def open_tools(target: Target, timeout_s: float = 10.0) -> AsyncIterator[PolymodalTools]:
    """:meth:`PolymodalTools.connect` over ``target``, closed (with its backend) on exit.

    Raises:
        StartError: the service cannot be used.
    """
    try:
        yield await PolymodalTools.connect(target.http, timeout_s)
    finally:
        await target.close()


async def run_stdio(make_target, log=sys.stderr) -> None:
    """Serve over stdin / stdout. ``make_target()`` runs after the SDK has moved fd 1 to stderr (loading a
    pipeline prints nothing onto the protocol's stream).

    Raises:
        StartError: the service cannot be used (the host sees the process exit).
    """
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        async with open_tools(make_target()) as tools:
            print(f"polymodal mcp: {len(tools.defs)} tools over stdio ({tools.model.get('id')})", file=log,
                  flush=True)
            server = build_server(tools)
            await server.run(read, write, server.create_initialization_options())


def http_app(tools: PolymodalTools, host: str = "127.0.0.1"):
    """The streamable HTTP app (Starlette) of the MCP server at ``/mcp``."""
    return build_server(tools).streamable_http_app(host=host)


async def run_http(make_target, host: str, port: int, log=sys.stderr) -> None:
    """Serve streamable HTTP at ``http://host:port/mcp`` until interrupted.

    Raises:
        StartError: the service cannot be used.
    """
    import uvicorn

    async with open_tools(make_target()) as tools:
        app = http_app(tools, host)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        print(f"polymodal mcp: {len(tools.defs)} tools at http://{host}:{port}/mcp ({tools.model.get('id')})",
              file=log, flush=True)
        await server.serve()


def mcp_main(*, url: str | None = None, preset: str | None = None,
             transport: Literal["stdio", "http"] = "stdio", host: str = "127.0.0.1", port: int = 8765,
             device: str | None = None, export_dir: str | None = None) -> None:
    """Run the MCP server until the host closes it (stdio) or Ctrl-C (http).

    Raises:
        ValueError: not exactly one of ``url`` / ``preset``, a bad URL or transport.
        StartError: the service cannot be used. The pipeline's load errors (``preset``).
    """
    import anyio

    if (url is None) == (preset is None):
        raise ValueError("give exactly one of --url (a running polymodal service) or --preset (an in-process "
                         "pipeline)")
    if transport not in ("stdio", "http"):
        raise ValueError(f"unknown transport {transport!r}; choose from: stdio, http")
    if url is not None:
        root = service_root(url)

        def make_target() -> Target:
            return remote_target(root, api_key_from_env())
    else:
        def make_target() -> Target:
            return in_process_target(preset, device=device, export_dir=export_dir)

    try:
        if transport == "stdio":
            anyio.run(run_stdio, make_target)
        else:
            anyio.run(run_http, make_target, host, port)
    except Exception as e:
        inner = single_error(e)
        if inner is not e:  # raised inside the SDK's task groups: the error itself, not a group of one
            raise inner from None
        raise


def single_error(e: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one error each; ``e`` itself otherwise."""
    while isinstance(getattr(e, "exceptions", None), tuple) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e
