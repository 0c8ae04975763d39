"""Checkpoint folders: the newest complete one, `--ckpt-path` resolution, experiment names."""

from __future__ import annotations

from pathlib import Path

from pipelines.checkpoint import latest_checkpoint, new_experiment, resolve_weights


def checkpoint(outputs: Path, experiment: str, step: int, complete: bool = True) -> Path:
    folder = outputs / experiment / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    if complete:
        (folder / "COMPLETE").write_text("")
    return folder


def test_ckpt_path_takes_an_outputs_or_experiment_folder(tmp_path):
    outputs = tmp_path / "outputs"
    checkpoint(outputs, "000-debug", 8)
    newest = checkpoint(outputs, "001-debug", 4)
    checkpoint(outputs, "001-debug", 6, complete=False)  # still being written: skipped
    checkpoint(outputs, "002-debug", 2, complete=False)  # an experiment with no complete checkpoint yet
    assert resolve_weights(str(outputs)) == str(newest)
    assert resolve_weights(str(outputs / "000-debug")).endswith("000-debug/checkpoints/step-0000008")
    assert resolve_weights(str(newest)) == str(newest)
    assert resolve_weights("model.pth") == "model.pth"


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    first = checkpoint(tmp_path, "000-debug", 4)
    checkpoint(tmp_path, "000-debug", 8, complete=False)
    assert latest_checkpoint(tmp_path / "000-debug") == first
    assert latest_checkpoint(first) == first  # a checkpoint folder is its own newest
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_new_experiments_are_numbered_after_the_highest(tmp_path):
    assert new_experiment(tmp_path, "STDiT2-XL/2").name == "000-STDiT2-XL-2"
    (tmp_path / "000-debug").mkdir()
    (tmp_path / "004-debug").mkdir()
    (tmp_path / "notes").mkdir()
    assert new_experiment(tmp_path, "debug").name == "005-debug"
