"""The config schema: frozen, typed dataclasses, one per section of a config file.

Config files are in Open-Sora's format (plain Python assignments with `dict(...)`
sections, see `pipelines.config_file`, which reads them). Each field here is a key of
such a file: its type, default and range are the rules the file is checked against,
once, when it loads; the rest of the project reads typed fields and never a raw dict.

Two kinds exist: a training config (drives `sora preprocess` and `sora train`)
and an inference config (drives `sora sample` and serving). Command-line flags
override fields by dotted path (`model.from_pretrained`), before validation.
"""

from __future__ import annotations

import dataclasses
import math
import pprint
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bucketing.config import BucketConfig, BucketConfigError, fixed_bucket_config, parse_bucket_config
from pipelines.config_file import CLEAR as CLEAR
from pipelines.config_file import ConfigError, Kind, kind_of, load_file, not_one_of, settable_fields
from pipelines.config_file import did_you_mean as did_you_mean
from pipelines.config_file import read_config_file as read_config_file
from sora_model.mask_strategy import ConditionError, LongVideo, parse_mask_strategy
from sora_model.sizes import MODEL_SIZES

DType = Literal["fp32", "fp16", "bf16"]

# Mask kinds of Open-Sora 1.1's masked training (`mask_ratios`), see its MaskGenerator.
MASK_NAMES = (
    "mask_no",
    "mask_quarter_random",
    "mask_quarter_head",
    "mask_quarter_tail",
    "mask_quarter_head_tail",
    "mask_image_random",
    "mask_image_head",
    "mask_image_tail",
    "mask_image_head_tail",
)


# Open-Sora 1.2 renamed them ("identity", "quarter_head", ...); those files' names are read as these.
# Before 1.1 the quarter kinds had no "quarter_" (configs/opensora/train/16x256x256-mask.py still
# says "mask_random", "mask_head", "mask_tail", "mask_head_tail"): the same masks, a block of
# randint(1, T // 4) frames at a random place, at the head, the tail, or at both ends.
MASK_NAME_ALIASES = (
    {"identity": "mask_no"}
    | {name.removeprefix("mask_"): name for name in MASK_NAMES[1:]}
    | {name.replace("_quarter", ""): name for name in MASK_NAMES if name.startswith("mask_quarter_")}
)


# Ranges, checked when a file or an override sets the field.
def _at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def _between(low: float, high: float) -> dict[str, Any]:
    return {"min": low, "max": high}


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """`model = dict(...)`: which diffusion transformer, and how to build it."""

    type: str = "STDiT-XL/2"  # an entry of sora_model.sizes.MODEL_SIZES
    from_pretrained: str | None = None  # .pth/.pt, safetensors, or a `sora train` checkpoint folder
    space_scale: float = field(default=1.0, metadata=_at_least(0.0))  # new height / old height
    time_scale: float = field(default=1.0, metadata=_at_least(0.0))  # new / old frame_interval
    no_temporal_pos_emb: bool = False  # DiT only (image models); STDiT ignores it, as Open-Sora's does
    enable_flashattn: bool = False  # uses flash-attn on CUDA when installed, else SDPA
    enable_layernorm_kernel: bool = False  # fused LayerNorm on CUDA when available
    input_sq_size: int = field(default=512, metadata=_at_least(1))  # v1.1: size the pos-emb is scaled to
    qk_norm: bool = False  # v1.1: RMSNorm on queries and keys
    compile_blocks: bool = False  # ours: torch.compile each transformer block (worth it on CUDA; keys unchanged)

    def __post_init__(self) -> None:
        if self.type not in MODEL_SIZES:
            raise ConfigError(not_one_of("type", self.type, list(MODEL_SIZES)))


@dataclass(frozen=True)
class VaeConfig:
    """`vae = dict(...)`: the image VAE applied frame by frame (SD VAE geometry)."""

    type: Literal["VideoAutoencoderKL"] = "VideoAutoencoderKL"
    from_pretrained: str = "stabilityai/sd-vae-ft-ema"  # hub name or local folder
    micro_batch_size: int | None = field(default=None, metadata=_at_least(1))  # frames per call
    subfolder: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False


@dataclass(frozen=True)
class TextEncoderConfig:
    """`text_encoder = dict(...)`: the caption encoder."""

    type: Literal["t5"] = "t5"
    from_pretrained: str = "DeepFloyd/t5-v1_1-xxl"  # hub name or local folder
    model_max_length: int = field(default=120, metadata=_at_least(1))  # tokens per caption
    # ColossalAI's sharded T5. Accepted for Open-Sora files; here T5 runs once, in preprocessing.
    shardformer: bool = False
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler = dict(...)`: the diffusion process for training and sampling."""

    # iddpm-speed: Open-Sora's SpeeDiT training (IDDPM with weighted steps); it samples as iddpm.
    type: Literal["iddpm", "iddpm-speed", "dpm-solver", "rflow"] = "iddpm"
    num_sampling_steps: int = field(default=100, metadata=_at_least(1))
    cfg_scale: float = field(default=7.0, metadata=_at_least(0.0))
    # Guidance acts on the first `cfg_channel` latent channels only (Open-Sora uses 3 of 4);
    # None guides all channels. IDDPM only: rflow guides every channel, as Open-Sora 1.2.
    cfg_channel: int | None = field(default=3, metadata=_at_least(1))
    timestep_respacing: str = ""  # training: "" keeps all 1000 steps
    # rflow (Open-Sora 1.2): training times uniform or T * sigmoid(N(loc, scale)); the transform
    # moves times towards the noise end for inputs larger than 512x512, one frame.
    sample_method: Literal["uniform", "logit-normal"] = "uniform"
    loc: float = 0.0
    scale: float = field(default=1.0, metadata=_at_least(0.0))
    use_timestep_transform: bool = False
    transform_scale: float = field(default=1.0, metadata=_at_least(0.0))

    @property
    def rflow_options(self) -> dict:
        """The settings only `rflow` reads, as `build_scheduler` takes them."""
        names = ("sample_method", "loc", "scale", "use_timestep_transform", "transform_scale")
        return {name: getattr(self, name) for name in names} if self.type == "rflow" else {}


@dataclass(frozen=True)
class StageResources:
    """Ray resources of one preprocessing stage (`map_batches` arguments)."""

    concurrency: int = field(default=1, metadata=_at_least(1))  # actors (or tasks) in parallel
    batch_size: int = field(default=4, metadata=_at_least(1))  # rows per call
    num_cpus: float = field(default=1.0, metadata=_at_least(0.0))
    num_gpus: float | None = field(default=None, metadata=_at_least(0.0))  # None: 1 if a GPU exists


@dataclass(frozen=True)
class PreprocessConfig:
    """`preprocess = dict(...)`: resources of the `sora preprocess` stages (ours, not Open-Sora's)."""

    probe: StageResources = StageResources(concurrency=2, batch_size=16, num_gpus=0.0)
    decode: StageResources = StageResources(concurrency=2, batch_size=2, num_gpus=0.0)
    vae: StageResources = StageResources()
    text: StageResources = StageResources(batch_size=16)
    rows_per_shard: int = field(default=256, metadata=_at_least(1))
    # Frames larger than this are rejected from their probed size, before decoding (8K UHD fits).
    max_pixels_per_frame: int = field(default=7680 * 4320, metadata=_at_least(1))


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TrainConfig:
    """A training config: what `sora preprocess` and `sora train` read.

    Without `bucket_config` it is Open-Sora 1.0's fixed-size form: one bucket of
    `image_size` and `num_frames`, centre crop. Either way `buckets` holds the parsed form.
    """

    # sample size of the fixed-size form; with a bucket_config the buckets decide
    num_frames: int | None = field(default=None, metadata=_at_least(1))
    frame_interval: int = field(default=3, metadata=_at_least(1))
    image_size: tuple[int, int] | None = None  # (height, width)
    # dataset
    root: str | None = None  # relative paths in the CSV resolve against it (else the CSV's folder)
    data_path: str | None = None  # CSV or Parquet with path,text
    # acceleration
    dtype: DType = "bf16"
    grad_checkpoint: bool = False
    plugin: Literal["zero2", "zero2-seq"] = "zero2"
    sp_size: int = field(default=1, metadata=_at_least(1))
    # ours: how a sequence-parallel group splits a sample's tokens (pipelines/sequence_parallel.py):
    # "space" splits every frame's tokens (any frame count, images too); "time" splits the frames
    # (Open-Sora 1.0's layout; every bucket's frame count must divide by sp_size).
    sp_split: Literal["space", "time"] = "space"
    # models
    model: ModelConfig = ModelConfig()
    vae: VaeConfig = VaeConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # run
    seed: int = 42
    outputs: str = "outputs"
    wandb: bool = False
    epochs: int = field(default=1000, metadata=_at_least(1))
    log_every: int = field(default=10, metadata=_at_least(1))
    ckpt_every: int = field(default=250, metadata=_at_least(1))
    load: str | None = None
    batch_size: int | None = field(default=None, metadata=_at_least(1))  # fixed-size form
    lr: float = field(default=2e-5, metadata=_at_least(0.0))
    grad_clip: float = field(default=1.0, metadata=_at_least(0.0))
    # (keep_prob, batch_size); batch_size may be Open-Sora's search range (max,), (min, max) or
    # (min, max, step) of its scripts/misc/search_bs.py: the config loads, `sora train` refuses it.
    bucket_config: dict[str, dict[int, tuple[float, int | tuple[int, ...] | None]]] | None = None
    mask_ratios: dict[str, float] | None = None
    # ours: the pre-encoded cache and the training job
    cache_dir: str = "cache"
    # Latent frames stored per sample, as a multiple of the bucket's T, so training can
    # still draw Open-Sora's random temporal window each epoch.
    cache_frames_factor: float = field(default=2.0, metadata=_at_least(1.0))
    ema_decay: float = field(default=0.9999, metadata=_between(0.0, 1.0))
    max_failures: int = field(default=1, metadata=_at_least(0))
    # CPUs Ray reserves per training worker (with use_gpu, beside its GPU): 2 on nodes of 3 CPUs
    # puts one worker per node.
    worker_cpus: float = field(default=1.0, metadata=_at_least(0.0))
    # Each worker writes <experiment>/batches-rank<R>.jsonl: the global batch it trains at each
    # step (which samples, in which order: for audits, and the resume tests).
    record_batches: bool = False
    # Held out of training, chosen by sample id (the same samples in every run and resume), and
    # evaluated every `eval_every` steps (None: at each checkpoint) at fixed timesteps and noise.
    eval_fraction: float = field(default=0.0, metadata=_between(0.0, 0.9))
    eval_every: int | None = field(default=None, metadata=_at_least(1))
    # Previews: these prompts are sampled from the EMA weights every `preview_every` steps (None:
    # at each checkpoint), away from the training step; see pipelines/preview.py.
    preview_prompts: tuple[str, ...] | None = None
    preview_every: int | None = field(default=None, metadata=_at_least(1))
    preprocess: PreprocessConfig = PreprocessConfig()
    # Derived, not a key of the file: bucket_config (or the fixed size) parsed once, here.
    buckets: BucketConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.bucket_config is None:
            for name in ("num_frames", "image_size", "batch_size"):
                if getattr(self, name) is None:
                    raise ConfigError(
                        f"{name} must be set when there is no bucket_config "
                        "(the fixed-size form trains one bucket of image_size x num_frames)"
                    )
        if self.image_size is not None:
            _check_image_size("image_size", self.image_size)
        if self.scheduler.type == "dpm-solver":
            raise ConfigError("scheduler: type 'dpm-solver' only samples; train with 'iddpm' or 'rflow'")
        if self.sp_size > 1 and self.plugin != "zero2-seq":
            raise ConfigError(f"sp_size={self.sp_size} needs plugin='zero2-seq' (sequence parallelism)")
        if self.mask_ratios is not None:
            ratios = {MASK_NAME_ALIASES.get(name, name): ratio for name, ratio in self.mask_ratios.items()}
            _check_mask_ratios(ratios)
            object.__setattr__(self, "mask_ratios", ratios)  # frozen: canonical names, set once here
        if self.bucket_config is None:
            buckets = fixed_bucket_config(self.image_size, self.num_frames, self.batch_size, self.frame_interval)
        else:
            try:
                buckets = parse_bucket_config(self.bucket_config, self.frame_interval)
            except BucketConfigError as error:
                raise ConfigError(str(error)) from None
        object.__setattr__(self, "buckets", buckets)  # frozen: set once here


@dataclass(frozen=True)
class InferenceConfig:
    """An inference config: what `sora sample` and the Serve application read."""

    num_frames: int = field(default=16, metadata=_at_least(1))
    # Open-Sora 1.0 writes the saved rate as `fps` (24 // 3); 1.1 writes the source rate as
    # `fps` and the stride as `frame_interval` and saves at fps // frame_interval. Both work.
    fps: int = field(default=8, metadata=_at_least(1))
    frame_interval: int = field(default=1, metadata=_at_least(1))
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    model: ModelConfig = ModelConfig()
    vae: VaeConfig = VaeConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    dtype: DType = "fp16"
    batch_size: int = field(default=1, metadata=_at_least(1))
    seed: int = 42
    prompt_path: str | None = None  # one prompt per line
    prompt: tuple[str, ...] | None = None  # takes priority over prompt_path
    save_dir: str = "./samples"
    # long video (the seed's "Inference-long" section)
    loop: int = field(default=1, metadata=_at_least(1))
    condition_frame_length: int = field(default=4, metadata=_at_least(0))
    # Per prompt (None: that prompt is unconditioned): ";"-separated images/videos, and
    # ";"-separated ref_index,loop_index,ref_start_frame,num_frames,target_location[,edit_ratio].
    reference_path: tuple[str | None, ...] | None = None
    mask_strategy: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        _check_image_size("image_size", self.image_size)
        if self.prompt is not None and not self.prompt:
            raise ConfigError("prompt: an empty list; give prompts or set prompt = None to use prompt_path")
        for name in ("reference_path", "mask_strategy"):
            per_prompt = getattr(self, name)
            if per_prompt is not None and self.prompt is not None and len(per_prompt) != len(self.prompt):
                raise ConfigError(
                    f"{name}: {len(per_prompt)} entries for {len(self.prompt)} prompts; give one per prompt "
                    "(None for a prompt without conditioning)"
                )
        try:
            self.long_video  # noqa: B018  (checks loop and condition_frame_length)
        except ConditionError as error:
            raise ConfigError(str(error)) from None
        for index, strategy in enumerate(self.mask_strategy or ()):
            try:
                parse_mask_strategy(strategy)
            except ConditionError as error:
                raise ConfigError(f"mask_strategy[{index}]: {error}") from None

    @property
    def save_fps(self) -> int:
        """Frame rate of the written mp4."""
        return max(1, self.fps // self.frame_interval)

    @property
    def long_video(self) -> LongVideo:
        """The clip layout: loop x (num_frames - condition_frame_length) + condition_frame_length frames."""
        return LongVideo(self.num_frames, self.loop, self.condition_frame_length)


# --------------------------------------------------------------------------- checks


def _check_image_size(name: str, size: tuple[int, int]) -> None:
    if any(side < 1 for side in size):
        raise ConfigError(f"{name}: height and width must be positive, got {size}")


def _check_mask_ratios(ratios: Mapping[str, float]) -> None:
    for name, ratio in ratios.items():
        if name not in MASK_NAMES:
            raise ConfigError(not_one_of("mask_ratios", name, list(MASK_NAMES)))
        if ratio < 0:
            raise ConfigError(f"mask_ratios[{name!r}]: must be >= 0, got {ratio}")
    total = sum(ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"mask_ratios: the ratios must add up to 1, they add up to {total:g}")


# --------------------------------------------------------------------------- files


CONFIG_CLASSES: dict[str, type] = {"train": TrainConfig, "inference": InferenceConfig}


def _print_notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


def load_config(
    path: str | Path,
    kind: Kind | None = None,
    overrides: Mapping[str, Any] | None = None,
    notice: Callable[[str], None] = _print_notice,
) -> TrainConfig | InferenceConfig:
    """Load and validate a config file.

    `kind` is "train" or "inference" (guessed from the keys when None). `overrides`
    maps dotted field paths (`"model.from_pretrained"`) to values from the command
    line; None values mean "not given" and are skipped.
    """
    return load_file(path, CONFIG_CLASSES, kind, overrides, notice)


def detect_kind(raw: Mapping[str, Any]) -> Kind:
    """Tell a training config from an inference config by the keys only one of them has."""
    return kind_of(raw, CONFIG_CLASSES)


def format_config(config: TrainConfig | InferenceConfig) -> str:
    """The config as a file in the seed's format; `load_config` reads it back equal."""
    lines = [f"# resolved {type(config).__name__}: every field, defaults included", ""]
    for item in settable_fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{item.name} = dict(")
            for inner in dataclasses.fields(value):
                inner_value = getattr(value, inner.name)
                if dataclasses.is_dataclass(inner_value):
                    inner_value = dataclasses.asdict(inner_value)
                lines.append(f"    {inner.name}={pprint.pformat(inner_value, width=90, sort_dicts=False)},")
            lines.append(")")
        else:
            lines.append(f"{item.name} = {pprint.pformat(value, width=100, sort_dicts=False)}")
    return "\n".join(lines) + "\n"
