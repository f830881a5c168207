"""``GET /v1/artifacts/{id}.{ext}``: stored media (``url`` response format, video results) until they expire.
No API key: the unguessable id is the capability (clients hand these URLs to players and browsers)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from services.errors import APIError
from services.ingress.service import IngressService, get_service

router = APIRouter()


@router.get("/v1/artifacts/{name}")
async def get_artifact(name: str, svc: IngressService = Depends(get_service)):
    got = svc.store.get(name.split(".", 1)[0])
    if got is None:
        raise APIError(404, "unknown or expired artifact", type="not_found_error", code="not_found")
    art, data = got
    return Response(data, media_type=art.mime_type,
                    headers={"Cache-Control": f"private, max-age={max(0, art.expires_at - int(time.time()))}"})
