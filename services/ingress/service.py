"""The ingress service: the parts every route uses, built once per app, and the FastAPI dependencies that
give them to the routes.

Routes are module-level functions on routers (:mod:`services.ingress.routes`); they get the service with
``Depends(get_service)`` (it lives in ``app.state.service``) and ``/v1`` routes require the API key with
``Depends(require_api_key)``.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from services.errors import APIError
from services.ingress.admission import Admission
from services.ingress.media_input import MediaReader
from services.ingress.planning import Planner
from services.ingress.responses import Responses
from services.ingress.running import Runner
from services.ingress.video_jobs import VideoJobs
from services.metrics import APIMetrics
from services.protocol import Backend
from services.settings import ServerSettings
from services.store import ARTIFACT_OWNER, FileStore, owner_of


class IngressService:
    """Request handling shared by the routes (see the contract in :mod:`services.ingress`).

    Attributes:
        backend, settings, limits, store, metrics: as given / derived.
        model_name: the ``model`` id clients send (``settings.model_name`` or the preset's name).
        admission: generation slots by predicted latency (503 beyond). media: reads input media. planner: request -> plan.
        runner: runs plans (timeout, disconnect). responses: answer bodies. videos: the video jobs.
    """

    def __init__(self, backend: Backend, settings: ServerSettings, store: FileStore):
        self.backend = backend
        self.settings = settings
        self.limits = settings.limits
        self.store = store
        self.metrics = APIMetrics()
        self.model_name = settings.model_name or backend.preset.name
        self.admission = Admission(settings.max_concurrent_requests, settings.retry_after_s, self.metrics,
                                   timeout_s=settings.request_timeout_s, target=settings.admission_target,
                                   cold_start=settings.admission_cold_start)
        self.media = MediaReader(backend, settings, self.metrics, store)
        self.planner = Planner(backend, settings, self.media, self.model_name)
        self.runner = Runner(backend, settings, self.metrics, store)
        self.responses = Responses(backend.preset, settings, store, self.metrics, self.model_name)
        self.videos = VideoJobs(self.runner, store, settings, self.metrics)
        self._api_keys = settings.effective_api_keys()

    def check_auth(self, request: Request) -> None:
        """Check the request's key and make it the owner of what the request stores and reads
        (:data:`services.store.ARTIFACT_OWNER`; ``None`` without keys).

        Raises:
            APIError: 401 when keys are configured and the request has none of them as a Bearer token."""
        ARTIFACT_OWNER.set(None)
        if not self._api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not any(
            hmac.compare_digest(token.encode(), k.encode()) for k in self._api_keys
        ):
            self.metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")
        ARTIFACT_OWNER.set(owner_of(token))

    def base_url(self, request: Request) -> str:
        """Base of artifact URLs: ``public_base_url`` or the request's own."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")


def get_service(request: Request) -> IngressService:
    """FastAPI dependency: the app's :class:`IngressService`."""
    return request.app.state.service


async def require_api_key(request: Request) -> None:
    """FastAPI dependency of the ``/v1`` routes: 401 without a valid key (when keys are configured). Async, so the
    owner it sets (:data:`services.store.ARTIFACT_OWNER`) is in the context the route and its tasks run in."""
    get_service(request).check_auth(request)
