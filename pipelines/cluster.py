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
    ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=log_to_driver)  # fmt: skip


_REAPER = None  # the watcher of this process's local Ray instance (its pipe closes when we exit)
