"""Joining a Ray cluster: one policy for every command that needs one."""

from __future__ import annotations

import os
from typing import Any

from pipelines import reaper


def connect(address: str | None, local_cpus: int, runtime_env: dict[str, Any] | None = None,
            log_to_driver: bool = False) -> None:  # fmt: skip
    """Join the cluster at `address` (or $RAY_ADDRESS); without either, start a local one.

    A local cluster gets `local_cpus` logical CPUs: they only gate scheduling, so a small
    machine can still place every stage or worker. Its processes end with this command, however
    it ends (`pipelines/reaper.py`). Nothing happens if Ray is already up in this process (a
    test, a notebook, a Serve replica).
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return
    # A new instance of this command's own, even beside a running one (`ray start --head` for
    # `ray serve deploy`) or the stale record of a crashed one: address="local" never joins them.
    global _REAPER
    _REAPER = reaper.start()  # stops what the instance left running, however this command ends
    runtime_env = {"worker_process_setup_hook": "pipelines.cluster.quiet_local_worker", **(runtime_env or {})}
    ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=log_to_driver)  # fmt: skip


# Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, whether
# the run's controller is alive, every second, and warns each time it cannot. A local instance
# has no dashboard (it would cost a small machine a core's worth of start-up), and its placement
# groups end with it anyway, so its warnings are noise: hundreds of lines in a demo's output.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_worker() -> None:
    """Every worker process of a local instance runs this first (`worker_process_setup_hook`)."""
    import logging

    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


_REAPER = None  # the watcher of this process's local Ray instance (its pipe closes when we exit)
