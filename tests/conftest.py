"""Shared fixtures: the tiny models and the demo dataset, made once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av  # noqa: F401  before decord: decord's bundled FFmpeg libraries, loaded first, break PyAV's VP9 encoder
import pytest

# Nothing in the tests may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_NUM = 12  # good samples in the session's demo dataset


@pytest.fixture(scope="session")
def debug_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sora_model.debug import write_debug_models

    return write_debug_models(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="session")
def demo_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo"), num=DEMO_NUM, seed=0, progress=False)


ROOT = Path(__file__).resolve().parent.parent
SORA = str(Path(sys.executable).parent / "sora")


def write_config(folder: Path, models: dict[str, Path], **changes: str) -> Path:
    """configs/debug/train.py pointed at the session's debug models, with small shards."""
    text = (ROOT / "configs/debug/train.py").read_text()
    text = text.replace('"demo/models/vae"', f'"{models["vae"]}"')
    text = text.replace('"demo/models/t5"', f'"{models["text_encoder"]}"')
    text = text.replace("rows_per_shard=64", "rows_per_shard=2")
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path = folder / "train.py"
    path.write_text(text)
    return path


def run_sora(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """The installed `sora` command, offline, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run([SORA, *args], env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="session")
def clean_cache(tmp_path_factory, demo_csv: Path, debug_models) -> tuple[Path, Path]:
    """The demo data preprocessed once per session: (cache folder, config file)."""
    folder = tmp_path_factory.mktemp("clean")
    config = write_config(folder, debug_models)
    result = run_sora("preprocess", str(demo_csv), "--config", str(config), "--cache-dir", str(folder / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rows in: {DEMO_NUM + 3}   kept: {DEMO_NUM}   dropped by bucketing: 0   rejected: 3" in result.stdout
    return folder / "cache", config


def assert_same_cache(ours: Path, theirs: Path) -> None:
    """Byte for byte: the manifest and every file of the version it names; nothing else left."""
    assert (ours / "manifest.json").read_bytes() == (theirs / "manifest.json").read_bytes()
    version = json.loads((ours / "manifest.json").read_text())["version"]
    files = sorted(p.relative_to(ours) for p in (ours / version).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(theirs) for p in (theirs / version).rglob("*") if p.is_file())
    assert any(f.name.startswith("part-") for f in files) and (ours / version / "probe.arrow").exists()
    for file in files:
        assert (ours / file).read_bytes() == (theirs / file).read_bytes(), file
    top = sorted(p.name for p in ours.iterdir() if p.name != "build.json")
    assert top == sorted(p.name for p in theirs.iterdir() if p.name != "build.json") == ["manifest.json", version]
