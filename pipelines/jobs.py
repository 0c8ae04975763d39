"""Sampling jobs of the HTTP server: their states, progress, time estimates and how long they are kept.

Pure bookkeeping (no Ray, no HTTP), so it is tested on its own; `pipelines/serve.py` runs the
jobs and serves them. A job is queued until a generator replica starts it, running while it
samples (one event per diffusion step), then done, failed or cancelled. Finished jobs and
their videos are kept for `keep_s` seconds and at most `max_kept` of them; waiting and running
jobs are never dropped, and at most `max_active` of them are accepted at once.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobSettings:
    """`args.jobs` in configs/serve.yaml."""

    max_active: int = 16  # queued and running jobs at once; past it, 503 with Retry-After
    max_kept: int = 64  # finished jobs (and their videos) kept for GET /jobs/{id}
    keep_s: float = 3600.0  # how long a finished job is kept

    def __post_init__(self) -> None:
        for name in ("max_active", "max_kept", "keep_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"args.jobs.{name}: must be positive, got {getattr(self, name)}")


class Full(Exception):
    """No room for another active job."""


@dataclass(eq=False)
class Job:
    """One request to sample: its progress and, when done, its video."""

    id: str
    prompt: str
    seed: int
    steps_per_clip: int
    loops: int
    time_limit_s: float
    created: float  # clock time
    status: JobStatus = JobStatus.QUEUED
    step: int = 0  # diffusion steps done over all clips
    clip: int = 0  # 1-based clip being sampled; 0 before the first step
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    video: bytes | None = None
    frames: int = 0
    # Set and replaced at every change: event streams wait on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def total_steps(self) -> int:
        return self.steps_per_clip * self.loops

    def eta_s(self, now: float) -> float | None:
        """Seconds left, from the pace of the steps done so far; None before the first step."""
        if self.status is not JobStatus.RUNNING or self.started is None or self.step == 0:
            return None
        return (now - self.started) / self.step * (self.total_steps - self.step)


class JobTable:
    """The server's jobs, by id, oldest first."""

    def __init__(self, settings: JobSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.jobs: dict[str, Job] = {}

    def create(self, prompt: str, seed: int, steps_per_clip: int, loops: int, time_limit_s: float) -> Job:
        """A new queued job; raises Full when `max_active` jobs are queued or running."""
        self.prune()
        if len(self.active()) >= self.settings.max_active:
            raise Full(f"{self.settings.max_active} jobs are already waiting or running")
        job = Job(secrets.token_hex(8), prompt, seed, steps_per_clip, loops, time_limit_s, self.clock())
        self.jobs[job.id] = job
        self._touch_queue()
        return job

    def get(self, job_id: str) -> Job | None:
        self.prune()
        return self.jobs.get(job_id)

    def active(self) -> list[Job]:
        return [job for job in self.jobs.values() if not job.status.finished]

    def ahead(self, job: Job) -> int:
        """Active jobs accepted before this one (0 once it runs)."""
        if job.status is not JobStatus.QUEUED:
            return 0
        count = 0
        for other in self.jobs.values():  # in the order they were accepted
            if other is job:
                return count
            count += not other.status.finished
        return count

    # ------------------------------------------------------------------ changes

    def start(self, job: Job) -> None:
        if job.status is JobStatus.QUEUED:
            job.status, job.started = JobStatus.RUNNING, self.clock()
            self._changed(job)
            self._touch_queue()

    def progress(self, job: Job, done: int, clip: int) -> None:
        if job.status is JobStatus.QUEUED:
            self.start(job)
        if job.status is JobStatus.RUNNING:
            job.step, job.clip = done, clip
            self._changed(job)

    def finish(self, job: Job, video: bytes, frames: int) -> None:
        if not job.status.finished:
            job.video, job.frames, job.step = video, frames, job.total_steps
            self._end(job, JobStatus.DONE)

    def fail(self, job: Job, error: str) -> None:
        if not job.status.finished:
            job.error = error
            self._end(job, JobStatus.FAILED)

    def cancel(self, job: Job) -> None:
        if not job.status.finished:
            self._end(job, JobStatus.CANCELLED)

    def _end(self, job: Job, status: JobStatus) -> None:
        job.status, job.finished = status, self.clock()
        self._changed(job)
        self._touch_queue()
        self.prune()

    def _changed(self, job: Job) -> None:
        event, job.changed = job.changed, asyncio.Event()
        event.set()

    def _touch_queue(self) -> None:
        """Queued jobs' places move whenever a job is added, starts or ends."""
        for job in self.jobs.values():
            if job.status is JobStatus.QUEUED:
                self._changed(job)

    def prune(self) -> None:
        """Drop finished jobs past `keep_s`, then the oldest finished past `max_kept`."""
        now = self.clock()
        finished = [job for job in self.jobs.values() if job.status.finished]
        expired = {job.id for job in finished if now - job.finished > self.settings.keep_s}
        kept = [job for job in finished if job.id not in expired]
        expired |= {job.id for job in kept[: max(0, len(kept) - self.settings.max_kept)]}
        for job_id in expired:
            del self.jobs[job_id]

    # ------------------------------------------------------------------ views

    def describe(self, job: Job) -> dict:
        """What GET /jobs/{id} and each server-sent event say of a job."""
        now = self.clock()
        end = job.finished if job.finished is not None else now
        eta = job.eta_s(now)
        return {
            "id": job.id,
            "status": job.status.value,
            "position": self.ahead(job),
            "step": job.step,
            "total_steps": job.total_steps,
            "clip": job.clip,
            "loops": job.loops,
            "elapsed_s": round(end - job.created, 3),
            "eta_s": None if eta is None else round(eta, 3),
            "error": job.error,
            "prompt": job.prompt,
            "seed": job.seed,
            "frames": job.frames,
            "time_limit_s": job.time_limit_s,
        }
