"""``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /ready``, ``GET /metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from services.errors import APIError
from services.ingress.service import IngressService, get_service, require_api_key
from services.metrics import CONTENT_TYPE

router = APIRouter()


async def describe(svc: IngressService, timeout_s: float = 10.0) -> dict[str, Any]:
    """The backend's parts and readiness; an error or a timeout reads as not ready."""
    try:
        return await asyncio.wait_for(svc.backend.describe(), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - reported as not ready
        return {"ready": False, "error": f"{type(e).__name__}: {e}"}


def model_card(svc: IngressService, parts: dict[str, Any] | None) -> dict[str, Any]:
    """The ``model`` object: preset, modalities (also as OpenRouter's ``architecture``), decoder defaults, the
    server's limits, grounding, ``edits``, parts.

    ``edits`` (an extension OpenAI clients ignore): ``{modality: [edit kinds]}`` for each output modality whose
    decoder can edit, as its deployment describes it: ``"whole"`` renders from a source medium (image-to-image,
    video-to-video; ``POST /v1/images/edits`` and chat ``edit``), ``"masked"`` only where a mask allows
    (inpainting; ``/v1/images/edits`` with ``mask``); ``null`` while the decoders cannot be described.
    ``edit_options``: ``{modality: [fields]}``, the options its edits read: ``strength`` (img2img, inpainting,
    video-to-video) or ``image_guidance_scale`` (an InstructPix2Pix image decoder); the other is refused."""
    backend = svc.backend
    inputs = ["text", *(m.value for m in backend.input_modalities)]
    outputs = ["text", *(m.value for m in backend.output_modalities)]
    return {
        "id": svc.model_name, "object": "model", "created": 0, "owned_by": "polymodal",
        "preset": backend.preset.name, "description": backend.preset.description,
        "architecture": {"modality": f"{'+'.join(inputs)}->{'+'.join(outputs)}", "input_modalities": inputs,
                         "output_modalities": outputs},
        "input_modalities": inputs,
        "output_modalities": outputs,
        "decoder_defaults": {m.value: backend.preset.decoders[m].defaults.model_dump()
                             for m in backend.output_modalities},
        "limits": svc.settings.limits.model_dump(),
        "grounding": None if backend.preset.grounding is None else {
            "format": backend.preset.grounding.format, "tasks": list(backend.preset.grounding.tasks)},
        "edits": edit_kinds(parts),
        "edit_options": edit_kinds(parts, "edit_options"),
        "parts": parts,
    }


def edit_kinds(parts: dict[str, Any] | None, key: str = "edit_kinds") -> dict[str, list[str]] | None:
    """``{modality: edit kinds}`` (``key="edit_options"``: the option fields its edits read) from the described
    decoders (modalities that cannot edit left out); ``None`` when a decoder could not be described."""
    decoders = (parts or {}).get("decoders")
    if not isinstance(decoders, dict) or any(key not in d for d in decoders.values()):
        return None
    return {m: list(d[key]) for m, d in decoders.items() if d[key]}


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(svc: IngressService = Depends(get_service)):
    return {"object": "list", "data": [model_card(svc, await describe(svc))]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, svc: IngressService = Depends(get_service)):
    if model_id != svc.model_name:  # a missing resource: 404, as OpenAI answers
        raise APIError(404, f"model {model_id!r} not found; this server serves {svc.model_name!r}",
                       type="invalid_request_error", param="model_id", code="model_not_found")
    return model_card(svc, await describe(svc))


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(svc: IngressService = Depends(get_service)):
    parts = await describe(svc)
    ok = bool(parts.get("ready"))
    return JSONResponse({"status": "ready" if ok else "not_ready", "model": svc.model_name, "parts": parts},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(svc: IngressService = Depends(get_service)):
    try:
        stats = await asyncio.wait_for(svc.backend.stats(), timeout=5)
    except Exception:  # noqa: BLE001 - metrics never fail the scrape
        stats = {}
    return Response(svc.metrics.render(stats), media_type=CONTENT_TYPE)
