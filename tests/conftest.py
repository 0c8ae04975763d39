"""Shared fixtures: the tiny models and the demo dataset, made once per test session."""

from __future__ import annotations

import os
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
