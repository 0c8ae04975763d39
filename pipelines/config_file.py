"""Reading config files: Open-Sora's format parsed, then checked against the dataclasses.

A config file is a plain Python file of top-level assignments with `dict(...)`
sections (the seed's format, so Open-Sora's own files load unchanged). It is
*parsed*, never executed: only literals, arithmetic, names assigned earlier in
the file and `dict(key=value, ...)` are allowed. The raw dict is then checked,
field by field, against the type annotations and `min`/`max` metadata of the
dataclasses in `pipelines.config` (passed in, so this module does not import
them), with Open-Sora's keys this project has no use for accepted with a notice.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


CLEAR = object()
"""An override value meaning "set this field to None" (None itself means "not given")."""


Kind = Literal["train", "inference"]


def did_you_mean(value: Any, choices: Iterable[Any], parent: str = "") -> str:
    """` (did you mean 'x'?)` for the choice closest to `value`, or "" when none is close.

    Every "did you mean" hint of config keys, config values and Serve's request fields
    comes from here; `parent` is written before the choice (a section's dotted path).
    """
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
    return f" (did you mean '{parent}{close[0]}'?)" if close else ""


def not_one_of(name: str, value: Any, choices: list[Any]) -> str:
    """The message for a value outside its choices: all of them, and the closest."""
    listed = ", ".join(repr(choice) for choice in choices)
    return f"{name}: {value!r} is not one of {listed}" + did_you_mean(value, choices)


def settable_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields a file or an override may set (derived `init=False` fields are not)."""
    return [item for item in dataclasses.fields(cls) if item.init]


# --------------------------------------------------------------------------- Open-Sora's keys

# Keys Open-Sora's own config files use that this project has no use for. They are
# accepted with a one-line notice so those files load unchanged; any other unknown
# key is an error. Keyed by section ("" = top level), with the reason shown to users.
_SAMPLING_ONLY = "an Open-Sora inference-script option this project does not have"
IGNORED_KEYS: dict[str, dict[str, str]] = {
    "": {
        "num_workers": "training reads the pre-encoded cache, there are no dataloader workers; "
        "`sora train --num-workers` sets the Ray Train workers",
        "use_image_transform": "transforms are decided in `sora preprocess`, by each sample's bucket",
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


# --------------------------------------------------------------------------- loading


def load_file(
    path: str | Path,
    classes: Mapping[str, type],
    kind: str | None,
    overrides: Mapping[str, Any] | None,
    notice: Callable[[str], None],
) -> Any:
    """`pipelines.config.load_config`, given the config class of each kind."""
    path = str(path)
    raw = read_config_file(path)
    if kind is None:
        try:
            kind = kind_of(raw, classes)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    if kind not in classes:
        raise ConfigError(not_one_of("kind", kind, list(classes)))
    if "dataset" in raw and kind == "train":
        _merge_dataset_section(raw, path, notice)
    if kind == "train":
        _read_sequence_parallel_switch(raw, path, notice)
    overridden = _apply_overrides(raw, overrides or {}, classes[kind])
    context = _Context(path=path, overridden=overridden, notice=notice)
    try:
        return _build(classes[kind], raw, "", context)
    except ConfigError as error:
        message = str(error)
        if any(message.startswith((f"{dotted}:", f"{dotted}[", f"{dotted} ")) for dotted in overridden):
            raise ConfigError(f"command line: {message}") from None
        other = _other_kind(raw, kind, classes)
        if other is not None:
            raise ConfigError(f"{path} looks like {other} config, not {kind} config ({message})") from None
        raise ConfigError(f"{path}: {message}") from None


def kind_of(raw: Mapping[str, Any], classes: Mapping[str, type]) -> Kind:
    """Tell a training config from an inference config by the keys only one of them has."""
    train, inference = set(_field_names(classes["train"])), set(_field_names(classes["inference"]))
    only_train = train - inference | {"dataset"}
    only_inference = inference - train
    has_train, has_inference = bool(only_train & raw.keys()), bool(only_inference & raw.keys())
    if has_train != has_inference:
        return "train" if has_train else "inference"
    raise ConfigError(
        "cannot tell whether this is a training or an inference config "
        f"(training-only keys: {sorted(only_train & raw.keys())}, "
        f"inference-only keys: {sorted(only_inference & raw.keys())}); say which with --kind"
    )


def _other_kind(raw: Mapping[str, Any], kind: str, classes: Mapping[str, type]) -> str | None:
    """'an inference' / 'a training' when the keys clearly say the file is of the other kind."""
    try:
        detected = kind_of(raw, classes)
    except ConfigError:
        return None
    if detected == kind:
        return None
    return "an inference" if detected == "inference" else "a training"


def _field_names(cls: type) -> list[str]:
    return [item.name for item in settable_fields(cls)]


def _merge_dataset_section(raw: dict[str, Any], path: str, notice: Callable[[str], None]) -> None:
    """Fold Open-Sora 1.1's `dataset = dict(...)` into the top-level fields it stands for."""
    dataset = raw.pop("dataset")
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{path}: dataset: expected dict(...), got {dataset!r}")
    for key, value in dataset.items():
        if key == "type":
            if value not in DATASET_TYPES:
                raise ConfigError(f"{path}: " + not_one_of("dataset.type", value, list(DATASET_TYPES)))
        elif key == "transform_name":
            if value not in DATASET_TRANSFORMS:
                raise ConfigError(f"{path}: " + not_one_of("dataset.transform_name", value, list(DATASET_TRANSFORMS)))
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


def _read_sequence_parallel_switch(raw: dict[str, Any], path: str, notice: Callable[[str], None]) -> None:
    """Open-Sora 1.0's 64x512x512-sp.py asks for sequence parallelism with `sp_size = 2` and the model's
    `enable_sequence_parallelism=True` under plugin "zero2"; here that is plugin "zero2-seq"."""
    model = raw.get("model")
    asks = isinstance(model, Mapping) and model.get("enable_sequence_parallelism") is True
    sp_size = raw.get("sp_size", 1)
    if asks and isinstance(sp_size, int) and sp_size > 1 and raw.get("plugin", "zero2") == "zero2":
        raw["plugin"] = "zero2-seq"
        notice(
            f"{path}: reading plugin 'zero2' with sp_size={sp_size} and model.enable_sequence_parallelism=True "
            "as plugin 'zero2-seq' (sequence parallelism)"
        )


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
# Config values are small: a number of more bits or a sequence of more items than this is a
# mistake (or `9**9**9`, which would take hours), refused before it is computed.
MAX_INT_BITS = 4096
MAX_ITEMS = 1_000_000


def _too_large(op: ast.operator, left: Any, right: Any) -> str | None:
    """Why `left op right` would be too large to compute, or None."""
    whole = (int,)
    if isinstance(op, ast.Pow) and isinstance(left, whole) and isinstance(right, whole) and abs(left) > 1:
        bits = right * math.log2(abs(left)) if right > 0 else 0
        if bits > MAX_INT_BITS:
            return f"about {bits:.3g} bits; the limit is {MAX_INT_BITS}"
    if not isinstance(op, ast.Mult):
        return None
    for sequence, count in ((left, right), (right, left)):
        sized = isinstance(sequence, str | list | tuple) and isinstance(count, whole)
        if sized and len(sequence) * count > MAX_ITEMS:
            return f"{len(sequence) * count} items; the limit is {MAX_ITEMS}"
    bits = left.bit_length() + right.bit_length() if isinstance(left, whole) and isinstance(right, whole) else 0
    if bits > MAX_INT_BITS:
        return f"about {bits} bits; the limit is {MAX_INT_BITS}"
    return None


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
            left, right = walk(node.left), walk(node.right)
            if (too_large := _too_large(node.op, left, right)) is not None:
                raise ConfigError(f"{where}: `{ast.unparse(node)}` is too large for a config value: {too_large}")
            return _BINARY_OPS[type(node.op)](left, right)
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


# --------------------------------------------------------------------------- checking values


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
    fields = {item.name: item for item in settable_fields(cls)}
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
            raise ConfigError(_unknown_key(dotted, key, list(fields)))
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
    parent = dotted[: -len(str(key))]
    hint = did_you_mean(key, valid, parent) or f"; valid keys here: {', '.join(sorted(valid))}"
    return f"unknown key '{dotted}'{hint}"


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
        raise ConfigError(not_one_of(name, value, list(arguments)))
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
