"""The serving jobs' bookkeeping (pipelines/jobs.py) on a hand-driven clock."""

from __future__ import annotations

import pytest

from pipelines.jobs import Full, JobSettings, JobStatus, JobTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def table(clock, **settings) -> JobTable:
    return JobTable(JobSettings(**settings), clock)


def new(jobs: JobTable, prompt: str = "a", steps: int = 10, loops: int = 1):
    return jobs.create(prompt, seed=1, steps_per_clip=steps, loops=loops, time_limit_s=60)


def test_a_job_goes_from_queued_to_done_with_its_progress_and_time_left(clock):
    jobs = table(clock)
    job = new(jobs, steps=10, loops=2)
    seen = jobs.describe(job)
    assert seen["status"] == "queued" and seen["total_steps"] == 20 and seen["eta_s"] is None
    clock.now += 1
    jobs.start(job)
    clock.now += 4
    jobs.progress(job, done=5, clip=1)
    seen = jobs.describe(job)
    assert seen["status"] == "running" and seen["step"] == 5 and seen["clip"] == 1
    assert seen["elapsed_s"] == 5.0
    assert seen["eta_s"] == pytest.approx(4 / 5 * 15)  # 0.8 s a step so far, 15 steps to go
    jobs.finish(job, b"mp4", frames=8)
    seen = jobs.describe(job)
    assert seen["status"] == "done" and seen["step"] == 20 and seen["eta_s"] is None and job.video == b"mp4"


def test_queue_positions_count_the_active_jobs_ahead(clock):
    jobs = table(clock)
    first, second, third = new(jobs), new(jobs), new(jobs)
    assert [jobs.ahead(job) for job in (first, second, third)] == [0, 1, 2]
    jobs.start(first)
    assert [jobs.ahead(job) for job in (first, second, third)] == [0, 1, 2]  # the running one is ahead
    jobs.cancel(second)
    assert jobs.ahead(third) == 1
    jobs.finish(first, b"", 1)
    assert jobs.ahead(third) == 0


def test_every_change_wakes_the_event_streams_of_the_job_and_of_those_behind_it(clock):
    jobs = table(clock)
    first, second = new(jobs), new(jobs)
    waiting_first, waiting_second = first.changed, second.changed
    jobs.start(first)
    assert waiting_first.is_set(), "running is news to its own stream"
    assert waiting_second.is_set(), "the second job moved up the queue"
    step_event = first.changed
    jobs.progress(first, 1, 1)
    assert step_event.is_set() and first.changed is not step_event


def test_endings_are_final(clock):
    jobs = table(clock)
    job = new(jobs)
    jobs.cancel(job)
    jobs.finish(job, b"late", 1)
    jobs.fail(job, "late")
    jobs.progress(job, 3, 1)
    assert job.status is JobStatus.CANCELLED and job.video is None and job.error is None and job.step == 0


def test_active_jobs_are_bounded(clock):
    jobs = table(clock, max_active=2)
    first, _ = new(jobs), new(jobs)
    with pytest.raises(Full, match="2 jobs are already waiting or running"):
        new(jobs)
    jobs.fail(first, "no")
    new(jobs)  # room again


def test_finished_jobs_are_kept_for_a_time_and_a_count(clock):
    jobs = table(clock, max_kept=2, keep_s=60)
    done = [new(jobs) for _ in range(3)]
    running = new(jobs)
    for job in done:
        clock.now += 1
        jobs.finish(job, b"x", 1)
    assert jobs.get(done[0].id) is None, "the oldest finished job goes past max_kept"
    assert jobs.get(done[1].id) is done[1] and jobs.get(done[2].id) is done[2]
    clock.now += 61
    assert jobs.get(done[1].id) is None and jobs.get(done[2].id) is None, "kept keep_s seconds"
    assert jobs.get(running.id) is running, "an active job is never dropped"


@pytest.mark.parametrize("name", ["max_active", "max_kept", "keep_s"])
def test_settings_must_be_positive(name):
    with pytest.raises(ValueError, match=f"args.jobs.{name}: must be positive"):
        JobSettings(**{name: 0})
