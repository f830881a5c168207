"""Artifacts and video jobs in a filesystem store that every ingress replica sees.

State that must survive several ingress replicas lives here, not in one replica's memory: a folder
(``ServerSettings.store_dir``) shared by the replicas of a node, or a shared volume (NFS, a Kubernetes
``ReadWriteMany`` PVC) across nodes. Writes are atomic (temp file + ``os.replace``), so a reader never sees
half a record. Artifact ids are 128-bit random tokens: an artifact URL is a capability (like a signed URL)
and expires after ``artifact_ttl_s``.

An artifact can be reserved before its bytes exist (:meth:`FileStore.reserve`: state ``pending``, its id already
in an answer), then given its bytes (:meth:`~FileStore.fulfil`: ``ready``) or marked failed with the reason
(:meth:`~FileStore.fail`: ``failed``); :meth:`~FileStore.wait` polls a pending one (any replica may be the one
rendering it). A pending artifact not settled by its ``ready_by`` deadline (the replica rendering it stopped)
reads as failed.

Ownership (issue #27): with API keys configured, an artifact belongs to the key whose request made it. The ingress
sets :data:`ARTIFACT_OWNER` (a digest of the request's key, never the key) for the request; :meth:`FileStore.reserve`
/ :meth:`~FileStore.put` record it and :meth:`~FileStore.lookup` / :meth:`~FileStore.get` / :meth:`~FileStore.wait`
answer ``None`` (unknown) for another owner's artifact; video job records likewise (:meth:`~FileStore.load_job`).
Without keys the owner is ``None`` and every artifact is
everyone's, as before.

Layout::

    <dir>/artifacts/<id>.bin, <id>.json   {"mime_type", "ext", "created_at", "expires_at", "bytes", "state",
                                           "error", "ready_by", "owner"} (.bin only once ready)
    <dir>/videos/<id>.json                the video job (see :class:`VideoJob`)
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
ArtifactState = Literal["pending", "ready", "failed"]
WAIT_POLL_S = 0.05

ARTIFACT_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("polymodal_artifact_owner", default=None)
"""Who the request being served is (:func:`owner_of` its API key; ``None`` without keys): new artifacts belong to
it and lookups see only its artifacts and ownerless ones. Set by the ingress's key check."""


def owner_of(api_key: str) -> str:
    """The owner recorded for an API key: a digest (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes, mtime: float | None = None) -> None:
    """``data`` to ``path`` atomically (temp file + ``os.replace``); ``mtime``: the file's modification time
    (seconds since the epoch; an artifact record's carries its expiry, so that :meth:`FileStore.sweep` finds
    expired records with a ``stat`` instead of reading each one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass(frozen=True)
class Artifact:
    """A stored medium's record. ``state``: ``pending`` (reserved, bytes not yet there; settled by ``ready_by``),
    ``ready`` or ``failed`` (``error`` says why). ``bytes``: the file's size (0 until ready). ``owner``: who made it
    (:func:`owner_of` an API key; ``None``: made without keys, everyone's)."""

    id: str
    mime_type: str
    ext: str
    created_at: int
    expires_at: int
    bytes: int
    state: ArtifactState = "ready"
    error: str | None = None
    ready_by: int | None = None
    owner: str | None = None


@dataclass
class VideoJob:
    """An asynchronous video generation (OpenAI ``video`` object, plus our fields).

    ``status``: ``queued`` -> ``in_progress`` -> ``completed`` | ``failed``. ``deadline_at``: a job not
    finished by then (e.g. its replica died) reads as failed. ``owner``: who made it, as for an artifact
    (:data:`ARTIFACT_OWNER` when the record is created; never in :meth:`public`): another owner's job reads as
    unknown.
    """

    id: str
    model: str
    prompt: str
    status: JobStatus = "queued"
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    deadline_at: int | None = None
    seconds: str = ""
    size: str = ""
    num_frames: int = 0
    fps: int = 0
    seed: int | None = None
    artifact_id: str | None = None
    text: str = ""
    error: dict[str, Any] | None = None
    owner: str | None = field(default_factory=lambda: ARTIFACT_OWNER.get())

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status,
            "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": self.expires_at, "seconds": self.seconds, "size": self.size, "prompt": self.prompt,
            "num_frames": self.num_frames, "fps": self.fps, "seed": self.seed, "text": self.text,
            "error": self.error,
        }


class FileStore:
    """Artifacts (bytes with a MIME type and an expiry) and video job records under ``root``.

    Expired artifacts are removed by :meth:`sweep`, which :meth:`reserve` starts in a background thread at most
    every ``sweep_every_s`` seconds (per store object): a request never pays for the store's size (a sweep per
    request read every record on the ingress's event loop, ~4 ms per request with a few hundred stored and
    growing with them). A record's file modification time is its expiry, so a sweep ``stat``s the records and
    reads only those past it.
    """

    def __init__(self, root: str | Path, ttl_s: int = 3600, sweep_every_s: float = 30.0):
        self.root = Path(root)
        self.ttl_s = int(ttl_s)
        self.sweep_every_s = float(sweep_every_s)
        self._sweeping = threading.Lock()
        self._last_sweep = -float("inf")
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        (self.root / "videos").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id(prefix: str = "") -> str:
        return prefix + secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")

    # ---- artifacts -------------------------------------------------------------------------------
    def _write_meta(self, art: Artifact) -> None:
        _atomic_write(self.root / "artifacts" / f"{art.id}.json", json.dumps(asdict(art)).encode(),
                      mtime=art.expires_at)

    def put(self, data: bytes, mime_type: str, ext: str, ttl_s: int | None = None) -> Artifact:
        """Store ``data`` now (state ``ready``; owned by :data:`ARTIFACT_OWNER`)."""
        return self.fulfil(self.reserve(mime_type, ext, ttl_s), data, mime_type, ext)

    def reserve(self, mime_type: str, ext: str, ttl_s: int | None = None, ready_within_s: float = 3600) -> Artifact:
        """A ``pending`` artifact (owned by :data:`ARTIFACT_OWNER`): its id (and URL) exist before its bytes;
        :meth:`fulfil` or :meth:`fail` it.

        Args:
            ready_within_s: not settled within this (e.g. the replica rendering it stopped), it reads as failed.
        """
        now = int(time.time())
        art = Artifact(self.new_id("art_"), mime_type, ext, now, now + int(ttl_s or self.ttl_s), 0, "pending",
                       None, now + int(max(1.0, ready_within_s)) + 1, ARTIFACT_OWNER.get())
        self._write_meta(art)
        self.sweep_soon()
        return art

    def fulfil(self, art: Artifact, data: bytes, mime_type: str, ext: str) -> Artifact:
        """A reserved artifact's bytes (state ``ready``; it expires its TTL after now)."""
        now = int(time.time())
        ready = Artifact(art.id, mime_type, ext, now, now + (art.expires_at - art.created_at), len(data),
                         owner=art.owner)
        _atomic_write(self.root / "artifacts" / f"{art.id}.bin", data)
        self._write_meta(ready)
        return ready

    def fail(self, art: Artifact, error: str) -> Artifact:
        """A reserved artifact that will never have bytes (state ``failed``, with the reason)."""
        failed = Artifact(art.id, art.mime_type, art.ext, art.created_at, art.expires_at, 0, "failed", error,
                          owner=art.owner)
        self._write_meta(failed)
        return failed

    def lookup(self, artifact_id: str) -> Artifact | None:
        """The record in any state, or ``None`` if unknown, expired (expired ones are removed) or another owner's
        (:data:`ARTIFACT_OWNER`). A pending one past its ``ready_by`` reads as failed."""
        if not _ID.match(artifact_id):
            return None
        try:
            art = Artifact(**json.loads((self.root / "artifacts" / f"{artifact_id}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if art.expires_at < time.time():
            self._remove(artifact_id)
            return None
        if art.owner is not None and art.owner != ARTIFACT_OWNER.get():
            return None
        if art.state == "pending" and art.ready_by is not None and art.ready_by < time.time():
            return Artifact(art.id, art.mime_type, art.ext, art.created_at, art.expires_at, 0, "failed",
                            "the medium was not ready in time (its request timed out or its replica stopped)",
                            owner=art.owner)
        return art

    def get(self, artifact_id: str) -> tuple[Artifact, bytes] | None:
        """A ready artifact and its bytes, or ``None`` if unknown, expired, pending or failed."""
        art = self.lookup(artifact_id)
        if art is None or art.state != "ready":
            return None
        try:
            return art, (self.root / "artifacts" / f"{artifact_id}.bin").read_bytes()
        except OSError:
            return None

    async def wait(self, artifact_id: str, timeout_s: float) -> tuple[Artifact | None, bytes | None]:
        """The artifact once it is no longer pending (polling every ``WAIT_POLL_S``; at most ``timeout_s``):
        ``(None, None)`` unknown or expired, ``(ready, bytes)``, ``(failed, None)``, or ``(pending, None)`` when
        ``timeout_s`` ran out."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            art = self.lookup(artifact_id)
            if art is None or art.state == "failed":
                return art, None
            if art.state == "ready":
                got = self.get(artifact_id)
                return (got[0], got[1]) if got is not None else (None, None)
            if time.monotonic() >= deadline:
                return art, None
            await asyncio.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))

    def _remove(self, artifact_id: str) -> None:
        for suffix in (".json", ".bin"):
            try:
                (self.root / "artifacts" / f"{artifact_id}{suffix}").unlink()
            except OSError:
                pass

    def sweep(self, limit: int | None = None) -> int:
        """Remove expired artifacts (at most ``limit`` per call); returns how many. Only records whose file
        time (their expiry, see :func:`_atomic_write`) has passed are read, to confirm."""
        now, n = time.time(), 0
        with os.scandir(self.root / "artifacts") as entries:
            for e in entries:
                if not e.name.endswith(".json"):
                    continue
                try:
                    if e.stat().st_mtime >= now or json.loads(Path(e.path).read_text())["expires_at"] >= now:
                        continue
                except (OSError, ValueError, KeyError):
                    continue
                self._remove(e.name[:-len(".json")])
                n += 1
                if limit is not None and n >= limit:
                    break
        return n

    def sweep_soon(self) -> bool:
        """Start :meth:`sweep` in a background thread unless one ran within ``sweep_every_s`` or one is running;
        returns whether one started."""
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_every_s or not self._sweeping.acquire(blocking=False):
            return False
        self._last_sweep = now

        def run() -> None:
            try:
                self.sweep()
            except OSError:  # the folder went away (tests, shutdown): nothing to sweep
                pass
            finally:
                self._sweeping.release()

        threading.Thread(target=run, name="artifact-sweep", daemon=True).start()
        return True

    # ---- video jobs ------------------------------------------------------------------------------
    def save_job(self, job: VideoJob) -> None:
        _atomic_write(self.root / "videos" / f"{job.id}.json", json.dumps(asdict(job)).encode())

    def load_job(self, job_id: str) -> VideoJob | None:
        """The job, or ``None`` if unknown or another owner's (:data:`ARTIFACT_OWNER`; a job made without keys is
        everyone's). A job past its deadline and not finished reads as failed."""
        if not _ID.match(job_id):
            return None
        try:
            job = VideoJob(**json.loads((self.root / "videos" / f"{job_id}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if job.owner is not None and job.owner != ARTIFACT_OWNER.get():
            return None
        if job.status in ("queued", "in_progress") and job.deadline_at and job.deadline_at < time.time():
            job.status = "failed"
            job.error = {"code": "timeout", "message": "the video job did not finish before its deadline "
                                                       "(timed out, or the replica running it stopped)"}
        return job
