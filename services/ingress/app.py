"""``build_app``: the FastAPI app of the ingress over a backend (the one public entry)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref

from fastapi import FastAPI

from services.ingress.error_map import install_error_handlers
from services.ingress.middleware import BodyLimit, RequestMetrics
from services.ingress.routes import ROUTERS
from services.ingress.service import IngressService
from services.protocol import Backend
from services.settings import ServerSettings
from services.store import FileStore


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.service.videos.cancel_all()


def _default_store(settings: ServerSettings) -> FileStore:
    root = settings.store_dir or tempfile.mkdtemp(prefix="polymodal-store-")
    store = FileStore(root, ttl_s=settings.artifact_ttl_s)
    if not settings.store_dir:  # our own temp folder: removed with the store (or at exit)
        weakref.finalize(store, shutil.rmtree, root, ignore_errors=True)
    return store


def build_app(backend: Backend, settings: ServerSettings | None = None, *, store: FileStore | None = None) -> FastAPI:
    """The FastAPI app over ``backend`` (see the contract in :mod:`services.ingress`).

    Args:
        backend: the stages (:class:`services.local.LocalBackend`, :class:`services.ray_backend.RayBackend`
            or a test fake).
        settings: limits, timeouts, keys; defaults if ``None``.
        store: artifact / video-job store; default: ``FileStore(settings.store_dir or a new temp dir)``.
    """
    settings = settings or ServerSettings()
    if store is None:
        store = _default_store(settings)
    svc = IngressService(backend, settings, store)
    app = FastAPI(title="polymodal", version="0.1.0", lifespan=_lifespan,
                  description="Any-to-any generation (NExT-GPT style), OpenAI-compatible API.")
    app.state.service = svc
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes, metrics=svc.metrics)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    return app
