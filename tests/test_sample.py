"""`sora sample` with the debug models: mp4 files of the requested size and length, the same for a seed."""

from __future__ import annotations

import re
from pathlib import Path

import decord
import numpy as np
import pytest

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
    # samples.csv names every video with its prompt, as an input table does (path,text).
    table = (tmp_path / "a" / "samples.csv").read_text().splitlines()
    assert table == ["path,text", f"{paths[0].name},{prompts[1]}", f"{paths[1].name},{prompts[3]}"]
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


# --------------------------------------------------------------------------- long video and conditioning


def reference_media(folder: Path) -> tuple[Path, Path]:
    """A 200x300 PNG (a yellow disc on blue) and a 12-frame mp4 of a moving bar."""
    from PIL import Image, ImageDraw

    from pipelines.media import write_mp4

    image_path = folder / "still.png"
    image = Image.new("RGB", (300, 200), (20, 40, 200))
    ImageDraw.Draw(image).ellipse((100, 50, 200, 150), fill=(250, 220, 0))
    image.save(image_path)
    frames = np.zeros((12, 96, 128, 3), np.uint8)
    for index in range(12):
        frames[index, :, 8 * index : 8 * index + 16] = (200, 30, 30)
    video_path = folder / "bar.mp4"
    write_mp4(frames, video_path, 8)
    return image_path, video_path


def load_inference(folder: Path, models: dict[str, Path], overrides: dict):
    from pipelines.config import load_config

    return load_config(inference_config(folder, models), "inference", overrides)


def test_long_video_frame_count_follows_the_formula(debug_models, tmp_path):
    image, video = reference_media(tmp_path)
    config = inference_config(tmp_path, debug_models)
    result = run_sora(
        "sample", str(config), "--prompt", "a yellow disc", "--prompt", "a red bar moves right",
        "--num-frames", "5", "--image-size", "64", "64", "--num-sampling-steps", "2",
        "--loop", "3", "--condition-frame-length", "2", "--batch-size", "2",
        "--reference-path", str(image), "--reference-path", f"{video};{image}",
        "--mask-strategy", "0,0,0,1,0", "--mask-strategy", "0,0,4,3,0;1,2,0,1,-1,0.5",
        "--save-dir", str(tmp_path / "long"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    disc, bar = (frames_of(Path(path)).astype(float) for path in result.stdout.split())
    assert disc.shape == bar.shape == (3 * (5 - 2) + 2, 64, 64, 3)
    # The frames the tuples hold are their references after the VAE round trip (and H.264): the first
    # video opens with the image (about 14 levels from it; other frames about 34), the second with the
    # bar's frames 4, 5 and 6 (each nearest its own frame of the bar, about 14; the others 25 or more).
    from sora_model.vae import VideoAutoencoderKL

    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]))
    expected = round_trip(vae, image, 64, 64)
    distances = [np.abs(frame - expected).mean() for frame in disc]
    assert distances[0] < 0.6 * min(distances[1:]), distances
    bar_frames = round_trips(vae, video, range(12), 64, 64)
    for index in range(3):
        distances = [np.abs(bar[index] - frame).mean() for frame in bar_frames]
        assert np.argmin(distances) == 4 + index and min(distances) < 0.7 * sorted(distances)[1], distances


def round_trips(vae, media: Path, indices, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) in 0..255: frames of an image or video fitted to the size, VAE-encoded (posterior mean), decoded."""
    import torch

    from pipelines.media import read_frames, resize_crop

    pixels = resize_crop(read_frames(media, np.array(indices)), height, width)[None]  # (1, 3, F, H, W)
    with torch.no_grad():
        decoded = vae.decode(vae.encode_moments(pixels)[0])
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 3, 0).numpy()


def round_trip(vae, image: Path, height: int, width: int) -> np.ndarray:
    """(H, W, 3) in 0..255: the image fitted to the size, VAE-encoded (posterior mean) and decoded."""
    return round_trips(vae, image, [0], height, width)[0]


def test_image_to_video_starts_from_the_reference(debug_models, tmp_path):
    """The conditioned first frame is the reference after the VAE round trip; unconditioned it is not."""
    from pipelines.sample import Sampler, prepare_prompts

    image, _ = reference_media(tmp_path)
    sizes = {"num_frames": 4, "image_size": (64, 96), "scheduler.num_sampling_steps": 3, "prompt": ["a disc"]}
    plain = load_inference(tmp_path, debug_models, sizes)
    conditioned = load_inference(
        tmp_path, debug_models, {**sizes, "reference_path": [str(image)], "mask_strategy": ["0,0,0,1,0"]}
    )
    sampler = Sampler(plain)
    with_image = sampler.generate(prepare_prompts(conditioned), conditioned)[0].astype(float)  # (T, H, W, 3)
    without = sampler.generate(prepare_prompts(plain), plain)[0].astype(float)
    expected = round_trip(sampler.vae, image, 64, 96)
    assert np.abs(with_image[0] - expected).mean() < 0.5
    assert np.abs(without[0] - expected).mean() > 10
    # The later frames are generated, not copies of the reference.
    assert np.abs(with_image[-1] - expected).mean() > 10


def test_conditioned_mp4_from_the_cli_starts_near_the_reference(debug_models, tmp_path):
    image, _ = reference_media(tmp_path)
    config = inference_config(tmp_path, debug_models)
    common = ["sample", str(config), "--prompt", "a disc", "--num-frames", "4", "--image-size", "64", "96",
              "--num-sampling-steps", "3"]  # fmt: skip
    plain = run_sora(*common, "--save-dir", str(tmp_path / "plain"))
    conditioned = run_sora(
        *common, "--reference-path", str(image), "--mask-strategy", "0,0,0,1,0", "--save-dir", str(tmp_path / "cond")
    )
    assert plain.returncode == 0 and conditioned.returncode == 0, conditioned.stderr[-3000:]
    first_plain = frames_of(Path(plain.stdout.split()[0]))[0].astype(float)
    first_cond = frames_of(Path(conditioned.stdout.split()[0]))[0].astype(float)
    second_cond = frames_of(Path(conditioned.stdout.split()[0]))[1].astype(float)
    # H.264 blurs the debug VAE's noisy texture (about 11 levels of 255), so compare with margins.
    from sora_model.vae import VideoAutoencoderKL

    expected = round_trip(VideoAutoencoderKL.from_pretrained(str(debug_models["vae"])), image, 64, 96)
    near = np.abs(first_cond - expected).mean()
    assert near < 0.5 * np.abs(first_plain - expected).mean()
    assert near < 0.5 * np.abs(second_cond - expected).mean()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask-strategy", "0,0,0,1"], 'mask_strategy[0]: tuple 0 "0,0,0,1": 4 numbers; expected 5 or 6'),
        (["--mask-strategy", "0,0,0,1,0;2,0,0,1,-1"], 'tuple 1 "2,0,0,1,-1": ref_index 2 is out of range'),
        (["--mask-strategy", "0,0,0,1,0,2"], "edit_ratio must be between 0 and 1, got 2"),
        (["--mask-strategy", "0,0,0,2,0"], "needs 2 frames, reference 0 has an image (1 frame)"),
        (["--mask-strategy", "0,1,0,1,0"], "loop_index 1 is out of range: loop is 1"),
    ],
)
def test_bad_strategies_fail_before_sampling(debug_models, tmp_path, args, message):
    from pipelines.config import ConfigError
    from pipelines.sample import prepare_prompts

    image, _ = reference_media(tmp_path)
    overrides = {"prompt": ["a disc"], "reference_path": [str(image)], "mask_strategy": [args[1]]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare_prompts(load_inference(tmp_path, debug_models, overrides))


def test_the_seeds_long_video_example_is_accepted(debug_models, tmp_path, capsys):
    """reference_path "one.png;two.mp4" with "0,0,0,1,0;0,0,0,1,-1": two.mp4 is never used, so never read."""
    from pipelines.sample import prepare_prompts

    image, video = reference_media(tmp_path)
    one, two = tmp_path / "one.png", tmp_path / "two.mp4"
    image.rename(one)
    video.rename(two)
    overrides = {"prompt": ["a"], "loop": 10, "condition_frame_length": 4, "num_frames": 16,
                 "reference_path": [f"{one};{two}"], "mask_strategy": ["0,0,0,1,0;0,0,0,1,-1"]}  # fmt: skip
    (item,) = prepare_prompts(load_inference(tmp_path, debug_models, overrides))
    assert item.references[1] is None and item.frames == ((0,), ())
    assert "mask_strategy[0] uses no frame of reference_path[0] entry 1" in capsys.readouterr().err


def test_only_the_frames_the_tuples_take_are_decoded(debug_models, tmp_path):
    from pipelines.sample import prepare_prompts

    _, video = reference_media(tmp_path)  # 12 frames
    overrides = {"prompt": ["a"], "loop": 2, "image_size": (64, 64),
                 "reference_path": [str(video)], "mask_strategy": ["0,0,0,1,0;0,1,11,1,-1"]}  # fmt: skip
    (item,) = prepare_prompts(load_inference(tmp_path, debug_models, overrides))
    assert item.frames == ((0, 11),) and item.references[0].shape == (3, 2, 64, 64)
    # They are frames 0 and 11 of the clip (the bar at the left, then at the right), fitted to 64x64.
    import torch

    from pipelines.media import resize_crop

    expected = resize_crop(frames_of(video)[[0, 11]], 64, 64)
    torch.testing.assert_close(item.references[0], expected, rtol=0, atol=1e-6)


def black_png(path: Path, width: int, height: int, pixels: bool = True) -> Path:
    """A grey-scale PNG of zeros: a few KiB on disk for any size (a decompression bomb's trick).
    Without `pixels` only the header is there."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    rows = zlib.compress(bytes(height * (width + 1))) if pixels else b""  # a filter byte, then the row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + (chunk(b"IDAT", rows) if pixels else b"") + chunk(b"IEND", b""))
    return path


def test_oversized_and_bomb_references_are_refused_by_name(debug_models, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.sample import prepare_item

    config = load_inference(tmp_path, debug_models, {"prompt": ["a"]})
    big = black_png(tmp_path / "big.png", 5000, 5000)
    with pytest.raises(ConfigError, match=re.escape("reference[0]: 5000x5000 pixels; the limit is 16777216")):
        prepare_item("a", [big], "0,0,0,1,0", config, ["reference[0]"], max_pixels=4096 * 4096)
    bomb = black_png(tmp_path / "bomb.png", 30000, 30000, pixels=False)  # over PIL's own bomb limit
    with pytest.raises(ConfigError, match=re.escape("reference[0]: not a readable image")):
        prepare_item("a", [bomb], "0,0,0,1,0", config, ["reference[0]"])


def test_a_url_reference_is_named_as_such(debug_models, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.sample import prepare_prompts

    url = "https://cdn.openai.com/tmp/s/interp/d0.mp4"  # as in Open-Sora 1.1's sample-ref.py
    overrides = {"prompt": ["a"], "reference_path": [url], "mask_strategy": ["0,0,0,1,0"]}
    with pytest.raises(ConfigError, match=re.escape(f"reference_path[0] entry 0 ({url}): a URL; download the file")):
        prepare_prompts(load_inference(tmp_path, debug_models, overrides))


def test_missing_reference_file_fails_before_any_model_loads(debug_models, tmp_path):
    config = inference_config(tmp_path, debug_models)
    missing = tmp_path / "nowhere.png"
    result = run_sora(
        "sample", str(config), "--prompt", "a", "--prompt", "b", "--reference-path", "",
        "--reference-path", str(missing), "--mask-strategy", "", "--mask-strategy", "0,0,0,1,0",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"reference_path[1] entry 0 ({missing}): file not found" in result.stderr
    assert "sampling" not in result.stderr and "Loading weights" not in result.stderr


def test_conditioning_needs_the_iddpm_scheduler(debug_models, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.sample import prepare_prompts

    overrides = {"prompt": ["a"], "loop": 2, "scheduler.type": "dpm-solver"}
    with pytest.raises(ConfigError, match="loop: scheduler 'dpm-solver' cannot condition on frames"):
        prepare_prompts(load_inference(tmp_path, debug_models, overrides))


def test_mp4_bytes_are_the_same_for_the_same_frames():
    """Encoding in fresh threads (as the Serve ingress does) gives identical files."""
    import threading

    from pipelines.media import encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 96, 3), dtype=np.uint8)  # noise: the hard case
    results: list[bytes] = []
    for _ in range(12):
        thread = threading.Thread(target=lambda: results.append(encode_mp4(frames, 8)))
        thread.start()
        thread.join()
    assert len(results) == 12 and len(set(results)) == 1
    # And the bytes are a video of those frames: H.264 keeps noise's brightness pattern (chroma barely).
    import io

    import av

    with av.open(io.BytesIO(results[0])) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert decoded.shape == frames.shape
    for got, sent in zip(decoded.mean(axis=-1), frames.mean(axis=-1), strict=True):
        assert np.corrcoef(got.ravel(), sent.ravel())[0, 1] > 0.7  # about 0.89; another frame's: about 0


def test_half_precision_on_cpu_says_it_computes_in_fp32(debug_models, tmp_path):
    import torch

    from pipelines.sample import Sampler
    from sora_model.layers import warn_once

    config = load_inference(tmp_path, debug_models, {"dtype": "bf16", "num_frames": 2, "image_size": (32, 32)})
    warn_once.cache_clear()
    with pytest.warns(UserWarning, match="dtype 'bf16' needs CUDA: sampling on cpu computes in fp32"):
        sampler = Sampler(config, device="cpu")
    assert next(sampler.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("num_frames", "expected_fps"), [(4, 24.0), (1, 120.0)])
def test_stdit2_is_conditioned_on_open_soras_sampling_values(debug_models, tmp_path, num_frames, expected_fps):
    """Open-Sora 1.1's scripts/inference.py: ar = height / width, fps = the config's fps (not
    fps // frame_interval), IMG_FPS = 120 for a single frame; height and width of image_size."""
    from pipelines.sample import Sampler, prepare_prompts

    overrides = {"num_frames": num_frames, "image_size": (48, 80), "fps": 24, "frame_interval": 3,
                 "scheduler.num_sampling_steps": 2, "prompt": ["a disc"]}  # fmt: skip
    config = load_inference(tmp_path, debug_models, overrides)
    sampler = Sampler(config)
    seen = []
    forward = sampler.model.forward
    sampler.model.forward = lambda *args, **sizes: seen.append(sizes) or forward(*args, **sizes)
    sampler.generate(prepare_prompts(config), config)
    assert seen
    for sizes in seen:
        assert sizes["height"].tolist() == [48.0, 48.0] and sizes["width"].tolist() == [80.0, 80.0]
        assert sizes["ar"].tolist() == pytest.approx([48 / 80] * 2)
        assert sizes["fps"].tolist() == [expected_fps] * 2
        assert sizes["num_frames"].tolist() == [float(num_frames)] * 2


def test_progress_reports_every_step_of_every_clip_and_can_stop_sampling(debug_models, tmp_path):
    from pipelines.sample import Sampler, prepare_item

    settings = {"num_frames": 5, "image_size": (32, 32), "loop": 2, "condition_frame_length": 1,
                "scheduler.num_sampling_steps": 3}  # fmt: skip
    config = load_inference(tmp_path, debug_models, settings)
    sampler = Sampler(config)
    item = prepare_item("a red bar", [], None, config, [])
    seen = []
    sampler.generate([item], progress=seen.append)
    assert [(p.clip, p.step, p.done, p.total) for p in seen] == [
        (1, 1, 1, 6), (1, 2, 2, 6), (1, 3, 3, 6), (2, 1, 4, 6), (2, 2, 5, 6), (2, 3, 6, 6)
    ]  # fmt: skip

    class Stop(Exception):
        pass

    def stop_after_two(progress) -> None:
        if progress.done == 2:
            raise Stop  # what serving does for a cancelled request

    calls = []
    sampler.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(Stop):
        sampler.generate([item], progress=stop_after_two)
    assert len(calls) == 2, "no model call after the step that raised"
