"""``GET /v1/skills`` (the served skills and their schemas) and ``POST /v1/skills/{name}`` (one direct call).

A direct call answers ``{"object": "skill.result", "skill", "deployment", "text", "boxes", "masks", "media", "data",
"error": null, "error_code": null, "elapsed_s"}`` (media as in ``message.skill_calls[i].result``; every medium is
stored as an artifact). A call the caller got wrong is a 4xx with OpenAI's error body: an unknown skill 404
(``skill_not_found``, naming the served ones), arguments that do not validate 400 (``invalid_arguments``, pydantic's
message naming the field), an unusable input 400 (``invalid_input``: no image, an index out of range, an image too
small or too large; a medium that does not decode is refused before the skill runs, as in chat). A skill that fails
on a valid input is 422 (``skill_failed``); a skill deployment that is down 503.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request

from polymodal.types import ToolCall

from services.errors import APIError, bad_request
from services.ingress.planning import new_id
from services.ingress.running import Stored
from services.ingress.skill_loop import SkillCall
from services.ingress.service import IngressService, get_service, require_api_key
from services.protocol import SkillRequest
from services.schemas import SkillCallRequest, TextContent

router = APIRouter(dependencies=[Depends(require_api_key)])

ERROR_STATUS = {"invalid_arguments": 400, "invalid_input": 400, "failed": 422}
"""A direct call's error result -> HTTP status (the caller's mistakes 400; a valid input the skill failed on 422)."""


def skill_card(svc: IngressService, name: str) -> dict[str, Any]:
    """``{"object": "skill", "name", "description", "parameters" (JSON schema), "accepts", "returns", "weight",
    "deployment"}``."""
    return {"object": "skill", **svc.backend.skill_specs()[name].to_dict(), "deployment": svc.backend.skill_host(name)}


@router.get("/v1/skills")
async def list_skills(svc: IngressService = Depends(get_service)):
    return {"object": "list", "data": [skill_card(svc, n) for n in svc.backend.skills]}


@router.get("/v1/skills/{name}")
async def get_skill_card(name: str, svc: IngressService = Depends(get_service)):
    _check_name(svc, name)
    return skill_card(svc, name)


def _check_name(svc: IngressService, name: str) -> None:
    if name not in svc.backend.skills:
        raise APIError(404, f"skill {name!r} not found; this server runs: {', '.join(svc.backend.skills) or 'none'} "
                            "(see GET /v1/skills)", param="name", code="skill_not_found")


@router.post("/v1/skills/{name}")
async def call_skill(name: str, body: SkillCallRequest, request: Request, svc: IngressService = Depends(get_service)):
    _check_name(svc, name)
    args = body.arguments
    try:  # the skill validates them against its schema (invalid_arguments); here only that they are an object
        args_json = args if isinstance(args, str) else json.dumps(args or {})
        if not isinstance(json.loads(args_json or "{}"), dict):
            raise ValueError
    except ValueError:
        raise bad_request(f"arguments: {name}'s arguments must be a JSON object", param="arguments",
                          code="invalid_arguments") from None
    if len(body.input) > svc.limits.max_media_inputs:
        raise bad_request(f"input: at most {svc.limits.max_media_inputs} media inputs per request", param="input",
                          code="too_many_media")
    media = []
    for j, c in enumerate(body.input):
        if isinstance(c, TextContent):
            continue
        media.append(await svc.media.read_part(c, f"input[{j}]"))
    request_id = new_id("skill")
    req = SkillRequest(request_id, name, args_json, tuple(media))
    out = await svc.runner.guarded(request, svc.backend.run_skill(req))
    r = out.result
    if not out.ok:
        status = ERROR_STATUS.get(r.error_code or "failed", 422)
        raise APIError(status, f"{name}: {r.error}", param="arguments" if r.error_code == "invalid_arguments" else
                       ("input" if r.error_code == "invalid_input" else None),
                       code=r.error_code if status == 400 else "skill_failed")
    stored = tuple(Stored(m, svc.store.put(m.data, m.mime_type, m.ext, svc.settings.artifact_ttl_s)) for m in out.media)
    call = SkillCall(ToolCall(request_id, name, args_json), out, stored, 0,
                     svc.backend.skill_host(name))
    fmt = body.media_format or svc.settings.default_media_format
    shown = svc.responses.skill_call_json(call, fmt, svc.base_url(request))
    return {"object": "skill.result", "id": request_id, "skill": name, "deployment": call.deployment,
            **shown["result"]}
