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


def serve_yaml(folder: Path, models: dict[str, Path], port: int) -> Path:
    """configs/serve.yaml pointed at the test's models and port, with room for 2 requests: 1 taken, 1 waiting."""
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"]["config"] = str(inference_config(folder, models))
    app["args"]["ckpt_path"] = None  # the debug model's initial weights: sampling works the same
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
    with urllib.request.urlopen(url, timeout=10) as response:
        description = json.loads(response.read())
    assert description["fields"]["num_frames"] == 8 and description["limits"]["max_num_frames"] == 32


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
    """One request samples, one waits (the test yaml's limits); the rest get 503."""
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
