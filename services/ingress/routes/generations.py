"""``POST /v1/images/generations`` and ``POST /v1/audio/generations``: the prompt through the LLM with the
medium's group required, that group rendered ``n`` times (seeds ``seed + k``, one decoder batch)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from polymodal.config import DecoderDefaults
from polymodal.modality import Modality

from services.errors import bad_request
from services.ingress.payloads import Splicer
from services.ingress.planning import new_id, request_kind
from services.ingress.running import ClientGone
from services.ingress.service import IngressService, get_service, require_api_key
from services.schemas import AudioGenerationRequest, ImageGenerationRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


def one_medium_options(svc: IngressService, body, modality: Modality, overrides: dict[str, Any]) -> DecoderDefaults:
    """Check a one-medium request's model, modality and ``n``; its decoder options.

    Raises:
        APIError: 400 (model, modality, ``n`` or an option over the limits).
    """
    svc.planner.check_model(body.model)
    svc.planner.require_output(modality, "model")
    if body.n > svc.limits.max_n:
        raise bad_request(f"n must be <= {svc.limits.max_n} on this server, got {body.n}", param="n",
                          code="invalid_value")
    return svc.planner.decoder_options(modality, overrides, "")


async def run_one_medium(svc: IngressService, request: Request, body, modality: Modality, options: DecoderDefaults,
                         prefix_id: str, kind: str | None = None, **plan_kwargs):
    """Plan, run (under one admission slot of ``kind``, default the prefix) and answer a one-medium request;
    ``plan_kwargs`` go to :meth:`~services.ingress.planning.Planner.plan_prompt` (an edit's media and source).

    Raises:
        APIError: 503, 504, 500 ``generation_failed``.
    """
    fmt = "url" if body.response_format == "url" else "inline"
    request_id = new_id(prefix_id)
    slot = svc.admission.acquire(request_kind(kind or prefix_id))
    try:
        plan = svc.planner.plan_prompt(body.prompt, modality, options, body.seed, body.n, request_id, fmt,
                                       **plan_kwargs)
        plan.on_complete = slot.completed
        text, media = await svc.runner.media_items(plan, request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        slot.release()
    splicer = Splicer()  # large media are base64-encoded piece by piece while the body is sent
    answer = svc.responses.generation_body(request_id, modality, text, media, fmt, svc.base_url(request), splicer)
    return splicer.response(answer, headers={"X-Request-Id": request_id})


async def one_medium(svc: IngressService, request: Request, body: ImageGenerationRequest | AudioGenerationRequest,
                     modality: Modality, overrides: dict[str, Any], prefix_id: str):
    """Validate, plan, run (under one admission slot) and answer a one-medium request.

    Raises:
        APIError: 400 (model, modality, ``n`` or an option over the limits), 503, 504, 500 ``generation_failed``.
    """
    options = one_medium_options(svc, body, modality, overrides)
    return await run_one_medium(svc, request, body, modality, options, prefix_id)


@router.post("/v1/images/generations")
async def images_generations(body: ImageGenerationRequest, request: Request,
                             svc: IngressService = Depends(get_service)):
    overrides = svc.planner.parse_size(body.size)
    overrides.update(body.model_dump(include={"num_inference_steps", "guidance_scale"}, exclude_none=True))
    return await one_medium(svc, request, body, Modality.IMAGE, overrides, "img")


@router.post("/v1/audio/generations")
async def audio_generations(body: AudioGenerationRequest, request: Request,
                            svc: IngressService = Depends(get_service)):
    overrides = body.model_dump(include={"duration_s", "num_inference_steps", "guidance_scale"}, exclude_none=True)
    return await one_medium(svc, request, body, Modality.AUDIO, overrides, "aud")
