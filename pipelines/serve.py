"""Sampling over HTTP: a Ray Serve application, deployed from `configs/serve.yaml`.

    serve run configs/serve.yaml                              # locally; then open http://127.0.0.1:8000/
    RAY_AUTH_MODE=token ray serve deploy configs/serve.yaml   # on a cluster started with `ray start --head`

Two deployments:

- `SoraAPI`, the ingress: the web page, routes, checks every request field against the
  limits, decodes uploaded reference media, runs the jobs and encodes the mp4s. It is light
  (asyncio only) and takes many requests at once; it refuses overload itself, as JSON 503s
  with Retry-After, so `/health` never waits behind other requests.
- `SoraGenerator`: the models, loaded once per replica (one GPU each when the cluster has
  GPUs), sampling one request at a time and streaming one progress event per diffusion step.
  A cancelled request stops at its next step and frees the replica.

Routes: `GET /` (the web page), `GET /api` (the request fields, defaults and limits),
`GET /health`, `POST /jobs` (202 and a job id), `GET /jobs/{id}` (status, step, time left),
`GET /jobs/{id}/events` (server-sent events, one per step), `GET /jobs/{id}/video`,
`DELETE /jobs/{id}` (cancel), and `POST /generate` (JSON in, `video/mp4` out, a job waited
for; a client that disconnects cancels it). Bad requests get 4xx with `{"error": ...,
"field": ...}`. Reference media are uploaded bytes (base64 in the JSON), never a path on the
server, and no answer shows a path of the server's.

Jobs live in the ingress's memory: run one SoraAPI replica (the yaml does) so that every
request of a job reaches the replica that holds it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipelines.checkpoint import resolve_weights
from pipelines.config import ConfigError, InferenceConfig, did_you_mean, load_config
from pipelines.jobs import Full, Job, JobSettings, JobTable
from pipelines.media import encode_mp4
from pipelines.sample import FieldError, check_fixed_size, check_sampling, conditioned_by, prepare_item

RETRY_AFTER_S = 5  # what a 503 tells clients to wait
BACKOFF_S = 0.5  # a job whose generators are all busy asks again after this long
KEEPALIVE_S = 15.0  # an event stream with nothing new sends a comment this often
WEB = Path(__file__).parent / "web"  # the page: plain files, served as they are
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; `args.limits` in configs/serve.yaml overrides these."""

    max_body_bytes: int = 64 * 2**20  # the JSON body, base64 media included
    max_prompt_chars: int = 2000
    max_num_frames: int = 128  # per clip
    max_total_frames: int = 512  # frames sampled: loop x num_frames (the video keeps fewer when loop > 1)
    max_pixels: int = 1280 * 720  # height x width
    max_reference_pixels: int = 4096 * 4096  # an uploaded image's or video's height x width
    max_loop: int = 16
    max_sampling_steps: int = 250
    max_cfg_scale: float = 50.0
    max_references: int = 8
    max_time_limit_s: float = 600.0  # a request's `time_limit_s` (also its default)
    body_timeout_s: float = 10.0  # a body that has not arrived by then gets 408
    max_pending_requests: int = 64  # requests being read and checked at once; past it, 503


@dataclass(frozen=True)
class ServeArgs:
    """The `args:` of the application in configs/serve.yaml."""

    config: str  # an inference config file
    ckpt_path: str | None = None  # sets model.from_pretrained, as `sora sample --ckpt-path`
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted config fields
    limits: ServeLimits = ServeLimits()
    jobs: JobSettings = dataclasses.field(default_factory=JobSettings)
    num_cpus: float = 1.0  # CPU cores (torch threads) per generator replica on a CPU-only cluster
    use_gpu: bool | None = None  # one GPU per generator replica; None: when the cluster has GPUs

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> ServeArgs:
        """Check the yaml's args: unknown keys are errors naming the closest valid key."""
        args = dict(args)
        _no_unknown(args, [f.name for f in dataclasses.fields(cls)], "args")
        if "config" not in args:
            raise ConfigError("args.config: missing; name an inference config file")
        limits = args.pop("limits", None) or {}
        _no_unknown(limits, [f.name for f in dataclasses.fields(ServeLimits)], "args.limits")
        jobs = args.pop("jobs", None) or {}
        _no_unknown(jobs, [f.name for f in dataclasses.fields(JobSettings)], "args.jobs")
        try:
            return cls(**args, limits=ServeLimits(**limits), jobs=JobSettings(**jobs))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"args: {error}") from None


def _no_unknown(values: Mapping[str, Any], valid: list[str], where: str) -> None:
    for key in values:
        if key not in valid:
            hint = did_you_mean(key, valid) or f"; valid: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")


class RequestError(Exception):
    """A request that is refused: HTTP status, the field at fault (or None) and why."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse({"error": public(self.message), "field": self.field}, self.status, headers=headers)


def busy(what: str) -> RequestError:
    """The answer to overload: 503 with Retry-After, as JSON like every other refusal."""
    return RequestError(503, None, f"busy: {what}; retry after {RETRY_AFTER_S} s")


# Folders of the server's machine that must not show in an answer: a message that names a file
# there (an upload's temporary name, the project, the checkpoint) says "…/name" instead.
_PRIVATE_ROOTS = sorted(
    {str(Path(root).resolve()) for root in (tempfile.gettempdir(), os.getcwd(), Path.home(), sys.prefix)}
    | {str(Path(__file__).resolve().parent.parent)},
    key=len,
    reverse=True,
)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+(?=[\w.@+-])")


def public(text: str) -> str:
    """`text` without the folders of this machine: absolute paths keep their last part only."""
    for root in _PRIVATE_ROOTS:
        text = text.replace(root + os.sep, "…/").replace(root, "…")
    return _ABSOLUTE_PATH.sub("…/", text)


def public_path(path: str | None) -> str | None:
    """A configured file as an answer may show it: relative to the server's folder, or its name."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return resolved.name


# --------------------------------------------------------------------------- request checking

REQUEST_FIELDS = (
    "prompt",
    "num_frames",
    "image_size",
    "seed",
    "num_sampling_steps",
    "cfg_scale",
    "loop",
    "condition_frame_length",
    "mask_strategy",
    "reference",
    "time_limit_s",
)
# Strings (that are not base64) that are a path or URL on somebody's machine, not uploaded bytes.
_PATH_LIKE = re.compile(
    r"^(/|\./|\.\./|~|[A-Za-z]:\\|file:)|://|\.(png|jpe?g|webp|bmp|tiff?|gif|mp4|mov|mkv|webm|avi)$"
)


@dataclass(frozen=True)
class GenerateRequest:
    """A checked `POST /generate` body."""

    prompt: str
    config: InferenceConfig  # the server's config with this request's sizes, steps, seed and loop
    media: tuple[bytes, ...]
    mask_strategy: str | None
    time_limit_s: float


def _integer(payload: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, name, f"{name}: must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(400, name, f"{name}: must be between {low} and {high}, got {value}")
    return value


def parse_request(payload: Any, base: InferenceConfig, limits: ServeLimits) -> GenerateRequest:
    """Check a decoded JSON body field by field; raises RequestError naming the field."""
    if not isinstance(payload, dict):
        raise RequestError(400, None, f"the body must be a JSON object, got {type(payload).__name__}")
    for key in payload:
        if key not in REQUEST_FIELDS:
            hint = did_you_mean(key, REQUEST_FIELDS) or f"; fields: {', '.join(REQUEST_FIELDS)}"
            raise RequestError(400, str(key), f"unknown field '{key}'{hint}")
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "prompt", "prompt: required, a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(400, "prompt", f"prompt: {len(prompt)} characters, the limit is {limits.max_prompt_chars}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON can carry "\ud800"; no tokenizer can
        code = ord(prompt[error.start])
        raise RequestError(
            400, "prompt", f"prompt: not valid text: a lone surrogate U+{code:04X} at character {error.start}"
        ) from None

    num_frames = _integer(payload, "num_frames", base.num_frames, 1, limits.max_num_frames)
    size = payload.get("image_size", list(base.image_size))
    if not (isinstance(size, list) and len(size) == 2 and all(type(side) is int for side in size)):
        raise RequestError(400, "image_size", f"image_size: must be [height, width] integers, got {json.dumps(size)}")
    height, width = size
    if min(height, width) < 16 or height * width > limits.max_pixels:
        raise RequestError(
            400, "image_size", f"image_size: {height}x{width}; each side must be at least 16 and height x width "
            f"at most {limits.max_pixels} pixels"
        )  # fmt: skip
    seed = _integer(payload, "seed", base.seed, 0, 2**63 - 1)
    steps = _integer(payload, "num_sampling_steps", base.scheduler.num_sampling_steps, 1, limits.max_sampling_steps)
    cfg_scale = payload.get("cfg_scale", base.scheduler.cfg_scale)
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, int | float) or not math.isfinite(cfg_scale):
        raise RequestError(400, "cfg_scale", f"cfg_scale: must be a number, got {json.dumps(cfg_scale)}")
    if not 0 <= cfg_scale <= limits.max_cfg_scale:
        raise RequestError(
            400, "cfg_scale", f"cfg_scale: must be between 0 and {limits.max_cfg_scale}, got {cfg_scale}"
        )
    loop = _integer(payload, "loop", 1, 1, limits.max_loop)
    # The config's condition_frame_length matters for long video only: a one-clip request of
    # fewer frames must not fail over a field it did not send.
    default_condition = base.condition_frame_length if loop > 1 else 0
    condition = _integer(payload, "condition_frame_length", default_condition, 0, num_frames)
    strategy = payload.get("mask_strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise RequestError(400, "mask_strategy", "mask_strategy: must be a string of ';'-separated tuples or null")
    time_limit = payload.get("time_limit_s", limits.max_time_limit_s)
    if isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not math.isfinite(time_limit):
        raise RequestError(400, "time_limit_s", f"time_limit_s: must be a number, got {json.dumps(time_limit)}")
    if not 0 < time_limit <= limits.max_time_limit_s:
        most = f"{limits.max_time_limit_s:g}"
        raise RequestError(400, "time_limit_s", f"time_limit_s: must be above 0 and at most {most}, got {time_limit}")

    try:
        config = dataclasses.replace(
            base,
            num_frames=num_frames,
            image_size=(height, width),
            seed=seed,
            loop=loop,
            condition_frame_length=condition,
            scheduler=dataclasses.replace(base.scheduler, num_sampling_steps=steps, cfg_scale=float(cfg_scale)),
            prompt=(prompt,),
            prompt_path=None,
            reference_path=None,
            mask_strategy=None,
        )
    except ConfigError as error:  # loop and condition_frame_length that do not fit together
        raise RequestError(400, "condition_frame_length", str(error)) from None
    sampled = loop * num_frames  # what the work grows with (carried frames are sampled again)
    if sampled > limits.max_total_frames:
        raise RequestError(
            400, "loop", f"loop: {loop} clips of {num_frames} frames is {sampled} frames to sample; "
            f"the limit is {limits.max_total_frames}"
        )  # fmt: skip
    return GenerateRequest(prompt, config, _media(payload.get("reference"), limits), strategy, float(time_limit))


def _media(value: Any, limits: ServeLimits) -> tuple[bytes, ...]:
    """The uploaded references: a list of base64 strings (or one string)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise RequestError(400, "reference", "reference: must be a list of base64-encoded files")
    if len(items) > limits.max_references:
        raise RequestError(400, "reference", f"reference: {len(items)} files; the limit is {limits.max_references}")
    media = []
    for index, item in enumerate(items):
        field = f"reference[{index}]"
        if not isinstance(item, str):
            raise RequestError(400, field, f"{field}: must be a base64 string, got {type(item).__name__}")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as error:
            # Base64 has '/' (a JPEG starts "/9j/"), so only what does not decode can be a path.
            if _PATH_LIKE.search(item.strip()):
                raise RequestError(
                    400, field, f"{field}: looks like a path or URL; the server never reads its own files or "
                    "fetches URLs: send the file's bytes, base64-encoded"
                ) from None  # fmt: skip
            raise RequestError(400, field, f"{field}: not valid base64 ({error})") from None
        if not data:
            raise RequestError(400, field, f"{field}: empty")
        media.append(data)
    return tuple(media)


def save_upload(data: bytes, folder: Path, index: int, max_pixels: int) -> Path:
    """Write an uploaded file where the media readers can open it, named by what it is.

    An image whose header claims more than `max_pixels` is refused before anything decodes it
    (a few bytes of PNG can claim 100000 x 100000 pixels)."""
    from PIL import Image, UnidentifiedImageError

    label = f"reference[{index}]"
    suffix = ".video"  # FFmpeg finds the container from the bytes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}.get(
                    image.format or "", suffix
                )
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{claimed.group(1)} pixels" if claimed else "too many pixels"
        raise FieldError(
            label, f"{label}: the image claims {size}; the limit is {max_pixels} (height x width)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass  # not an image PIL knows: a video, or nothing; the probe says which
    else:
        if width * height > max_pixels:
            raise FieldError(
                label, f"{label}: {height}x{width} pixels; the limit is {max_pixels} (height x width)"
            )  # fmt: skip
    path = folder / f"reference_{index}{suffix}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- deployments


class Cancelled(Exception):
    """Raised in the sampling thread at the next diffusion step of a cancelled request."""


@serve.deployment(max_ongoing_requests=4, max_queued_requests=4, health_check_timeout_s=60)
class SoraGenerator:
    """The models of the inference config, loaded once; samples one request at a time.

    A replica takes up to `max_ongoing_requests` requests and samples them in turn, in
    arrival order, on one thread of its own: waiting there costs nothing, where requests
    the replica refuses are retried by Serve's router over and over (measured: a third
    less throughput with 4 clients on 2 cores). Past that, up to `max_queued_requests`
    wait in the router; beyond, the ingress's job waits and asks again.
    """

    def __init__(self, config: InferenceConfig) -> None:
        from pipelines.sample import Sampler

        self.sampler = Sampler(config)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")

    async def stream(
        self, item, config: InferenceConfig, seed: int, report_steps: bool = True
    ) -> AsyncIterator[tuple[str, Any]]:
        """Sample one request off the event loop, yielding ("started", None), then ("step",
        (done, total, clip)) after every diffusion step, then ("video", frames (T, H, W, 3) uint8).

        Cancelling the call (the ingress does, for DELETE /jobs/{id}, a time limit or a client
        gone) stops the sampler at its next step, or before it starts when still waiting.
        `report_steps=False` leaves the step events out (benchmarks/serve.py measures their cost)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def report(event) -> None:  # on the sampling thread
            if stop.is_set():
                raise Cancelled
            if report_steps or event[0] != "step":
                loop.call_soon_threadsafe(events.put_nowait, event)

        def run():
            report(("started", None))
            on_step = lambda p: report(("step", (p.done, p.total, p.clip)))  # noqa: E731
            return self.sampler.generate([item], config, seed, progress=on_step)[0]

        sampling = loop.run_in_executor(self.worker, run)
        sampling.add_done_callback(lambda future: future.cancelled() or future.exception())  # retrieved: no warning
        try:
            while True:
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, sampling}, return_when=asyncio.FIRST_COMPLETED)
                if event.done():
                    yield event.result()
                    continue
                event.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield "video", sampling.result()
                return
        finally:
            stop.set()  # cancelled or done: a sampler still at work stops at its next step


@serve.deployment(max_ongoing_requests=1000, max_queued_requests=-1, ray_actor_options={"num_cpus": 0})
class SoraAPI:
    """The HTTP ingress: the page, the API and the jobs.

    It takes every connection (asyncio only: a waiting request costs a coroutine) and refuses
    overload itself: more than `max_pending_requests` requests being read and checked, or more
    than `jobs.max_active` jobs, get a JSON 503 with Retry-After. Serve's own queue would
    answer a plain-text 503 without it, and would make `/health` wait behind slow uploads.
    """

    def __init__(self, generator, config: InferenceConfig, limits: ServeLimits, jobs: JobSettings) -> None:
        self.generator = generator
        self.config = config
        self.limits = limits
        self.jobs = JobTable(jobs)
        self.tasks: dict[str, asyncio.Task] = {}
        self.preparing = asyncio.Semaphore(2)
        self.pending = 0
        self.page = (WEB / "index.html").read_bytes()
        self.static = {name: (WEB / name).read_bytes() for name in STATIC_TYPES}

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        try:
            return await self._route(request, request.method, path)
        except RequestError as error:
            return error.response()
        except Exception:  # a bug of ours: still a JSON answer, and the replica goes on
            logger.exception("request failed")
            return RequestError(500, None, "internal error; see the server's log").response()

    async def _route(self, request: Request, method: str, path: str) -> Response:
        parts = path.strip("/").split("/")
        if path == "/health":
            _allow(method, "GET", path)
            return JSONResponse({"status": "ok", **self._describe_model(), **self._load()})
        if path == "/":
            _allow(method, "GET", path)
            return Response(self.page, media_type="text/html; charset=utf-8")
        if path == "/api":
            _allow(method, "GET", path)
            return JSONResponse(self._describe_api())
        if parts[0] == "static" and len(parts) == 2 and parts[1] in self.static:
            _allow(method, "GET", path)
            return Response(self.static[parts[1]], media_type=STATIC_TYPES[parts[1]])
        if path == "/generate":
            _allow(method, "POST", path)
            return await self._generate(request)
        if path == "/jobs":
            _allow(method, ("GET", "POST"), path)
            if method == "GET":
                return JSONResponse({"jobs": [self.jobs.describe(job) for job in reversed(self.jobs.jobs.values())]})
            job = await self._submit(request)
            return JSONResponse(self.jobs.describe(job), 202, headers={"Location": f"jobs/{job.id}"})
        if parts[0] == "jobs" and len(parts) in (2, 3):
            job = self._job(parts[1])
            view = parts[2] if len(parts) == 3 else None
            if view is None:
                _allow(method, ("GET", "DELETE"), path)
                if method == "DELETE":
                    self._cancel(job)
                return JSONResponse(self.jobs.describe(job))
            if view == "events":
                _allow(method, "GET", path)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(self._events(job), media_type="text/event-stream", headers=headers)
            if view == "video":
                _allow(method, "GET", path)
                return self._video(job)
        raise RequestError(404, None, f"no route {path}; routes: {', '.join(ROUTES)}")

    # ------------------------------------------------------------------ jobs

    async def _submit(self, request: Request) -> Job:
        """Read and check a request, then start its job (queued until a generator takes it)."""
        if self.pending >= self.limits.max_pending_requests:
            raise busy(f"{self.pending} requests are being received")
        self.pending += 1
        try:
            body = await _read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise RequestError(400, None, f"the body is not valid JSON: {error}") from None
            asked = parse_request(payload, self.config, self.limits)
            try:
                check_fixed_size(self.config, asked.config)
                check_sampling(asked.config, conditioned_by(asked.config.loop, [asked.mask_strategy]))
                async with self.preparing:  # decoding media is memory-heavy: a few at a time
                    item = await asyncio.to_thread(self._prepare, asked, self.limits.max_reference_pixels)
            except FieldError as error:
                raise RequestError(400, error.field, str(error)) from None
        finally:
            self.pending -= 1
        config = asked.config
        try:
            job = self.jobs.create(
                asked.prompt, config.seed, config.scheduler.num_sampling_steps, config.loop, asked.time_limit_s
            )  # fmt: skip
        except Full as error:
            raise busy(str(error)) from None
        self.tasks[job.id] = asyncio.create_task(self._run(job, item, config))
        return job

    async def _run(self, job: Job, item, config: InferenceConfig) -> None:
        """Sample a job within its time limit and keep its mp4; every ending is recorded on the job."""
        try:
            async with asyncio.timeout(job.time_limit_s):
                frames = await self._sample(job, item, config)
                mp4 = await asyncio.to_thread(encode_mp4, frames, config.save_fps)
            self.jobs.finish(job, mp4, frames.shape[0])
        except asyncio.CancelledError:
            self.jobs.cancel(job)
        except TimeoutError:
            self.jobs.fail(job, f"time limit of {job.time_limit_s:g} s reached at step {job.step} of {job.total_steps}")
        except Exception as error:  # the generator failed (out of memory, a lost replica): the job says so
            logger.exception("sampling failed")
            self.jobs.fail(job, f"sampling failed: {type(error).__name__}; see the server's log")
        finally:
            self.tasks.pop(job.id, None)

    async def _sample(self, job: Job, item, config: InferenceConfig):
        """The frames of one job, its progress recorded step by step. While every generator's
        queue is full the job stays queued and asks again."""
        while True:
            stream = self.generator.options(stream=True).stream.remote(item, config, config.seed)
            try:
                async for kind, value in stream:
                    if kind == "started":
                        self.jobs.start(job)
                    elif kind == "step":
                        done, _, clip = value
                        self.jobs.progress(job, done, clip)
                    else:
                        return value
            except BackPressureError:
                await asyncio.sleep(BACKOFF_S)
                continue
            except asyncio.CancelledError:
                stream.cancel()  # the replica stops at its next step
                raise
            raise RuntimeError("the generator's stream ended without a video")

    def _cancel(self, job: Job) -> None:
        task = self.tasks.get(job.id)
        self.jobs.cancel(job)
        if task is not None:
            task.cancel()

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(
                404, None, f"no job {job_id!r}: unknown, or finished more than {self.jobs.settings.keep_s:g} s "
                f"ago (or one of more than {self.jobs.settings.max_kept} finished since)"
            )  # fmt: skip
        return job

    async def _generate(self, request: Request) -> Response:
        """POST /generate: a job, waited for. A client that goes away cancels it (Serve cancels
        this handler when the connection closes)."""
        job = await self._submit(request)
        task = self.tasks.get(job.id)
        try:
            if task is not None:
                await asyncio.shield(task)
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        return self._video(job)

    def _video(self, job: Job) -> Response:
        if job.video is not None:
            headers = {
                "X-Sora-Seed": str(job.seed),
                "X-Sora-Frames": str(job.frames),
                "X-Sora-Job": job.id,
                "Content-Disposition": f'inline; filename="sora-{job.seed}.mp4"',
            }
            return Response(job.video, media_type="video/mp4", headers=headers)
        if job.error is not None and job.error.startswith("time limit"):
            raise RequestError(504, "time_limit_s", f"job {job.id}: {job.error}")
        if job.error is not None:
            raise RequestError(500, None, f"job {job.id}: {job.error}")
        raise RequestError(409, None, f"job {job.id} is {job.status.value}: no video")

    async def _events(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: the job's state at every change (one per diffusion step) until it ends."""
        while True:
            changed = job.changed  # taken before the state is read: no change is missed
            yield f"data: {json.dumps(self.jobs.describe(job))}\n\n"
            if job.status.finished:
                return
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
                    break
                except TimeoutError:
                    yield ": still waiting\n\n"  # a comment: keeps proxies from closing the stream

    @staticmethod
    def _prepare(job: GenerateRequest, max_pixels: int):
        with tempfile.TemporaryDirectory(prefix="sora-upload-") as folder:
            paths = [save_upload(data, Path(folder), index, max_pixels) for index, data in enumerate(job.media)]
            labels = [f"reference[{index}]" for index in range(len(paths))]
            return prepare_item(
                job.prompt, paths, job.mask_strategy, job.config, labels, max_pixels=max_pixels, refuse_unused=True
            )  # fmt: skip

    # ------------------------------------------------------------------ descriptions

    def _load(self) -> dict[str, Any]:
        active = self.jobs.active()
        running = sum(job.status.value == "running" for job in active)
        return {"jobs": {"running": running, "queued": len(active) - running}, "receiving": self.pending}

    def _describe_model(self) -> dict[str, Any]:
        config = self.config
        return {
            "model": config.model.type,
            "checkpoint": public_path(config.model.from_pretrained),
            "scheduler": config.scheduler.type,
            "fps": config.save_fps,
        }

    def _describe_api(self) -> dict[str, Any]:
        config = self.config
        defaults = {
            "num_frames": config.num_frames,
            "image_size": list(config.image_size),
            "seed": config.seed,
            "num_sampling_steps": config.scheduler.num_sampling_steps,
            "cfg_scale": config.scheduler.cfg_scale,
            "loop": 1,
            "condition_frame_length": config.condition_frame_length,
            "mask_strategy": None,
            "reference": [],
            "time_limit_s": self.limits.max_time_limit_s,
        }
        return {
            "routes": ROUTES,
            "fields": {"prompt": "required", **defaults},
            "mask_strategy": "';'-separated ref_index,loop_index,ref_start_frame,num_frames,target_location"
            "[,edit_ratio]; references are base64-encoded image or video files",
            "limits": dataclasses.asdict(self.limits),
            **self._describe_model(),
        }


ROUTES = {
    "GET /": "the web page",
    "GET /api": "the request fields, their defaults and limits",
    "GET /health": "liveness, the model and the load",
    "POST /generate": "JSON in, video/mp4 out (waits; disconnecting cancels)",
    "POST /jobs": "JSON in, 202 and the job: id, status, position",
    "GET /jobs": "this server's recent jobs",
    "GET /jobs/{id}": "status, step, total_steps, clip, elapsed_s, eta_s",
    "GET /jobs/{id}/events": "server-sent events, one per diffusion step",
    "GET /jobs/{id}/video": "the mp4 when done",
    "DELETE /jobs/{id}": "cancel: a running job stops within one diffusion step",
}


def _allow(method: str, allowed: str | tuple[str, ...], path: str) -> None:
    allowed = (allowed,) if isinstance(allowed, str) else allowed
    if method not in allowed:
        raise RequestError(405, None, f"use {' or '.join(allowed)} {path}")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"the body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, None, f"the body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, None, f"the body did not arrive within {timeout:g} s ({size} bytes came)") from None
    return b"".join(chunks)


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The application `import_path: pipelines.serve:build_app` names; `args` come from the yaml."""
    import ray

    settings = ServeArgs.parse(args)
    overrides = dict(settings.overrides)
    if settings.ckpt_path is not None:
        # Pinned here: every replica loads this checkpoint, even if training writes a newer one.
        overrides["model.from_pretrained"] = resolve_weights(settings.ckpt_path)
    config = load_config(settings.config, "inference", overrides)
    use_gpu = settings.use_gpu
    if use_gpu is None:
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": settings.num_cpus}
    return make_app(config, settings.limits, resources, jobs=settings.jobs)


def make_app(
    config: InferenceConfig,
    limits: ServeLimits,
    resources: Mapping[str, float],
    jobs: JobSettings | None = None,
    **generator_options: Any,
) -> serve.Application:
    """The ingress bound to a generator deployment with `resources` per replica (and other options)."""
    generator = SoraGenerator.options(ray_actor_options=dict(resources), **generator_options).bind(config)
    return SoraAPI.bind(generator, config, limits, jobs or JobSettings())
