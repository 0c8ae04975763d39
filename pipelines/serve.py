"""Sampling over HTTP: a Ray Serve application, deployed from `configs/serve.yaml`.

    serve run configs/serve.yaml                              # locally
    RAY_AUTH_MODE=token ray serve deploy configs/serve.yaml   # on a cluster started with `ray start --head`

Two deployments:

- `SoraAPI`, the ingress: routes, checks every request field against the limits, decodes
  uploaded reference media and encodes the mp4. It is light and takes many requests at
  once, so `/health` answers while videos are being sampled.
- `SoraGenerator`: the models, loaded once per replica (one GPU each when the cluster has
  GPUs), sampling one request at a time. Requests wait in a bounded queue (a replica's
  `max_ongoing_requests`, then `max_queued_requests`); past it the ingress answers 503
  with Retry-After.

Routes: `GET /health`, `GET /` (the request fields, defaults and limits), `POST /generate`
(JSON in, `video/mp4` out). Bad requests get 4xx with `{"error": ..., "field": ...}`.
Reference media are uploaded bytes (base64 in the JSON), never a path on the server.
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
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipelines.checkpoint import resolve_weights
from pipelines.config import ConfigError, InferenceConfig, did_you_mean, load_config
from pipelines.media import encode_mp4
from pipelines.sample import FieldError, check_fixed_size, check_sampling, conditioned_by, prepare_item

RETRY_AFTER_S = 5  # what a 503 tells clients to wait
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


@dataclass(frozen=True)
class ServeArgs:
    """The `args:` of the application in configs/serve.yaml."""

    config: str  # an inference config file
    ckpt_path: str | None = None  # sets model.from_pretrained, as `sora sample --ckpt-path`
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted config fields
    limits: ServeLimits = ServeLimits()
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
        try:
            return cls(**args, limits=ServeLimits(**limits))
        except TypeError as error:
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
        return JSONResponse({"error": self.message, "field": self.field}, self.status, headers=headers)


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
    return GenerateRequest(prompt, config, _media(payload.get("reference"), limits), strategy)


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


def save_upload(data: bytes, folder: Path, index: int) -> Path:
    """Write an uploaded file where the media readers can open it, named by what it is."""
    from PIL import Image, UnidentifiedImageError

    suffix = ".video"  # FFmpeg finds the container from the bytes
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}.get(
                image.format or "", suffix
            )
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    path = folder / f"reference_{index}{suffix}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- deployments


@serve.deployment(max_ongoing_requests=4, max_queued_requests=4, health_check_timeout_s=60)
class SoraGenerator:
    """The models of the inference config, loaded once; samples one request at a time.

    A replica takes up to `max_ongoing_requests` requests and samples them in turn, in
    arrival order, on one thread of its own: waiting there costs nothing, where requests
    the replica refuses are retried by Serve's router over and over (measured: a third
    less throughput with 4 clients on 2 cores). Past that, up to `max_queued_requests`
    wait in the router; beyond, 503.
    """

    def __init__(self, config: InferenceConfig) -> None:
        from pipelines.sample import Sampler

        self.sampler = Sampler(config)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")

    async def generate(self, item, config: InferenceConfig, seed: int):
        """(frames, H, W, 3) uint8. Off the event loop, so the replica still answers health checks."""
        loop = asyncio.get_running_loop()
        videos = await loop.run_in_executor(self.worker, self.sampler.generate, [item], config, seed)
        return videos[0]


@serve.deployment(max_ongoing_requests=16, max_queued_requests=16, ray_actor_options={"num_cpus": 0})
class SoraAPI:
    """The HTTP ingress."""

    def __init__(self, generator, config: InferenceConfig, limits: ServeLimits) -> None:
        self.generator = generator
        self.config = config
        self.limits = limits
        self.preparing = asyncio.Semaphore(2)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        try:
            if path == "/generate":
                if request.method != "POST":
                    raise RequestError(405, None, "use POST /generate with a JSON body")
                return await self._generate(request)
            if path in ("/", "/health") and request.method != "GET":
                raise RequestError(405, None, f"use GET {path}")
            if path == "/health":
                return JSONResponse({"status": "ok", **self._describe_model()})
            if path == "/":
                return JSONResponse(self._describe_api())
            raise RequestError(404, None, f"no route {path}; routes: GET /, GET /health, POST /generate")
        except RequestError as error:
            return error.response()
        except Exception:  # a bug of ours: still a JSON answer, and the replica goes on
            logger.exception("request failed")
            return RequestError(500, None, "internal error; see the server's log").response()

    async def _generate(self, request: Request) -> Response:
        body = await _read_body(request, self.limits.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise RequestError(400, None, f"the body is not valid JSON: {error}") from None
        job = parse_request(payload, self.config, self.limits)
        try:
            check_fixed_size(self.config, job.config)
            check_sampling(job.config, conditioned_by(job.config.loop, [job.mask_strategy]))
            async with self.preparing:  # decoding media is memory-heavy: a few at a time
                item = await asyncio.to_thread(self._prepare, job, self.limits.max_reference_pixels)
        except FieldError as error:
            raise RequestError(400, error.field, str(error)) from None
        try:
            frames = await self.generator.generate.remote(item, job.config, job.config.seed)
        except BackPressureError as error:
            max_queued = error.args[1] if len(error.args) > 1 else "?"
            raise RequestError(
                503, None, f"busy: {max_queued} requests are already waiting; retry after {RETRY_AFTER_S} s"
            ) from None
        except Exception as error:  # the generator failed (out of memory, a lost replica): say so as JSON
            logger.exception("sampling failed")
            raise RequestError(500, None, f"sampling failed: {type(error).__name__}; see the server's log") from None
        mp4 = await asyncio.to_thread(encode_mp4, frames, job.config.save_fps)
        headers = {"X-Sora-Seed": str(job.config.seed), "X-Sora-Frames": str(frames.shape[0])}
        return Response(mp4, media_type="video/mp4", headers=headers)

    @staticmethod
    def _prepare(job: GenerateRequest, max_pixels: int):
        with tempfile.TemporaryDirectory(prefix="sora-upload-") as folder:
            paths = [save_upload(data, Path(folder), index) for index, data in enumerate(job.media)]
            labels = [f"reference[{index}]" for index in range(len(paths))]
            return prepare_item(job.prompt, paths, job.mask_strategy, job.config, labels, max_pixels=max_pixels)

    def _describe_model(self) -> dict[str, Any]:
        config = self.config
        return {
            "model": config.model.type,
            "checkpoint": config.model.from_pretrained,
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
        }
        return {
            "routes": {"GET /health": "liveness and the model", "POST /generate": "JSON in, video/mp4 out"},
            "fields": {"prompt": "required", **defaults},
            "mask_strategy": "';'-separated ref_index,loop_index,ref_start_frame,num_frames,target_location"
            "[,edit_ratio]; references are base64-encoded image or video files",
            "limits": dataclasses.asdict(self.limits),
            **self._describe_model(),
        }


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"the body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, None, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
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
    return make_app(config, settings.limits, {"num_gpus": 1} if use_gpu else {"num_cpus": settings.num_cpus})


def make_app(
    config: InferenceConfig, limits: ServeLimits, resources: Mapping[str, float], **generator_options: Any
) -> serve.Application:
    """The ingress bound to a generator deployment with `resources` per replica (and other options)."""
    generator = SoraGenerator.options(ray_actor_options=dict(resources), **generator_options).bind(config)
    return SoraAPI.bind(generator, config, limits)
