"""Nothing outlives the command that started it: a watcher for the local Ray instance of a command.

A command that starts its own local Ray instance (`pipelines.cluster.connect` without an
address) also starts this watcher, in a session of its own (Ctrl-C in the terminal does not
reach it). It keeps a list of the command's descendant processes (Ray's GCS, raylet, agents
and workers) up to date, and when the command is gone, however it went (a normal exit,
Ctrl-C, `kill -9`), it stops whatever of that list still runs: SIGTERM, then SIGKILL after a
grace period. The command's end is seen as the end of its pipe to the watcher.

    python -m pipelines.reaper PID   # stdin: a pipe held open by process PID
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5  # how often the list of processes is refreshed
GRACE_S = 2.0  # after the command ends: time for Ray's own shutdown, then SIGTERM, then SIGKILL


def start(pid: int | None = None) -> subprocess.Popen:
    """Start the watcher of process `pid` (this one by default); it lives as long as the pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.reaper", str(pid or os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def watch(pid: int, pipe: int) -> None:
    """Track `pid`'s descendants until `pipe` closes, then stop those still running."""
    known: dict[int, psutil.Process] = {}
    try:
        command = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while True:
        try:
            for child in command.children(recursive=True):
                if child.pid != os.getpid():  # this watcher is the command's child too
                    known.setdefault(child.pid, child)  # psutil.Process keeps its start time: no PID reuse
        except psutil.NoSuchProcess:
            break
        ready, _, _ = select.select([pipe], [], [], POLL_S)
        if ready and not os.read(pipe, 4096):
            break  # the command ended: its end of the pipe closed
    time.sleep(GRACE_S)
    # A process started after the last refresh (a worker the raylet spawned just before the end)
    # is found under its parent now, where that parent is known and still the same process
    # (is_running compares start times: a reused PID is not ours).
    for process in list(known.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running():
                for child in process.children(recursive=True):
                    known.setdefault(child.pid, child)
    alive = [process for process in known.values() if process.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; this cleans up after it
    watch(int(sys.argv[1]), sys.stdin.fileno())
