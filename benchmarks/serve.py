"""Serving: one request over HTTP through Ray Serve against the same sampling call in process,
then throughput with several concurrent clients, then jobs: the time from `POST /jobs` to the
first progress event, and what the per-step progress events cost a sample.

The application is the one `configs/serve.yaml` deploys (`pipelines.serve.make_app`, which
`build_app` calls), with the debug models written to a temporary folder. "In process" is
what the server does for a request, without HTTP and Ray: check the request, sample
(`Sampler.generate`) and encode the mp4, with as many torch threads as a generator replica
gets, in a process of its own. Calls alternate between the two so drift hits both alike;
the figures are medians. Throughput clients retry a 503 after half a second.

    python benchmarks/serve.py [--repeats 7] [--clients 1 2 4] [--replicas 1] [--steps 10] [--only jobs]
                               [--config configs/demo/inference.py]

Progress events are measured at the generator deployment, as the ingress calls it: the same
sample with an event per diffusion step and without (`stream(..., report_steps=False)`),
alternating, medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def payload(steps: int) -> dict:
    return {"prompt": "a red circle moves left on a blue background", "seed": 3, "num_sampling_steps": steps}


def run_in_process(config_path: str, threads: int, steps: int) -> None:
    """What the server does for one request, without HTTP and Ray, once per line on stdin."""
    from pipelines.config import load_config
    from pipelines.media import encode_mp4
    from pipelines.sample import Sampler, prepare_item
    from pipelines.serve import ServeLimits, parse_request

    torch.set_num_threads(threads)  # what a generator replica gets (OMP_NUM_THREADS = its CPUs)
    base = load_config(config_path, "inference")
    sampler = Sampler(base)
    for _ in sys.stdin:
        start = time.perf_counter()
        job = parse_request(payload(steps), base, ServeLimits())
        item = prepare_item(job.prompt, [], job.mask_strategy, job.config, [])
        frames = sampler.generate([item], job.config, job.config.seed)[0]
        mp4 = encode_mp4(frames, job.config.save_fps)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "md5": hashlib.md5(mp4).hexdigest()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per side")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=1, help="generator replicas")
    parser.add_argument("--cpus-per-replica", type=float, default=1, help="CPU cores per replica (serve.yaml: 1)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per request")
    parser.add_argument("--config", help="an inference config (default: the debug models, written to a temp folder)")
    parser.add_argument("--event-steps", type=int, default=50, help="sampling steps of the progress-event comparison")
    parser.add_argument("--only", nargs="+", choices=["http", "jobs"], default=["http", "jobs"], help="sections to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_in_process(args.child, args.threads, args.steps)
        return

    import ray
    from ray import serve

    from pipelines.cluster import connect
    from pipelines.config import load_config
    from pipelines.serve import ServeLimits, make_app
    from sora_model.debug import write_debug_models

    folder = Path(tempfile.mkdtemp(prefix="sora-bench-serve-"))
    if args.config:  # e.g. configs/demo/inference.py: the model `serve run configs/serve.yaml` serves
        config_path = Path(args.config).absolute()
    else:
        models = write_debug_models(folder / "models", seed=0)
        text = (ROOT / "configs/debug/inference.py").read_text()
        text = text.replace('"demo/models/vae"', f'"{models["vae"]}"')
        text = text.replace('"demo/models/t5"', f'"{models["text_encoder"]}"')
        config_path = folder / "inference.py"
        config_path.write_text(text)
    base = load_config(config_path, "inference")
    cuda = torch.cuda.is_available()

    threads = max(1, int(args.cpus_per_replica))
    connect(None, local_cpus=max(2, int(args.replicas * args.cpus_per_replica)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    resources = {"num_gpus": 1} if cuda else {"num_cpus": args.cpus_per_replica}
    queue = 4 * args.replicas
    app = make_app(base, ServeLimits(), resources, num_replicas=args.replicas, max_queued_requests=queue)
    serve.run(app, name="sora", route_prefix="/")
    url = f"http://127.0.0.1:{port}/generate"

    # In process runs in a child process of its own (the Ray driver's background threads would
    # slow it down), taking one request per line on stdin and answering with its time.
    worker = subprocess.Popen(
        [sys.executable, __file__, "--child", str(config_path), "--threads", str(threads), "--steps", str(args.steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def in_process() -> dict:
        worker.stdin.write("go\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    def over_http() -> dict:
        start = time.perf_counter()
        status, body = post(url, payload(args.steps))
        assert status == 200, body[:300]
        return {"seconds": time.perf_counter() - start, "md5": hashlib.md5(body).hexdigest()}

    if "jobs" in args.only:
        jobs_section(f"http://127.0.0.1:{port}", base, args)
    if "http" not in args.only:
        worker.stdin.close()
        worker.wait()
        serve.shutdown()
        ray.shutdown()
        return
    same = in_process()["md5"] == over_http()["md5"]  # warm-up: allocations, first-call costs
    local_times, http_times = [], []
    for _ in range(args.repeats):
        time.sleep(0.5)  # idle threads of the other side stop spinning first
        local_times.append(in_process()["seconds"])
        time.sleep(0.5)
        http_times.append(over_http()["seconds"])
    worker.stdin.close()
    worker.wait()
    local, remote = statistics.median(local_times), statistics.median(http_times)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({threads} torch threads)"
    size = f"{base.num_frames}x{base.image_size[0]}x{base.image_size[1]}, {args.steps} steps"
    print(f"one request, debug model, {size}, on {device}; medians of {args.repeats}")
    print(f"  in process (check + sample + encode mp4): {local * 1000:8.1f} ms")
    print(f"  over HTTP through Ray Serve:              {remote * 1000:8.1f} ms")
    print(f"  HTTP / in process:                        {remote / local:8.3f}  (overhead {remote / local - 1:+.1%})")
    print(f"  same mp4 bytes both ways:                 {same}")

    print(f"\nthroughput: {args.replicas} generator replica(s), {args.requests_per_client} requests per client")
    print(f"{'clients':>8} {'req/s':>8} {'x 1 client':>10} {'p50 ms':>8} {'p95 ms':>8} {'503s':>6}")
    baseline = None
    for clients in args.clients:

        def client(_: int) -> tuple[list[float], int]:
            latencies, rejected = [], 0
            for _ in range(args.requests_per_client):
                while True:
                    start = time.perf_counter()
                    status, _body = post(url, payload(args.steps))
                    if status == 503:  # the queue is full: back off, then retry (sooner than Retry-After's 5 s)
                        rejected += 1
                        time.sleep(0.5)
                        continue
                    assert status == 200
                    latencies.append(time.perf_counter() - start)
                    break
            return latencies, rejected

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        wall = time.perf_counter() - start
        latencies = sorted(latency for result in results for latency in result[0])
        rate = len(latencies) / wall
        baseline = baseline or rate
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        rejected = sum(result[1] for result in results)
        print(f"{clients:>8} {rate:>8.2f} {rate / baseline:>10.2f} {statistics.median(latencies) * 1000:>8.0f} "
              f"{p95 * 1000:>8.0f} {rejected:>6}")  # fmt: skip
    serve.shutdown()
    ray.shutdown()


def first_step_seconds(url: str, steps: int) -> float:
    """From POST /jobs to the first event that reports a diffusion step done."""
    import http.client

    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/jobs", json.dumps(payload(steps)).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        job = json.loads(response.read())
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", f"/jobs/{job['id']}/events")
    first = None
    for line in connection.getresponse():
        if line.startswith(b"data: ") and json.loads(line[6:])["step"] >= 1:
            first = first or time.perf_counter() - start
        if line.startswith(b"data: ") and json.loads(line[6:])["status"] == "done":
            break
    connection.close()
    return first


def jobs_section(url: str, base, args) -> None:
    import asyncio

    from ray import serve

    from pipelines.sample import prepare_item

    first = [first_step_seconds(url, args.steps) for _ in range(args.repeats + 1)][1:]  # the first warms up
    size = f"{base.num_frames}x{base.image_size[0]}x{base.image_size[1]}"
    print(f"jobs, model {base.model.type}, {size}; medians of {args.repeats}")
    print(f"  POST /jobs to the first progress event (a replica free): {statistics.median(first) * 1000:8.1f} ms"
          f"  (max {max(first) * 1000:.1f} ms; target < 1000 ms)")  # fmt: skip

    generator = serve.get_deployment_handle("SoraGenerator", app_name="sora")
    item = prepare_item("a red circle moves left on a blue background", [], None, base, [])
    steps = args.event_steps

    async def sample(report: bool) -> tuple[float, int]:
        config = dataclasses.replace(base, scheduler=dataclasses.replace(base.scheduler, num_sampling_steps=steps))
        start = time.perf_counter()
        events = 0
        async for kind, _ in generator.options(stream=True).stream.remote(item, config, 3, report_steps=report):
            events += kind == "step"
        return time.perf_counter() - start, events

    async def measure() -> tuple[list[float], list[float], int]:
        await sample(True)  # warm-up
        with_events, without = [], []
        for index in range(args.repeats * 2):
            report = index % 2 == 0  # alternating: drift hits both alike
            seconds, events = await sample(report)
            (with_events if report else without).append(seconds)
        return with_events, without, events

    with_events, without, _ = asyncio.run(measure())
    on, off = statistics.median(with_events), statistics.median(without)
    print(f"  one sample of {steps} steps with an event per step: {on * 1000:8.1f} ms")
    print(f"  the same without step events:                  {off * 1000:8.1f} ms")
    print(f"  with / without:                                {on / off:8.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
