"""Config files in Open-Sora's format, loaded into frozen, typed dataclasses.

A config file is a plain Python file of top-level assignments with `dict(...)`
sections (the seed's format, so Open-Sora's own files load unchanged). It is
*parsed*, never executed: only literals, arithmetic, names assigned earlier in
the file and `dict(key=value, ...)` are allowed. The result is validated once,
here; the rest of the project reads typed fields and never a raw dict.

Two kinds exist: a training config (drives `sora preprocess` and `sora train`)
and an inference config (drives `sora sample` and serving). Command-line flags
override fields by dotted path (`model.from_pretrained`), before validation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import operator
import pprint
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from bucketing.config import BucketConfigError, parse_bucket_config
from sora_model.mask_strategy import ConditionError, LongVideo, parse_mask_strategy
from sora_model.sizes import MODEL_SIZES


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


CLEAR = object()
"""An override value meaning "set this field to None" (None itself means "not given")."""


Kind = Literal["train", "inference"]
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
MASK_NAME_ALIASES = {"identity": "mask_no"} | {name.removeprefix("mask_"): name for name in MASK_NAMES[1:]}


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
    no_temporal_pos_emb: bool = False  # for image-only models
    enable_flashattn: bool = False  # uses flash-attn on CUDA when installed, else SDPA
    enable_layernorm_kernel: bool = False  # fused LayerNorm on CUDA when available
    input_sq_size: int = field(default=512, metadata=_at_least(1))  # v1.1: size the pos-emb is scaled to
    qk_norm: bool = False  # v1.1: RMSNorm on queries and keys

    def __post_init__(self) -> None:
        if self.type not in MODEL_SIZES:
            raise ConfigError(_not_one_of("type", self.type, list(MODEL_SIZES)))


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

    type: Literal["iddpm", "dpm-solver"] = "iddpm"
    num_sampling_steps: int = field(default=100, metadata=_at_least(1))
    cfg_scale: float = field(default=7.0, metadata=_at_least(0.0))
    # Guidance acts on the first `cfg_channel` latent channels only (Open-Sora uses 3 of 4);
    # None guides all channels.
    cfg_channel: int | None = field(default=3, metadata=_at_least(1))
    timestep_respacing: str = ""  # training: "" keeps all 1000 steps


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


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "vae": VaeConfig,
    "text_encoder": TextEncoderConfig,
    "scheduler": SchedulerConfig,
}


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TrainConfig:
    """A training config: what `sora preprocess` and `sora train` read.

    Without `bucket_config` it is Open-Sora 1.0's fixed-size form: one bucket of
    `image_size` and `num_frames`, centre crop.
    """

    # sample size of the fixed-size form; with a bucket_config the buckets decide
    num_frames: int | None = field(default=None, metadata=_at_least(1))
    frame_interval: int = field(default=3, metadata=_at_least(1))
    image_size: tuple[int, int] | None = None  # (height, width)
    # dataset
    root: str | None = None  # relative paths in the CSV resolve against it (else the CSV's folder)
    data_path: str | None = None  # CSV or Parquet with path,text
    use_image_transform: bool = False
    num_workers: int = field(default=4, metadata=_at_least(0))
    # acceleration
    dtype: DType = "bf16"
    grad_checkpoint: bool = False
    plugin: Literal["zero2", "zero2-seq"] = "zero2"
    sp_size: int = field(default=1, metadata=_at_least(1))
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
    bucket_config: dict[str, dict[int, tuple[float, int | None]]] | None = None
    mask_ratios: dict[str, float] | None = None
    # ours: the pre-encoded cache and the training job
    cache_dir: str = "cache"
    # Latent frames stored per sample, as a multiple of the bucket's T, so training can
    # still draw Open-Sora's random temporal window each epoch.
    cache_frames_factor: float = field(default=2.0, metadata=_at_least(1.0))
    ema_decay: float = field(default=0.9999, metadata=_between(0.0, 1.0))
    max_failures: int = field(default=1, metadata=_at_least(0))
    preprocess: PreprocessConfig = PreprocessConfig()

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
        if self.sp_size > 1 and self.plugin != "zero2-seq":
            raise ConfigError(f"sp_size={self.sp_size} needs plugin='zero2-seq' (sequence parallelism)")
        if self.mask_ratios is not None:
            ratios = {MASK_NAME_ALIASES.get(name, name): ratio for name, ratio in self.mask_ratios.items()}
            _check_mask_ratios(ratios)
            object.__setattr__(self, "mask_ratios", ratios)  # frozen: canonical names, set once here
        if self.bucket_config is not None:
            try:
                parse_bucket_config(self.bucket_config, self.frame_interval)
            except BucketConfigError as error:
                raise ConfigError(str(error)) from None


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


CONFIG_CLASSES: dict[str, type] = {"train": TrainConfig, "inference": InferenceConfig}

# Keys Open-Sora's own config files use that this project has no use for. They are
# accepted with a one-line notice so those files load unchanged; any other unknown
# key is an error. Keyed by section ("" = top level), with the reason shown to users.
_SAMPLING_ONLY = "an Open-Sora inference-script option this project does not have"
IGNORED_KEYS: dict[str, dict[str, str]] = {
    "": {
        "num_bucket_build_workers": "buckets are assigned once, in `sora preprocess`",
        "multi_resolution": "the model type decides the size conditioning",
        "start_from_scratch": "`--load` always resumes; `--ckpt-path` loads weights only",
        "is_vae": "VAE training is not part of this project",
        "sample_name": _SAMPLING_ONLY,
        "num_sample": _SAMPLING_ONLY,
        "prompt_as_path": _SAMPLING_ONLY,
        "start_index": _SAMPLING_ONLY,
        "end_index": _SAMPLING_ONLY,
    },
    "model": {
        "qk_norm_legacy": "Open-Sora 1.2's compatibility switch; QK-norm follows `qk_norm`",
        "enable_sequence_parallelism": "sequence parallelism follows `plugin` and `sp_size`",
    },
}
# Spellings of later Open-Sora releases, read as the field they mean.
ALIASES: dict[str, dict[str, str]] = {"model": {"enable_flash_attn": "enable_flashattn"}}

# Open-Sora 1.1 training files keep data settings in `dataset = dict(type=..., ...)`;
# its fields map onto our top-level fields of the same names.
DATASET_TYPES = ("VideoTextDataset", "VariableVideoTextDataset")
DATASET_FIELDS = ("data_path", "root", "num_frames", "frame_interval", "image_size")
DATASET_TRANSFORMS = ("resize_crop", "center")


# --------------------------------------------------------------------------- reading files


_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a config file into a dict of its top-level assignments, without running it."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid Python: {error.msg}") from None

    names: dict[str, Any] = {}
    for statement in tree.body:
        where = f"{path}:{statement.lineno}"
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or a bare string
        if (
            not isinstance(statement, ast.Assign)
            or len(statement.targets) != 1
            or not isinstance(statement.targets[0], ast.Name)
        ):
            raise ConfigError(
                f"{where}: config files hold only assignments like `name = value`; "
                f"found `{ast.unparse(statement).splitlines()[0]}`"
            )
        name = statement.targets[0].id
        if name == "_base_":
            raise ConfigError(f"{where}: `_base_` inheritance is not supported; copy the fields you need")
        names[name] = _evaluate(statement.value, names, where)
    # Names starting with "_" are private helpers of the file, not settings.
    return {name: value for name, value in names.items() if not name.startswith("_")}


def _evaluate(node: ast.expr, names: Mapping[str, Any], where: str) -> Any:
    def walk(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(walk(item) for item in node.elts)
        if isinstance(node, ast.List):
            return [walk(item) for item in node.elts]
        if isinstance(node, ast.Dict):
            if any(key is None for key in node.keys):
                raise ConfigError(f"{where}: `**` unpacking is not supported in config files")
            return {walk(key): walk(value) for key, value in zip(node.keys, node.values, strict=True)}
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            raise ConfigError(f"{where}: name `{node.id}` is not defined above in this file")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            return _BINARY_OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](walk(node.operand))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "dict"
            and not node.args
            and all(keyword.arg is not None for keyword in node.keywords)
        ):
            return {keyword.arg: walk(keyword.value) for keyword in node.keywords}
        raise ConfigError(
            f"{where}: only literals, arithmetic, earlier names and dict(key=value, ...) are allowed "
            f"in config files; found `{ast.unparse(node)}`"
        )

    try:
        return walk(node)
    except ConfigError:
        raise
    except (TypeError, ZeroDivisionError, OverflowError) as error:
        raise ConfigError(f"{where}: cannot evaluate `{ast.unparse(node)}`: {error}") from None


# --------------------------------------------------------------------------- validation


def _not_one_of(name: str, value: Any, choices: list[Any]) -> str:
    message = f"{name}: {value!r} is not one of {', '.join(repr(choice) for choice in choices)}"
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
    return message + (f" (did you mean {close[0]!r}?)" if close else "")


def _check_image_size(name: str, size: tuple[int, int]) -> None:
    if any(side < 1 for side in size):
        raise ConfigError(f"{name}: height and width must be positive, got {size}")


def _check_mask_ratios(ratios: Mapping[str, float]) -> None:
    for name, ratio in ratios.items():
        if name not in MASK_NAMES:
            raise ConfigError(_not_one_of("mask_ratios", name, list(MASK_NAMES)))
        if ratio < 0:
            raise ConfigError(f"mask_ratios[{name!r}]: must be >= 0, got {ratio}")
    total = sum(ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"mask_ratios: the ratios must add up to 1, they add up to {total:g}")


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(argument) for argument in arguments)
    if origin is Literal:
        return "one of " + ", ".join(repr(argument) for argument in arguments)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"a list of {_describe(arguments[0])}"
        return "a tuple (" + ", ".join(_describe(argument) for argument in arguments) + ")"
    if origin is dict:
        return f"a dict of {_describe(arguments[0])} to {_describe(arguments[1])}"
    if annotation is type(None):
        return "None"
    if dataclasses.is_dataclass(annotation):
        return "dict(...)"
    return {bool: "True/False", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _convert(value: Any, annotation: Any, name: str, context: _Context) -> Any:
    """Check `value` against a type annotation; returns it in canonical form (tuples, floats)."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)

    def wrong() -> ConfigError:
        return ConfigError(f"{name}: expected {_describe(annotation)}, got {value!r} ({type(value).__name__})")

    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in arguments:
                return None
            raise wrong()
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _convert(value, argument, name, context)
            except ConfigError as error:
                if len(arguments) == 2:  # `X | None`: the message about X is the useful one
                    raise error from None
        raise wrong()
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in arguments):
            return value
        raise ConfigError(_not_one_of(name, value, list(arguments)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if origin is tuple:
        if isinstance(value, str) and len(arguments) == 2 and arguments[1] is Ellipsis:
            value = [value]  # a single string where a list of strings is expected
        if not isinstance(value, list | tuple):
            raise wrong()
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_convert(item, arguments[0], f"{name}[{i}]", context) for i, item in enumerate(value))
        if len(value) != len(arguments):
            raise wrong()
        return tuple(
            _convert(item, argument, f"{name}[{i}]", context)
            for i, (item, argument) in enumerate(zip(value, arguments, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        key_type, value_type = arguments
        return {
            _convert(key, key_type, f"{name} key {key!r}", context): _convert(
                item, value_type, f"{name}[{key!r}]", context
            )
            for key, item in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if dataclasses.is_dataclass(value) and isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise wrong()
        return _build(annotation, value, name, context)
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")  # a bug here, not the user's


@dataclass
class _Context:
    """Where values came from, for messages, and where notices go."""

    path: str
    overridden: set[str]
    notice: Callable[[str], None]

    def source(self, dotted: str) -> str:
        return "command line" if dotted in self.overridden else self.path


def _build(cls: type, raw: Mapping[str, Any], prefix: str, context: _Context) -> Any:
    """Build dataclass `cls` from a raw mapping: unknown keys, types and ranges checked."""
    hints = typing.get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    section = prefix.rsplit(".", 1)[-1] if prefix else ""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        alias = ALIASES.get(section, {}).get(key)
        if alias is not None and alias not in raw:
            context.notice(f"{context.source(dotted)}: reading '{dotted}' as '{prefix}.{alias}'")
            key, dotted = alias, f"{prefix}.{alias}"
        if key not in fields:
            ignored = IGNORED_KEYS.get(section, {})
            if key in ignored:
                context.notice(f"{context.source(dotted)}: ignoring Open-Sora key '{dotted}' ({ignored[key]})")
                continue
            raise ConfigError(_unknown_key(dotted, key, [name for name in fields if not name.startswith("_")]))
        converted = _convert(value, hints[key], dotted, context)
        metadata = fields[key].metadata
        if isinstance(converted, int | float) and not isinstance(converted, bool):
            if "min" in metadata and converted < metadata["min"]:
                raise ConfigError(f"{dotted}: must be >= {metadata['min']}, got {converted!r}")
            if "max" in metadata and converted > metadata["max"]:
                raise ConfigError(f"{dotted}: must be <= {metadata['max']}, got {converted!r}")
        values[key] = converted
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix}.{error}" if prefix else str(error)) from None


def _unknown_key(dotted: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    parent = dotted[: -len(str(key))]
    if close:
        return f"unknown key '{dotted}' (did you mean '{parent}{close[0]}'?)"
    return f"unknown key '{dotted}'; valid keys here: {', '.join(sorted(valid))}"


# --------------------------------------------------------------------------- loading


def _print_notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


def detect_kind(raw: Mapping[str, Any]) -> Kind:
    """Tell a training config from an inference config by the keys only one of them has."""
    only_train = set(_field_names(TrainConfig)) - set(_field_names(InferenceConfig)) | {"dataset"}
    only_inference = set(_field_names(InferenceConfig)) - set(_field_names(TrainConfig))
    has_train, has_inference = bool(only_train & raw.keys()), bool(only_inference & raw.keys())
    if has_train != has_inference:
        return "train" if has_train else "inference"
    raise ConfigError(
        "cannot tell whether this is a training or an inference config "
        f"(training-only keys: {sorted(only_train & raw.keys())}, "
        f"inference-only keys: {sorted(only_inference & raw.keys())}); say which with --kind"
    )


def _field_names(cls: type) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def _merge_dataset_section(raw: dict[str, Any], path: str, notice: Callable[[str], None]) -> None:
    """Fold Open-Sora 1.1's `dataset = dict(...)` into the top-level fields it stands for."""
    dataset = raw.pop("dataset")
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{path}: dataset: expected dict(...), got {dataset!r}")
    for key, value in dataset.items():
        if key == "type":
            if value not in DATASET_TYPES:
                raise ConfigError(f"{path}: " + _not_one_of("dataset.type", value, list(DATASET_TYPES)))
        elif key == "transform_name":
            if value not in DATASET_TRANSFORMS:
                raise ConfigError(f"{path}: " + _not_one_of("dataset.transform_name", value, list(DATASET_TRANSFORMS)))
        elif key in DATASET_FIELDS:
            if value is None or value == (None, None):
                continue  # "set elsewhere" in Open-Sora's files (bucket_config, --data-path)
            if isinstance(value, list):
                value = tuple(value)
            current = tuple(raw[key]) if isinstance(raw.get(key), list) else raw.get(key)
            if key in raw and current != value:
                raise ConfigError(
                    f"{path}: dataset.{key}={value!r} disagrees with {key}={raw[key]!r}; keep one of them"
                )
            raw[key] = value
        else:
            raise ConfigError(
                f"{path}: " + _unknown_key(f"dataset.{key}", key, ["type", "transform_name", *DATASET_FIELDS])
            )
    notice(f"{path}: read data settings from the `dataset` section into the top-level fields")


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
    path = str(path)
    raw = read_config_file(path)
    if kind is None:
        try:
            kind = detect_kind(raw)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    if kind not in CONFIG_CLASSES:
        raise ConfigError(_not_one_of("kind", kind, list(CONFIG_CLASSES)))
    if "dataset" in raw and kind == "train":
        _merge_dataset_section(raw, path, notice)
    overridden = _apply_overrides(raw, overrides or {}, CONFIG_CLASSES[kind])
    context = _Context(path=path, overridden=overridden, notice=notice)
    try:
        return _build(CONFIG_CLASSES[kind], raw, "", context)
    except ConfigError as error:
        message = str(error)
        if any(message.startswith((f"{dotted}:", f"{dotted}[", f"{dotted} ")) for dotted in overridden):
            raise ConfigError(f"command line: {message}") from None
        other = _other_kind(raw, kind)
        if other is not None:
            raise ConfigError(f"{path} looks like {other} config, not {kind} config ({message})") from None
        raise ConfigError(f"{path}: {message}") from None


def _other_kind(raw: Mapping[str, Any], kind: str) -> str | None:
    """'an inference' / 'a training' when the keys clearly say the file is of the other kind."""
    try:
        detected = detect_kind(raw)
    except ConfigError:
        return None
    if detected == kind:
        return None
    return "an inference" if detected == "inference" else "a training"


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], cls: type) -> set[str]:
    """Write command-line values into the raw dict; returns the dotted paths that were set."""
    overridden: set[str] = set()
    for dotted, value in overrides.items():
        if value is None:
            continue
        keys = dotted.split(".")
        target = raw
        owner = cls
        for depth, key in enumerate(keys):
            valid = _field_names(owner)
            if key not in valid:
                raise ConfigError(_unknown_key(".".join(keys[: depth + 1]), key, valid))
            if depth == len(keys) - 1:
                target[key] = None if value is CLEAR else list(value) if isinstance(value, tuple) else value
                break
            section = target.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(f"cannot override {dotted}: `{key}` is not a dict(...) section")
            target = section
            owner = typing.get_type_hints(owner)[key]
        overridden.add(dotted)
    return overridden


def format_config(config: TrainConfig | InferenceConfig) -> str:
    """The config as a file in the seed's format; `load_config` reads it back equal."""
    lines = [f"# resolved {type(config).__name__}: every field, defaults included", ""]
    for item in dataclasses.fields(config):
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
