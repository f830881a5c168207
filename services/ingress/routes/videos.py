"""``POST /v1/videos`` (an asynchronous job), ``GET /v1/videos/{id}``, ``GET /v1/videos/{id}/content`` (MP4)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from polymodal.modality import Modality

from services.errors import APIError, bad_request
from services.ingress.service import IngressService, get_service, require_api_key
from services.schemas import VideoCreateRequest
from services.store import FileStore, VideoJob

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/videos")
async def create_video(body: VideoCreateRequest, svc: IngressService = Depends(get_service)):
    svc.planner.check_model(body.model)
    svc.planner.require_output(Modality.VIDEO, "model")
    overrides = svc.planner.parse_size(body.size)
    overrides.update(body.model_dump(include={"num_frames", "fps", "num_inference_steps", "guidance_scale", "crf"},
                                     exclude_none=True))
    defaults = svc.backend.preset.decoders[Modality.VIDEO].defaults
    fps = overrides.get("fps", defaults.fps)
    if body.seconds is not None and "num_frames" not in overrides:
        overrides["num_frames"] = max(1, round(body.seconds * fps))
        if overrides["num_frames"] > svc.limits.max_num_frames:
            raise bad_request(f"seconds: {body.seconds:g} s at {fps} fps is {overrides['num_frames']} frames; "
                              f"the limit is {svc.limits.max_num_frames}", param="seconds", code="invalid_value")
    options = svc.planner.decoder_options(Modality.VIDEO, overrides, "")
    svc.videos.check_capacity()
    settings = svc.settings
    seed = svc.planner.seed(body.seed)
    now = int(time.time())
    job = VideoJob(
        id=FileStore.new_id("video_"), model=svc.model_name, prompt=body.prompt, created_at=now,
        deadline_at=now + int(settings.video_job_timeout_s) + 5,
        seconds=f"{options.num_frames / options.fps:g}", size=f"{options.width_px}x{options.height_px}",
        num_frames=options.num_frames, fps=options.fps, seed=seed,
    )
    svc.store.save_job(job)
    plan = svc.planner.plan_prompt(body.prompt, Modality.VIDEO, options, seed, 1, job.id, "inline")
    svc.videos.start(job, plan)
    return JSONResponse(job.public())


def job_or_404(svc: IngressService, video_id: str) -> VideoJob:
    """Raises:
        APIError: 404 for an unknown (or expired) job."""
    job = svc.store.load_job(video_id)
    if job is None:
        raise APIError(404, f"no video job {video_id!r}", type="not_found_error", param="video_id",
                       code="not_found")
    return job


@router.get("/v1/videos/{video_id}")
async def get_video(video_id: str, svc: IngressService = Depends(get_service)):
    return JSONResponse(job_or_404(svc, video_id).public())


@router.get("/v1/videos/{video_id}/content")
async def get_video_content(video_id: str, svc: IngressService = Depends(get_service)):
    job = job_or_404(svc, video_id)
    if job.status != "completed" or job.artifact_id is None:
        raise APIError(409, f"video {video_id!r} is {job.status}; its content is available once completed",
                       param="video_id", code="video_not_ready")
    got = svc.store.get(job.artifact_id)
    if got is None:
        raise APIError(404, f"the content of video {video_id!r} has expired", type="not_found_error",
                       code="expired")
    art, data = got
    return Response(data, media_type=art.mime_type)
