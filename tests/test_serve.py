"""The Ray Serve application: request checking on its own, then `serve run` with configs/serve.yaml over HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import decord
import numpy as np
import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.serve import RequestError, ServeArgs, ServeLimits, parse_request
from tests.conftest import ROOT
from tests.test_sample import inference_config, reference_media, round_trip, round_trips

SERVE_YAML = ROOT / "configs" / "serve.yaml"
TINY = {"prompt": "still there", "num_frames": 2, "image_size": [32, 32], "num_sampling_steps": 1}  # a fast request
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def base_config(tmp_path_factory, debug_models):
    folder = tmp_path_factory.mktemp("serve-config")
    return load_config(inference_config(folder, debug_models), "inference")


@pytest.mark.parametrize(
    ("payload", "status", "field", "message"),
    [
        ([1, 2], 400, None, "the body must be a JSON object, got list"),
        ({}, 400, "prompt", "prompt: required"),
        ({"prompt": "  "}, 400, "prompt", "prompt: required"),
        ({"prompt": "x" * 3000}, 400, "prompt", "prompt: 3000 characters, the limit is 2000"),
        ({"prompt": "a", "promt": "b"}, 400, "promt", "unknown field 'promt' (did you mean 'prompt'?)"),
        ({"prompt": "a", "num_frames": "8"}, 400, "num_frames", 'num_frames: must be an integer, got "8"'),
        ({"prompt": "a", "num_frames": True}, 400, "num_frames", "num_frames: must be an integer, got true"),
        ({"prompt": "a", "num_frames": 10**9}, 400, "num_frames", "num_frames: must be between 1 and 128"),
        ({"prompt": "a", "image_size": [64]}, 400, "image_size", "image_size: must be [height, width] integers"),
        ({"prompt": "a", "image_size": [64.0, 64]}, 400, "image_size", "must be [height, width] integers"),
        ({"prompt": "a", "image_size": [100000, 100000]}, 400, "image_size", "height x width at most 921600"),
        ({"prompt": "a", "image_size": [8, 64]}, 400, "image_size", "each side must be at least 16"),
        ({"prompt": "a", "seed": -1}, 400, "seed", "seed: must be between 0 and"),
        ({"prompt": "a", "num_sampling_steps": 0}, 400, "num_sampling_steps", "must be between 1 and 250"),
        ({"prompt": "a", "cfg_scale": "7"}, 400, "cfg_scale", "cfg_scale: must be a number"),
        ({"prompt": "a", "cfg_scale": 1e9}, 400, "cfg_scale", "cfg_scale: must be between 0 and 50.0"),
        ({"prompt": "a", "loop": 99}, 400, "loop", "loop: must be between 1 and 16"),
        ({"prompt": "a", "loop": 16, "num_frames": 64, "condition_frame_length": 1}, 400, "loop", "the limit is 512"),
        # 143 frames kept, but 16 clips of 128 are sampled: the limit counts the work
        ({"prompt": "a", "loop": 16, "num_frames": 128, "condition_frame_length": 127}, 400, "loop", "2048 frames"),
        ({"prompt": "a", "loop": 2, "condition_frame_length": 0}, 400, "condition_frame_length", "between 1 and"),
        ({"prompt": "a", "mask_strategy": [0, 0]}, 400, "mask_strategy", "mask_strategy: must be a string"),
        ({"prompt": "a", "reference": {"a": 1}}, 400, "reference", "reference: must be a list"),
        ({"prompt": "a", "reference": [1]}, 400, "reference[0]", "reference[0]: must be a base64 string"),
        ({"prompt": "a", "reference": ["/etc/passwd"]}, 400, "reference[0]", "looks like a path or URL"),
        ({"prompt": "a", "reference": ["demo/data/a.png"]}, 400, "reference[0]", "looks like a path or URL"),
        ({"prompt": "a", "reference": ["https://x.org/a"]}, 400, "reference[0]", "looks like a path or URL"),
        ({"prompt": "a", "reference": ["not base64!"]}, 400, "reference[0]", "reference[0]: not valid base64"),
        ({"prompt": "a", "reference": [""]}, 400, "reference[0]", "reference[0]: empty"),
        ({"prompt": "a", "reference": ["AAAA"] * 9}, 400, "reference", "reference: 9 files; the limit is 8"),
    ],
)
def test_bad_requests_name_the_field(base_config, payload, status, field, message):
    with pytest.raises(RequestError) as caught:
        parse_request(payload, base_config, ServeLimits())
    assert (caught.value.status, caught.value.field) == (status, field)
    assert message in caught.value.message, caught.value.message


def test_a_good_request_becomes_the_servers_config_with_its_settings(base_config):
    payload = {"prompt": "a red circle", "num_frames": 5, "image_size": [64, 96], "seed": 3, "cfg_scale": 2,
               "num_sampling_steps": 4, "loop": 2, "condition_frame_length": 1, "mask_strategy": "0,0,0,1,0",
               "reference": [base64.b64encode(b"bytes").decode()]}  # fmt: skip
    job = parse_request(payload, base_config, ServeLimits())
    config = job.config
    assert (config.num_frames, config.image_size, config.seed, config.loop) == (5, (64, 96), 3, 2)
    assert (config.scheduler.num_sampling_steps, config.scheduler.cfg_scale) == (4, 2.0)
    assert config.long_video.total_frames == 9 and job.media == (b"bytes",)
    assert config.vae == base_config.vae and config.model == base_config.model  # the server's models
    defaults = parse_request({"prompt": "a"}, base_config, ServeLimits()).config
    assert (defaults.num_frames, defaults.image_size, defaults.loop) == (8, (144, 256), 1)
    # The config's condition_frame_length (2) is for long video; one 1-frame clip does not trip over it.
    assert parse_request({"prompt": "a", "num_frames": 1}, base_config, ServeLimits()).config.num_frames == 1
    long = parse_request({"prompt": "a", "loop": 2}, base_config, ServeLimits()).config
    assert long.condition_frame_length == 2 and long.long_video.total_frames == 14


def test_serve_args_are_checked():
    with pytest.raises(ConfigError, match=re.escape("args: unknown key 'ckpt' (did you mean 'ckpt_path'?)")):
        ServeArgs.parse({"config": "c.py", "ckpt": "x"})
    with pytest.raises(ConfigError, match=re.escape("args.limits: unknown key 'max_frames'")):
        ServeArgs.parse({"config": "c.py", "limits": {"max_frames": 3}})
    with pytest.raises(ConfigError, match=re.escape("args.config: missing")):
        ServeArgs.parse({})
    assert ServeArgs.parse({"config": "c.py", "limits": {"max_loop": 2}}).limits.max_loop == 2


def test_configs_serve_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else None
    schema = schema or ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "pipelines.serve:build_app"
    args = ServeArgs.parse(app.args)
    assert load_config(ROOT / args.config, "inference").model.type == "demo"
    assert {d.name for d in app.deployments} == {"SoraGenerator", "SoraAPI"}


# --------------------------------------------------------------------------- over HTTP, with `serve run`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BODY_TIMEOUT_S = 3  # the test server's: a stalled upload is refused after this long
MAX_ACTIVE = 4  # the test server's jobs waiting or running at once


def serve_yaml(folder: Path, models: dict[str, Path], port: int) -> Path:
    """configs/serve.yaml pointed at the test's models and port, with room for 4 jobs (1 sampling, 1 waiting
    in the generator's queue, 2 in the ingress) and a short body timeout."""
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"]["config"] = str(inference_config(folder, models))
    app["args"]["ckpt_path"] = None  # the debug model's initial weights: sampling works the same
    app["args"]["limits"]["body_timeout_s"] = BODY_TIMEOUT_S
    app["args"]["jobs"] = {"max_active": MAX_ACTIVE}
    for deployment in app["deployments"]:
        if deployment["name"] == "SoraGenerator":
            deployment["max_ongoing_requests"] = deployment["max_queued_requests"] = 1
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


def post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def mp4_frames(data: bytes, folder: Path) -> np.ndarray:
    path = folder / f"response-{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def sampled_here(config_path: Path, request: dict, folder: Path) -> np.ndarray:
    """The video a server of this config owes `request`: sampled in this process, through an mp4 (decoded)."""
    from pipelines.media import encode_mp4
    from pipelines.sample import Sampler, prepare_item

    base = load_config(config_path, "inference")
    job = parse_request(request, base, ServeLimits())
    item = prepare_item(job.prompt, [], job.mask_strategy, job.config, [])
    frames = Sampler(base).generate([item], job.config, job.config.seed)[0]
    return mp4_frames(encode_mp4(frames, job.config.save_fps), folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory, debug_models):
    """`serve run` on a test copy of configs/serve.yaml, as the README runs it."""
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    config = serve_yaml(folder, debug_models, port)
    log = (folder / "serve.log").open("w")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own local Ray
    env |= {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [str(BIN / "serve"), "run", str(config)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, folder
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_health_and_description(server):
    url, _ = server
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == "debug"
    assert health["checkpoint"] is None and health["jobs"] == {"running": 0, "queued": 0}
    with urllib.request.urlopen(f"{url}/api", timeout=10) as response:
        description = json.loads(response.read())
    assert description["fields"]["num_frames"] == 8 and description["limits"]["max_num_frames"] == 32
    assert description["fields"]["time_limit_s"] == 600 and "POST /jobs" in description["routes"]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/html")
        page = response.read().decode()
    assert "static/app.js" in page and "static/style.css" in page
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{url}/static/{name}", timeout=10) as response:
            assert response.status == 200 and len(response.read()) > 100


def test_generate_returns_a_decodable_mp4_reproducible_by_seed(server):
    url, folder = server
    request = {"prompt": "a red circle moves left", "num_frames": 5, "image_size": [64, 96], "seed": 11,
               "num_sampling_steps": 3}  # fmt: skip
    status, headers, body = post(url, request)
    assert status == 200, body[:500]
    assert headers["content-type"] == "video/mp4" and headers["x-sora-seed"] == "11"
    video = mp4_frames(body, folder)
    assert video.shape == (5, 64, 96, 3)
    _, _, again = post(url, request)
    assert np.abs(mp4_frames(again, folder).astype(int) - video).mean() < 0.5
    _, _, other = post(url, {**request, "seed": 12})
    assert np.abs(mp4_frames(other, folder).astype(int) - video).mean() > 5


def test_long_video_with_an_uploaded_reference(server, debug_models):
    url, folder = server
    image, clip = reference_media(folder)
    from PIL import Image

    with Image.open(image) as png:  # a JPEG's base64 starts with "/9j/": bytes, not a path
        png.convert("RGB").save(image.with_suffix(".jpg"), quality=90)
    image = image.with_suffix(".jpg")
    request = {"prompt": "a yellow disc", "num_frames": 5, "image_size": [64, 64], "num_sampling_steps": 2,
               "loop": 3, "condition_frame_length": 2, "mask_strategy": "0,0,0,1,0;1,2,3,2,-2",
               "reference": [base64.b64encode(image.read_bytes()).decode(),
                             base64.b64encode(clip.read_bytes()).decode()]}  # fmt: skip
    status, _, body = post(url, request)
    assert status == 200, body[:500]
    video = mp4_frames(body, folder).astype(float)
    assert video.shape == (3 * (5 - 2) + 2, 64, 64, 3)
    # The held frames are the uploads after the VAE round trip (and H.264): the video opens with the
    # image and ends with the clip's frames 3 and 4 (each nearest its own frame of the clip).
    from sora_model.vae import VideoAutoencoderKL

    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]))
    expected = round_trip(vae, image, 64, 64)
    distances = [np.abs(frame - expected).mean() for frame in video]
    assert distances[0] < 0.6 * min(distances[1:]), distances
    clip_frames = round_trips(vae, clip, range(12), 64, 64)
    for index, frame in zip((3, 4), video[-2:], strict=True):
        distances = [np.abs(frame - other).mean() for other in clip_frames]
        assert np.argmin(distances) == index and min(distances) < 0.7 * sorted(distances)[1], distances


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        ({"prompt": 7}, 400, "prompt"),
        ({"prompt": "a", "num_frames": "many"}, 400, "num_frames"),
        ({"prompt": "a", "image_size": [4096, 4096]}, 400, "image_size"),
        ({"prompt": "a", "image_size": [64, 70]}, 400, "image_size"),
        ({"prompt": "a", "mask_strategy": "0,0,0,1"}, 400, "mask_strategy"),
        ({"prompt": "a", "mask_strategy": "0,0,0,1,0"}, 400, "mask_strategy"),  # no reference to index
        ({"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": ["/etc/hostname"]}, 400, "reference[0]"),
        ({"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": ["aGVsbG8="]}, 400, "reference[0]"),
        (
            {"prompt": "a", "image_size": [64, 64], "num_frames": 2, "loop": 2, "condition_frame_length": 2},
            400,
            "condition_frame_length",
        ),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, body, status, field):
    url, _ = server
    got, _, answer = post(url, body)
    assert got == status, answer[:300]
    error = json.loads(answer)
    assert error["field"] == field and error["error"]
    assert "/tmp" not in error["error"]  # nothing of the server's file system leaks
    ok, _, _ = post(url, TINY)
    assert ok == 200


def post_streaming(url: str, size: int) -> tuple[int, bytes]:
    """POST `size` bytes while reading the answer, as curl does: the server may answer before the body ends."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {size}\r\n\r\n"

    def send() -> None:
        try:
            sock.sendall(head.encode())
            chunk = b"x" * 2**20
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: expected

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    sender.join(timeout=60)
    return response.status, body


def test_a_body_over_the_limit_gets_413(server):
    url, _ = server
    status, body = post_streaming(url, 33 * 2**20)  # the yaml allows 32 MiB
    assert status == 413 and json.loads(body)["error"].startswith("the body has 34603008 bytes; the limit is")
    assert post(url, TINY)[0] == 200


def test_wrong_route_and_method(server):
    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{url}/generate", timeout=10)  # GET
    assert caught.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{url}/nothing", timeout=10)
    assert caught.value.code == 404


def test_health_answers_while_a_video_is_sampled(server):
    url, _ = server
    slow = {"prompt": "busy", "num_frames": 8, "image_size": [144, 256], "num_sampling_steps": 40}  # about 2 s
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(post, url, slow)
        time.sleep(0.3)
        start = time.monotonic()
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
        answered = time.monotonic() - start
        assert not sampling.done(), "the request was too quick to show anything"
        assert answered < 1.0
        assert sampling.result()[0] == 200


def test_overload_gets_503_then_recovers(server):
    """Four jobs are taken (the test yaml's jobs.max_active), the rest get a JSON 503 with Retry-After."""
    url, _ = server
    slow = {"prompt": "busy", "num_frames": 8, "image_size": [64, 64], "num_sampling_steps": 60}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: post(url, slow, timeout=300), range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(503) >= 2 and statuses.count(200) >= 1, statuses
    assert set(statuses) <= {200, 503}
    busy = next(result for result in results if result[0] == 503)
    assert busy[1]["retry-after"] == "5" and "busy" in json.loads(busy[2])["error"]
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert response.status == 200
    assert post(url, TINY)[0] == 200


# --------------------------------------------------------------------------- jobs: progress, cancelling, time limits

SLOW = {"prompt": "slow", "num_frames": 8, "image_size": [144, 256], "num_sampling_steps": 100, "loop": 4,
        "condition_frame_length": 1}  # 400 steps, tens of seconds on 2 cores  # fmt: skip


def call(url: str, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60):
    """(status, headers with lower-case names, body bytes) of one request."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, answer = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, answer = error.code, error.headers, error.read()
    return status, {key.lower(): value for key, value in headers.items()}, answer


def submit(url: str, body: dict) -> dict:
    status, headers, answer = call(url, "POST", "/jobs", body)
    assert status == 202, answer[:300]
    job = json.loads(answer)
    assert headers["location"] == f"jobs/{job['id']}"
    return job


def job_state(url: str, job_id: str) -> dict:
    status, _, answer = call(url, "GET", f"/jobs/{job_id}")
    assert status == 200, answer[:300]
    return json.loads(answer)


def wait_for(url: str, job_id: str, done, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(url, job_id)
        if done(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: still {state} after {timeout} s")


def read_events(url: str, job_id: str, timeout: float = 120) -> list[dict]:
    """Every server-sent event of a job, to the end of the stream."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.request("GET", f"/jobs/{job_id}/events")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in response:
        if line.startswith(b"data: "):
            events.append(json.loads(line[len(b"data: ") :]))
    connection.close()
    return events


def test_a_job_streams_one_event_per_step_and_serves_its_video(server):
    url, folder = server
    request = {"prompt": "a red circle moves left", "num_frames": 5, "image_size": [64, 96], "seed": 11,
               "num_sampling_steps": 6, "loop": 2, "condition_frame_length": 1}  # fmt: skip
    first = submit(url, {"prompt": "ahead", "num_frames": 8, "image_size": [144, 256], "num_sampling_steps": 30})
    job = submit(url, request)  # queued behind the first: its stream is open before its first step
    assert job["status"] == "queued" and job["position"] == 1
    assert job["total_steps"] == 12 and job["loops"] == 2
    events = read_events(url, job["id"])
    assert events[0]["status"] == "queued" and job_state(url, first["id"])["status"] == "done"
    steps = [event["step"] for event in events if event["status"] == "running" and event["step"] > 0]
    assert steps == list(range(1, 13)), f"one event per diffusion step, in order: {steps}"
    assert [event["clip"] for event in events if event["step"] in (6, 7)] == [1, 2]
    assert events[-1]["status"] == "done" and events[-1]["eta_s"] is None and events[-1]["frames"] == 9
    running = [event for event in events if event["status"] == "running" and event["step"] > 0]
    assert all(event["eta_s"] is not None and event["eta_s"] >= 0 for event in running)
    status, headers, video = call(url, "GET", f"/jobs/{job['id']}/video")
    assert status == 200 and headers["content-type"] == "video/mp4"
    frames = mp4_frames(video, folder)
    assert frames.shape == (9, 64, 96, 3)
    # The same request through POST /generate gives the same video.
    _, _, direct = post(url, request)
    assert np.abs(mp4_frames(direct, folder).astype(int) - frames).mean() < 0.5
    assert json.loads(call(url, "GET", "/jobs/nope")[2])["error"].startswith("no job 'nope'")


def test_cancelling_a_running_job_stops_it_within_a_step_and_frees_the_replica(server):
    url, _ = server
    job = submit(url, SLOW)
    running = wait_for(url, job["id"], lambda state: state["step"] >= 2)
    status, _, answer = call(url, "DELETE", f"/jobs/{job['id']}")
    assert status == 200 and json.loads(answer)["status"] == "cancelled"
    start = time.monotonic()
    quick = submit(url, TINY)
    wait_for(url, quick["id"], lambda state: state["status"] == "done", timeout=60)
    freed_after = time.monotonic() - start
    cancelled = job_state(url, job["id"])
    assert cancelled["status"] == "cancelled" and cancelled["step"] < cancelled["total_steps"]
    seconds_per_step = running["elapsed_s"] / running["step"]
    # The replica took the next job long before the cancelled one's remaining steps would have run.
    assert freed_after < 0.25 * seconds_per_step * (cancelled["total_steps"] - cancelled["step"]), freed_after
    status, _, answer = call(url, "GET", f"/jobs/{job['id']}/video")
    assert status == 409 and "cancelled" in json.loads(answer)["error"]


def test_a_client_that_disconnects_from_generate_cancels_its_job(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(SLOW | {"prompt": "abandoned"}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip

    def abandoned() -> dict | None:
        jobs = json.loads(call(url, "GET", "/jobs")[2])["jobs"]
        return next((job for job in jobs if job["prompt"] == "abandoned"), None)

    deadline = time.monotonic() + 60
    while (job := abandoned()) is None or job["step"] < 1:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    sock.close()
    state = wait_for(url, job["id"], lambda state: state["status"] != "running", timeout=30)
    assert state["status"] == "cancelled" and state["step"] < state["total_steps"]


def test_a_time_limit_ends_a_job(server):
    url, _ = server
    status, _, answer = post(url, SLOW | {"time_limit_s": 1})
    assert status == 504 and json.loads(answer)["field"] == "time_limit_s"
    assert "time limit of 1 s reached" in json.loads(answer)["error"]
    job = submit(url, SLOW | {"time_limit_s": 1.5})
    state = wait_for(url, job["id"], lambda state: state["status"] != "queued" and state["status"] != "running")
    assert state["status"] == "failed" and state["error"].startswith("time limit of 1.5 s reached")
    status, _, answer = call(url, "POST", "/jobs", TINY | {"time_limit_s": 10**6})
    assert status == 400 and json.loads(answer)["field"] == "time_limit_s"


# --------------------------------------------------------------------------- faults found under load


def stalled_connection(url: str) -> socket.socket:
    """A POST whose headers promise a body that never comes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 1000\r\n\r\n{{\"prompt\": ".encode())  # fmt: skip
    return sock


def test_health_answers_at_once_with_stalled_uploads_and_a_full_queue(server):
    url, _ = server
    stalled = [stalled_connection(url) for _ in range(32)]
    try:
        jobs = []
        while len(jobs) < MAX_ACTIVE:  # fill the queue: the next job is refused
            status, headers, answer = call(url, "POST", "/jobs", SLOW)
            if status == 202:
                jobs.append(json.loads(answer)["id"])
            else:
                assert status == 503 and headers["retry-after"] == "5", answer[:300]
                time.sleep(0.2)  # a job of an earlier test still ending
        status, headers, answer = call(url, "POST", "/jobs", TINY)
        assert status == 503 and headers["retry-after"] == "5" and json.loads(answer)["error"].startswith("busy")
        times = []
        for _ in range(5):
            start = time.monotonic()
            status, _, answer = call(url, "GET", "/health", timeout=10)
            times.append(time.monotonic() - start)
            assert status == 200
        assert json.loads(answer)["jobs"]["running"] + json.loads(answer)["jobs"]["queued"] == MAX_ACTIVE
        assert sorted(times)[len(times) // 2] < 0.1, times  # the median of 5: under 100 ms
        # A stalled upload is answered 408 once the body timeout passes.
        response = http.client.HTTPResponse(stalled[0])
        response.begin()
        assert response.status == 408 and "did not arrive within 3 s" in json.loads(response.read())["error"]
    finally:
        for sock in stalled:
            sock.close()
        for job_id in jobs:
            call(url, "DELETE", f"/jobs/{job_id}")


def test_a_burst_gets_only_accepted_jobs_or_json_503s(server):
    url, _ = server
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: call(url, "POST", "/jobs", SLOW, timeout=120), range(60)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {202, 503} and statuses.count(503) >= 60 - MAX_ACTIVE, statuses
    for status, headers, answer in results:
        if status == 503:
            assert headers["content-type"] == "application/json" and headers["retry-after"] == "5"
            assert json.loads(answer)["error"].startswith("busy")
        else:
            call(url, "DELETE", f"/jobs/{json.loads(answer)['id']}")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (its data ends at once)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": [b64(png_claiming(20000, 20000))]},
            "reference[0]",
            "reference[0]: the image claims 400000000 pixels; the limit is 16777216",
        ),
        (
            {"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": [b64(png_claiming(100000, 100000))]},
            "reference[0]",
            "the image claims 10000000000 pixels",
        ),
        (
            {"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": [b64(png_claiming(5000, 4000))]},
            "reference[0]",
            "reference[0]: 4000x5000 pixels; the limit is 16777216",
        ),
        (
            {"prompt": "a", "mask_strategy": "0,0,0,1,0", "reference": [b64(b"\x00\x01garbage" * 50)]},
            "reference[0]",
            "reference[0]:",
        ),
        (b'{"prompt": "a lone \\ud800 surrogate"}', "prompt", "prompt: not valid text: a lone surrogate U+D800"),
        (b'{"prompt": "\\udfff"}', "prompt", "a lone surrogate U+DFFF at character 0"),
    ],
    ids=["bomb-20000", "bomb-100000", "too-large", "undecodable", "surrogate", "low-surrogate"],
)
def test_media_and_text_that_cannot_be_decoded_are_400s_naming_the_field(server, body, field, message):
    url, _ = server
    status, _, answer = post(url, body)
    assert status == 400, answer[:300]
    error = json.loads(answer)
    assert error["field"] == field and message in error["error"], error


def test_a_reference_no_tuple_uses_is_refused_over_http(server):
    url, folder = server
    image, _ = reference_media(folder)
    request = TINY | {"mask_strategy": "0,0,0,1,0", "reference": [b64(image.read_bytes())] * 2}
    status, _, answer = post(url, request)
    assert status == 400 and json.loads(answer) == {
        "error": "reference[1]: no mask_strategy tuple uses it; name it in a tuple or leave it out",
        "field": "reference[1]",
    }
    status, _, answer = post(url, TINY | {"reference": [b64(image.read_bytes())]})  # no tuple at all
    assert status == 400 and json.loads(answer)["field"] == "reference[0]"


def malformed_requests() -> list[tuple[str, str, bytes | None]]:
    """(method, path, body): at least 200 requests the server must refuse with a 4xx, and go on serving."""
    cases: list[tuple[str, str, bytes | None]] = []
    for body in [b"", b"{", b"[", b"null", b"1", b'"x"', b"{}", b"[]", b"\xff\xfe\x00", b"{" * 5000, b"[" * 100000,
                 b'{"prompt": NaN}', b'{"prompt": Infinity}', b'{"prompt": "a",}', b"{'prompt': 'a'}",
                 b'{"prompt": "a"} trailing', b'\xef\xbb\xbf{"prompt": 1}', b'{"prompt": "\\ud800\\u0041"}',
                 b'{"prompt": "a", "prompt": 5}', b'{"prompt": "' + b"x" * 5000 + b'"}']:  # fmt: skip
        cases.append(("POST", "/generate", body))
        cases.append(("POST", "/jobs", body))
    bad_values = [None, True, "7", [], {}, -1, 1e308, 10**30, "", 1.5, [1, 2, 3], {"a": 1}]
    for field in ("num_frames", "image_size", "seed", "num_sampling_steps", "cfg_scale", "loop",
                  "condition_frame_length", "mask_strategy", "reference", "time_limit_s"):  # fmt: skip
        for value in bad_values:
            if field in ("mask_strategy", "reference") and value in (None, "", [], {}):
                continue  # an empty strategy or reference list is valid
            if field == "reference" and value in ("7",):
                value = "7 is not base64!"
            if field in ("cfg_scale", "time_limit_s") and value == 1.5:
                value = -1.5  # a fraction is a valid guidance scale and time limit
            cases.append(("POST", "/jobs", json.dumps({"prompt": "a", field: value}).encode()))
    for strategy in ["a,b", "0,0,0,1,0,2", "0;;x", "-1,0,0,1,0", "0,0,0,0,0", "0,0,0,1,0,1.5", "9,0,0,1,0",
                     "0,0,0,1,99", "0,9,0,1,0", "0,0,5,1,0", "0,0,0,1,0;0,0,0,1,0", "１,0,0,1,0", "0,0,0,1,0\n1",
                     "0" * 3000, ";", "0,0,0,1,0,", " , , , , "]:  # fmt: skip
        cases.append(("POST", "/jobs", json.dumps({"prompt": "a", "mask_strategy": strategy,
                                                   "reference": [b64(png_claiming(8, 8))]}).encode()))  # fmt: skip
    for reference in [
        "/etc/passwd",
        "../x.png",
        "file:///etc/passwd",
        "http://127.0.0.1/x.png",
        "~/a.jpg",
        "C:\\a.png",
        "====",
        "YQ",
        "\u00e9\u00e9",
        b64(b"GIF89a" + b"\x00" * 20),
        b64(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40),
        b64(png_claiming(0, 0)),
        b64(png_claiming(2**31 - 1, 2**31 - 1)),
        b64(png_claiming(30000, 1)),
        b64(b"RIFF0000WEBPVP8 "),
    ]:
        cases.append(("POST", "/generate", json.dumps({"prompt": "a", "mask_strategy": "0,0,0,1,0",
                                                       "reference": [reference]}).encode()))  # fmt: skip
    for prompt in ["", " ", "\t\n", "x" * 2001, "\ud800", "a\udc00b", 5, None, ["a"], {"text": "a"}]:
        try:
            body = json.dumps({"prompt": prompt}).encode()
        except UnicodeEncodeError:
            body = json.dumps({"prompt": prompt}, ensure_ascii=True).encode()
        cases.append(("POST", "/generate", body))
    for name in ["promt", "Prompt", "steps", "num_frame", "cfg", "ref", "", "__class__", "a" * 300, "seed "]:
        cases.append(("POST", "/jobs", json.dumps({"prompt": "a", name: 1}).encode()))
    for method, path in [("GET", "/generate"), ("PUT", "/generate"), ("DELETE", "/generate"), ("PUT", "/jobs"),
                         ("DELETE", "/jobs"), ("POST", "/health"), ("DELETE", "/health"), ("POST", "/"),
                         ("PUT", "/api"), ("POST", "/api"), ("GET", "/static/../serve.py"), ("GET", "/static/"),
                         ("GET", "/static/x.js"), ("GET", "/static/app.js/x"), ("POST", "/static/app.js"),
                         ("GET", "/jobs/unknown"), ("DELETE", "/jobs/unknown"), ("GET", "/jobs/unknown/video"),
                         ("GET", "/jobs/unknown/events"), ("GET", "/jobs/a/b/c"), ("POST", "/jobs/unknown"),
                         ("GET", "/../../etc/passwd"), ("GET", "/etc/passwd"), ("GET", "/%2e%2e/%2e%2e/x"),
                         ("GET", "/index.html"), ("GET", "/jobs/%00"), ("PATCH", "/jobs"), ("GET", "/health/x"),
                         ("GET", "/api/x"), ("OPTIONS", "/generate")]:  # fmt: skip
        cases.append((method, path, None))
    return cases


def raw_request(url: str, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    return response.status, answer


def test_a_corpus_of_malformed_requests_gets_no_5xx_and_no_server_path(server):
    url, folder = server
    cases = malformed_requests()
    assert len(cases) >= 200
    private = [str(folder), str(ROOT), os.path.expanduser("~"), "/tmp/", sys.prefix]
    failures = []
    for method, path, body in cases:
        status, answer = raw_request(url, method, path, body)
        text = answer.decode("utf-8", "replace")
        if not 400 <= status < 500 or any(root in text for root in private):
            failures.append((method, path, (body or b"")[:80], status, text[:200]))
        else:
            json.loads(answer)  # every refusal is JSON
    assert not failures, failures
    for path in ("/health", "/api", "/jobs"):
        assert not any(root in call(url, "GET", path)[2].decode() for root in private), path
    assert post(url, TINY)[0] == 200  # still serving


# --------------------------------------------------------------------------- the web page, in a real browser

ARTIFACTS = ROOT / "test-artifacts"  # screenshots of the page; CI keeps the folder


def chromium_driver():
    """Headless Chromium driven by Selenium, with Debian's chromium and chromium-driver; skips,
    saying how to get them, where they are not installed."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no Chromium here: `apt-get install chromium chromium-driver` (.ci/run does) runs the browser test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [dev] extra: make setup")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a driver on the internet
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1100", "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def test_the_web_page_generates_shows_progress_plays_uploads_and_cancels(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = server
    driver = chromium_driver()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        wait = WebDriverWait(driver, 120, poll_frequency=0.02)
        driver.get(url + "/")
        wait.until(lambda d: "debug" in d.find_element(By.ID, "model-info").text)
        assert driver.find_element(By.ID, "num_frames").get_attribute("value") == "8"  # the server's default

        def fill(**fields) -> None:
            for name, value in fields.items():
                element = driver.find_element(By.ID, name)
                element.clear()
                element.send_keys(str(value))

        def progress() -> tuple[float, float]:
            bar = driver.find_element(By.ID, "progress")
            return float(bar.get_attribute("value")), float(bar.get_attribute("max"))

        # Generate: the progress bar moves step by step, then the video plays.
        fill(prompt="a red circle moves left on a blue background", seed=5, num_frames=8, height=144, width=256,
             num_sampling_steps=60)  # fmt: skip
        driver.find_element(By.ID, "generate").click()
        seen = set()
        wait.until(lambda d: seen.add(progress()[0]) or "done" in d.find_element(By.ID, "status").text)
        advancing = sorted(value for value in seen if 0 < value < 60)
        assert len(advancing) >= 3, f"the bar showed {sorted(seen)}"
        playable = "const v = document.getElementById('result-video'); return [v.readyState, v.duration];"
        wait.until(lambda d: d.execute_script(playable)[0] >= 2)
        ready, duration = driver.execute_script(playable)
        assert ready >= 2 and duration > 0
        assert driver.find_element(By.ID, "download").get_attribute("href")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery .gallery-item")) >= 1
        driver.save_screenshot(str(ARTIFACTS / "web-page-done.png"))

        # A reference image by the file picker: previewed, then used by the mask strategy.
        image, _ = reference_media(folder)
        driver.find_element(By.ID, "reference").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reference-preview img"))
        fill(num_frames=5, height=64, width=64, num_sampling_steps=4, mask_strategy="0,0,0,1,0")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "done" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .gallery-item")) >= 2)

        # Cancel a running job: the page says so, and the server's job is cancelled.
        for remove in driver.find_elements(By.CSS_SELECTOR, "#reference-preview button"):
            remove.click()
        fill(mask_strategy=" ", num_frames=8, height=144, width=256, num_sampling_steps=100, loop=4,
             condition_frame_length=1)  # fmt: skip
        driver.find_element(By.ID, "mask_strategy").clear()
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: progress()[0] >= 2)
        driver.find_element(By.ID, "cancel").click()
        wait.until(lambda d: "cancelled" in d.find_element(By.ID, "status").text)
        jobs = json.loads(call(url, "GET", "/jobs")[2])["jobs"]
        assert jobs[0]["status"] == "cancelled" and jobs[0]["total_steps"] == 400
        driver.set_window_size(1280, 1700)  # the whole page: form, cancelled job and gallery
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(ARTIFACTS / "web-page.png"))
    except Exception:
        driver.save_screenshot(str(ARTIFACTS / "web-page-failed.png"))
        print("status:", driver.find_element(By.ID, "status").text, "error:", driver.find_element(By.ID, "error").text)
        raise
    finally:
        driver.quit()
