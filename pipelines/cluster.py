"""Joining a Ray cluster: one policy for every command that needs one."""

from __future__ import annotations

import os
from typing import Any


def connect(address: str | None, local_cpus: int, runtime_env: dict[str, Any] | None = None,
            log_to_driver: bool = False) -> None:  # fmt: skip
    """Join the cluster at `address` (or $RAY_ADDRESS); without either, start a local one.

    A local cluster gets `local_cpus` logical CPUs: they only gate scheduling, so a small
    machine can still place every stage or worker. Nothing happens if Ray is already up
    in this process (a test, a notebook, a Serve replica).
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=local_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=log_to_driver)
