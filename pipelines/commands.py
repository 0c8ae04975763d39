"""One function per `sora` command: what cli.py calls after parsing arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, InferenceConfig, TrainConfig, format_config, load_config


def load(path: str | Path, kind: str | None, overrides: Mapping[str, Any]) -> TrainConfig | InferenceConfig:
    """Load and validate a config with command-line overrides (dotted field paths)."""
    return load_config(path, kind, overrides)  # type: ignore[arg-type]


def show_config(path: str | Path, kind: str | None) -> str:
    """The resolved config, in the seed's file format."""
    if kind not in (None, "train", "inference"):
        raise ConfigError(f"--kind must be train or inference, got {kind!r}")
    return format_config(load_config(path, kind))  # type: ignore[arg-type]


def bucket_report(source: str | Path, config_path: str | Path, as_json: bool, plot: str | Path | None,
                  address: str | None = None) -> str:  # fmt: skip
    """The bucket report of a CSV/Parquet table under a training config."""
    from pipelines.bucket_report import bucket_report as report

    config = load_config(config_path, "train")
    return report(source, config, as_json, plot, address)  # type: ignore[arg-type]


def preprocess(
    data: str | Path,
    config_path: str | Path,
    cache_dir: str | Path | None,
    address: str | None,
    reuse: Sequence[str] = (),
) -> str:
    """Preprocess DATA into the cache, reusing what earlier builds encoded; returns the summary table."""
    from pipelines.preprocess import preprocess as run

    config = load_config(config_path, "train", {"data_path": str(data)})
    summary = run(config, cache_dir or config.cache_dir, address, reuse)  # type: ignore[arg-type]
    return summary.format()


def train(
    config_path: str | Path,
    overrides: Mapping[str, Any],
    num_workers: int,
    gpu: bool | None,
    address: str | None,
) -> Path:
    """Train from the cache; returns the experiment folder."""
    from pipelines.train import train as run

    config = load_config(config_path, "train", overrides)
    return run(config, config.cache_dir, config.outputs, config.load, num_workers, gpu, address)  # type: ignore[arg-type]


def search_batch_size(config_path: str | Path, **options: Any) -> str:
    """The largest batch per bucket that fits; returns the table and a bucket_config to paste.
    `options` are `pipelines.batch_search.search_batch_size`'s."""
    from pipelines.batch_search import search_batch_size as run

    return run(load_config(config_path, "train"), **options)  # type: ignore[arg-type]


def sample(config_path: str | Path, overrides: Mapping[str, Any]) -> list[Path]:
    """Generate one mp4 per prompt; returns their paths."""
    from pipelines.sample import sample as run

    return run(load_config(config_path, "inference", overrides))  # type: ignore[arg-type]


def demo_data(out_dir: str | Path, num: int = 24, seed: int = 0) -> Path:
    """Write the demo dataset; returns its data.csv."""
    # Imported here, not at the top: `sora --help` and config commands stay fast
    # without loading PyAV, torch, transformers and diffusers.
    from pipelines.demo_data import write_demo_data

    return write_demo_data(out_dir, num=num, seed=seed)


def demo_eval(samples_dir: str | Path, prompts: str | Path | None, sheet: str | Path | None, as_json: bool) -> str:
    """Judge sampled demo videos against their captions; returns the report."""
    from pipelines.demo_eval import demo_eval as run

    return run(samples_dir, prompts, sheet, as_json)


def debug_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny T5 and VAE; returns their folders by role."""
    from sora_model.debug import write_debug_models

    return write_debug_models(out_dir, seed=seed)


def fit_demo_vae(out_dir: str | Path, steps: int | None, seed: int) -> dict[str, Any]:
    """Fit the demo VAE into OUT_DIR (`steps` None: DemoVaeFit's); returns its fit.json content."""
    from pipelines.demo_vae import DemoVaeFit
    from pipelines.demo_vae import fit_demo_vae as run

    fit = DemoVaeFit(seed=seed) if steps is None else DemoVaeFit(steps=steps, seed=seed)
    return run(out_dir, fit)
