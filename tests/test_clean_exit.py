"""A command's local Ray instance ends with it: after Ctrl-C or `kill -9` of `sora preprocess`,
nothing it started is running a few seconds later; and a running local Ray instance is not joined."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil
import pytest

from tests.conftest import SORA, run_sora, write_config

pytestmark = pytest.mark.slow


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def live(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def started_preprocess(demo_csv, debug_models, folder) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`sora preprocess` running with its Ray instance up: (the driver, its descendants then)."""
    config = write_config(folder, debug_models)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [SORA, "preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(folder / "cache")]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        children = live(psutil.Process(driver.pid).children(recursive=True))
        if any("raylet" in command_line(child) for child in children):
            time.sleep(3)  # workers start too
            return driver, live(psutil.Process(driver.pid).children(recursive=True))
        assert driver.poll() is None and time.monotonic() < deadline, "Ray never started"
        time.sleep(0.2)


def still_running(processes: list[psutil.Process], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        alive = live(processes)
        if not alive or time.monotonic() > deadline:
            return [command_line(p)[:80] for p in alive]
        time.sleep(0.2)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_nothing_outlives_the_driver(demo_csv, debug_models, tmp_path, how):
    driver, started = started_preprocess(demo_csv, debug_models, tmp_path)
    assert len(started) >= 3, [command_line(p) for p in started]
    os.kill(driver.pid, how)
    driver.wait(timeout=60)
    left = still_running([p for p in started if "pipelines.reaper" not in command_line(p)], within=10)
    assert not left, f"still running 10 s after the driver ended: {left}"


def test_a_running_local_instance_is_not_joined(demo_csv, debug_models, tmp_path):
    """`ray start --head` (as for `ray serve deploy`) beside it: `sora preprocess` starts its own
    instead of trying to join it (which failed: num_cpus may not be given to a running cluster)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    ray = str(os.path.join(os.path.dirname(SORA), "ray"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = [ray, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"]
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        config = write_config(tmp_path, debug_models)
        result = run_sora("preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(tmp_path / "c"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
