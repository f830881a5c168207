"""``GET /v1/artifacts/{id}.{ext}``: every generated medium (the references in answers, ``url`` media, video
results) until it expires. With API keys configured it requires a key and answers only the key that made the
artifact (another key: 404, as unknown; issue #27); without keys the unguessable id is the capability.

A medium still being rendered (its reference is already in a streamed answer) is waited for, at most the request
timeout (then 504); one whose render failed is a 500 ``generation_failed`` saying why; unknown or expired: 404.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from services.errors import APIError
from services.ingress.service import IngressService, get_service, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/artifacts/{name}")
async def get_artifact(name: str, svc: IngressService = Depends(get_service)):
    artifact_id = name.split(".", 1)[0]
    art, data = await svc.store.wait(artifact_id, svc.settings.request_timeout_s)
    if art is None:
        raise APIError(404, "unknown or expired artifact", type="not_found_error", code="not_found")
    if art.state == "failed":
        raise APIError(500, f"artifact {artifact_id} has no medium: its generation failed ({art.error})",
                       type="server_error", code="generation_failed")
    if data is None:
        raise APIError(504, f"artifact {artifact_id} was still being generated after "
                            f"{svc.settings.request_timeout_s:g} s", type="server_error", code="timeout")
    return Response(data, media_type=art.mime_type,
                    headers={"Cache-Control": f"private, max-age={max(0, art.expires_at - int(time.time()))}"})
