"""``POST /v1/chat/completions``: plan, then a whole answer (JSON) or a stream (SSE)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from services.ingress.payloads import Splicer
from services.ingress.planning import new_id, request_kind
from services.ingress.running import ClientGone
from services.ingress.service import IngressService, get_service, require_api_key
from services.ingress.streaming import SSEResponse, sse
from services.schemas import ChatCompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           svc: IngressService = Depends(get_service)):
    request_id = new_id("chatcmpl")
    slot = svc.admission.acquire(request_kind("chat", body.modalities))
    streaming = False
    try:
        plan = await svc.runner.guarded(request, svc.planner.plan_chat(body, request_id))
        plan.on_complete = slot.completed
        base = svc.base_url(request)
        if body.stream:
            streaming = True
            body_iter = sse(svc.runner, svc.responses, svc.metrics, svc.settings.request_timeout_s, plan, base)
            return SSEResponse(body_iter, slot, headers={"X-Request-Id": request_id})
        out = await svc.runner.guarded(request, svc.runner.collect(plan))
        splicer = Splicer()  # large media are base64-encoded piece by piece while the body is sent
        return splicer.response(svc.responses.completion_body(plan, out, base, splicer),
                                headers={"X-Request-Id": request_id})
    except ClientGone:
        return Response(status_code=499)
    finally:
        if not streaming:
            slot.release()
