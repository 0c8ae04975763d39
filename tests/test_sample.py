"""`sora sample` with the debug models: mp4 files of the requested size and length, the same for a seed."""

from __future__ import annotations

from pathlib import Path

import decord
import numpy as np

from tests.conftest import ROOT, run_sora


def inference_config(folder: Path, models: dict[str, Path]) -> Path:
    text = (ROOT / "configs/debug/inference.py").read_text()
    text = text.replace('"demo/models/vae"', f'"{models["vae"]}"').replace(
        '"demo/models/t5"', f'"{models["text_encoder"]}"'
    )
    path = folder / "inference.py"
    path.write_text(text)
    return path


def frames_of(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def test_sample_writes_one_mp4_per_prompt(debug_models, tmp_path):
    config = inference_config(tmp_path, debug_models)
    prompts = ["--prompt", "a red circle moves left on a blue background", "--prompt", "a yellow square moves up"]
    sizes = ["--num-frames", "5", "--image-size", "64", "96", "--num-sampling-steps", "3"]
    args = ["sample", str(config), *prompts, *sizes]
    first = run_sora(*args, "--save-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    paths = [Path(line) for line in first.stdout.split()]
    assert [p.name for p in paths] == [
        "sample_000_a_red_circle_moves_left_on_a_blue_backgr.mp4",  # the first 40 characters
        "sample_001_a_yellow_square_moves_up.mp4",
    ]
    video = frames_of(paths[0])
    assert video.shape == (5, 64, 96, 3)
    assert decord.VideoReader(str(paths[0])).get_avg_fps() == 8
    again = run_sora(*args, "--save-dir", str(tmp_path / "b"))
    assert again.returncode == 0
    # Same seed, same video (up to the last bit of CPU float sums and H.264 rounding).
    same = np.abs(frames_of(tmp_path / "b" / paths[0].name).astype(int) - video).mean()
    assert same < 0.5, same
    other = run_sora(*args, "--save-dir", str(tmp_path / "c"), "--seed", "7")
    assert other.returncode == 0
    different = np.abs(frames_of(tmp_path / "c" / paths[0].name).astype(int) - video).mean()
    assert different > 10 * max(same, 0.1), (different, same)


def test_sample_needs_prompts(debug_models, tmp_path):
    config = inference_config(tmp_path, debug_models)
    result = run_sora("sample", str(config), "--prompt-path", str(tmp_path / "none.txt"))
    assert result.returncode == 2 and "prompt file not found" in result.stderr
