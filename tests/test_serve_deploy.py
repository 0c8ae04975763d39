"""`ray serve deploy configs/serve.yaml` against a running cluster (`ray start --head`), as the README says."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import yaml

from tests.test_serve import BIN, TINY, free_port, mp4_frames, post, sampled_here, serve_yaml, wait_healthy


@pytest.mark.slow
def test_ray_serve_deploy_on_a_started_cluster(tmp_path, debug_models):
    http_port, gcs_port, dashboard_port = free_port(), free_port(), free_port()
    config = serve_yaml(tmp_path, debug_models, http_port)
    # As the README says: relative paths resolve against the folder `ray start` ran in.
    raw = yaml.safe_load(config.read_text())
    raw["applications"][0]["args"]["config"] = "inference.py"
    config.write_text(yaml.safe_dump(raw))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env |= {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(BIN / "ray")
    start = [ray, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--num-cpus=2"]
    started = subprocess.run(start, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        # Ray 2.60's `ray start --head` turns on token authentication; the serve CLI needs to know.
        deploy = [ray, "serve", "deploy", str(config), "--address", f"http://127.0.0.1:{dashboard_port}"]
        deployed = subprocess.run(
            deploy, cwd=tmp_path, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180
        )
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url, None)
        status, headers, body = post(url, {**TINY, "num_frames": 3})
        assert status == 200 and headers["content-type"] == "video/mp4"
        served = mp4_frames(body, tmp_path).astype(int)
        assert served.shape == (3, 32, 32, 3)
        # The deployment samples the request as the library does: same seed, size and steps, same video.
        # (Untrained weights on both sides: the zero-initialised final layer makes the model's output the same.)
        expected = sampled_here(tmp_path / "inference.py", {**TINY, "num_frames": 3}, tmp_path)
        assert np.abs(served - expected).mean() < 0.5
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
