"""Video jobs (``POST /v1/videos``): run in the background of the ingress replica, recorded in the store.

At most ``max_video_jobs`` run at once (the others wait), at most ``max_video_jobs + max_video_queue`` exist at
once (more get 503); a job still running after ``video_job_timeout_s`` fails with ``timeout``. The job's state
(queued -> in_progress -> completed | failed) lives in the :class:`~services.store.FileStore`, so every
replica sharing the store answers ``GET /v1/videos/{id}``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.errors import APIError, Overloaded
from services.ingress.planning import ChatPlan
from services.ingress.running import Runner
from services.metrics import APIMetrics
from services.settings import ServerSettings
from services.store import FileStore, VideoJob

log = logging.getLogger(__name__)


class VideoJobs:
    """The replica's video jobs.

    Args:
        runner: runs a job's plan. store: where jobs and their MP4 go. settings: job limits, artifact TTL.
        metrics: ``rejected{reason="overloaded"}``.
    """

    def __init__(self, runner: Runner, store: FileStore, settings: ServerSettings, metrics: APIMetrics):
        self.runner, self.store, self.settings, self.metrics = runner, store, settings, metrics
        self._sem = asyncio.Semaphore(settings.max_video_jobs)
        self._tasks: set[asyncio.Task] = set()

    def check_capacity(self) -> None:
        """Raises:
            Overloaded: the replica holds as many jobs as it runs and queues."""
        running = sum(1 for t in self._tasks if not t.done())
        if running >= self.settings.max_video_jobs + self.settings.max_video_queue:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"{running} video jobs are queued or running; retry later", self.settings.retry_after_s)

    def start(self, job: VideoJob, plan: ChatPlan) -> None:
        """Run ``job`` (already saved as queued) in the background."""
        task = asyncio.ensure_future(self.run(job, plan))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_all(self) -> None:
        """Cancel every job (the app shuts down); each is recorded as failed with ``cancelled``."""
        for t in list(self._tasks):
            t.cancel()

    async def run(self, job: VideoJob, plan: ChatPlan) -> None:
        settings, store = self.settings, self.store
        try:
            async with self._sem:
                plan.deadline = time.monotonic() + settings.video_job_timeout_s
                job.status = "in_progress"
                job.progress = 1
                store.save_job(job)
                out = await asyncio.wait_for(self.runner.collect(plan), timeout=settings.video_job_timeout_s)
                art = out.media[0].artifact  # stored by the runner
                job.artifact_id, job.text = art.id, out.text
                job.status, job.progress = "completed", 100
                job.completed_at, job.expires_at = int(time.time()), art.expires_at
        except asyncio.TimeoutError:
            job.status = "failed"
            job.error = {"code": "timeout", "message": f"the video job exceeded {settings.video_job_timeout_s:g} s"}
        except APIError as e:
            job.status = "failed"
            job.error = {"code": e.code or "generation_failed", "message": e.message}
        except asyncio.CancelledError:
            job.status = "failed"
            job.error = {"code": "cancelled", "message": "the server stopped before the job finished"}
            store.save_job(job)
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the job
            log.exception("video job %s failed", job.id)
            job.status = "failed"
            job.error = {"code": "internal_error", "message": f"internal error ({type(e).__name__})"}
        store.save_job(job)
