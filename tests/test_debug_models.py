"""The tiny T5 and VAE: written with save_pretrained, loaded through the real from_pretrained path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sora_model.debug import DEBUG_TEXT_DIM, SD_VAE_SCALING_FACTOR, write_debug_models
from sora_model.errors import ModelLoadError
from sora_model.text_encoder import T5Encoder
from sora_model.vae import VideoAutoencoderKL

VERSION_STAMPS = ("transformers_version", "_diffusers_version")  # the writing library's version, not the model


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file; JSON files without the library version they were written with."""
    found = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            values = json.loads(data)
            if isinstance(values, dict):
                values = {key: value for key, value in values.items() if key not in VERSION_STAMPS}
            data = json.dumps(values, sort_keys=True).encode()
        found[path.name] = hashlib.sha256(data).hexdigest()
    return found


def test_vae_has_the_sd_latent_geometry(debug_models):
    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]), micro_batch_size=2)
    assert vae.scaling_factor == pytest.approx(SD_VAE_SCALING_FACTOR)
    assert (vae.out_channels, vae.spatial_stride) == (4, 8)
    video = torch.rand(2, 3, 5, 64, 96) * 2 - 1  # (B, C, T, H, W)
    latents = vae.encode(video, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 5, 8, 12)
    assert vae.latent_size(5, 64, 96) == (5, 8, 12)
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape
    # Latent frame t of sample b is the SD VAE's own, of that frame alone (scaled): no mix-up of B and T.
    s = vae.scaling_factor
    mean, _ = vae.encode_moments(video)
    frame = vae.module.encode(video[1, :, 3][None]).latent_dist.mean[0] * s
    torch.testing.assert_close(mean[1, :, 3], frame, rtol=1e-5, atol=1e-6)
    expected = vae.module.decode(latents[1, :, 3][None] / s).sample[0]
    torch.testing.assert_close(decoded[1, :, 3], expected, rtol=1e-4, atol=1e-5)


def test_vae_frames_are_independent_of_the_micro_batch(debug_models):
    """Per-frame encoding: micro-batching must not change any latent (the cache relies on it)."""
    video = torch.rand(1, 3, 6, 32, 32) * 2 - 1
    whole = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]), micro_batch_size=None)
    chunked = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]), micro_batch_size=4)
    mean_a, logvar_a = whole.encode_moments(video)
    mean_b, logvar_b = chunked.encode_moments(video)
    torch.testing.assert_close(mean_a, mean_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar_a, logvar_b, rtol=1e-5, atol=1e-5)
    # Frame 2 alone encodes to latent frame 2 of the whole clip.
    alone, _ = whole.encode_moments(video[:, :, 2:3])
    torch.testing.assert_close(alone[:, :, 0], mean_a[:, :, 2], rtol=1e-5, atol=1e-5)


def test_vae_sample_is_mean_plus_scaled_noise(debug_models):
    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]))
    video = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    mean, logvar = vae.encode_moments(video)
    a = vae.encode(video, generator=torch.Generator().manual_seed(7))
    b = vae.encode(video, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, mean + torch.exp(0.5 * logvar) * noise)


def test_t5_encodes_captions_with_a_mask_of_real_tokens(debug_models):
    encoder = T5Encoder.from_pretrained(str(debug_models["text_encoder"]), model_max_length=16)
    assert encoder.output_dim == DEBUG_TEXT_DIM
    captions = ["a red circle moves left on a blue background", "zebra?"]
    states, mask = encoder.encode(captions)
    assert states.shape == (2, 16, DEBUG_TEXT_DIM)
    tokens = encoder.tokenizer(captions).input_ids
    assert mask.sum(dim=1).tolist() == [len(ids) for ids in tokens]
    assert tokens[0][-1] == encoder.tokenizer.eos_token_id
    # The demo vocabulary has whole words; unknown words fall back to letters, never <unk>.
    assert encoder.tokenizer.unk_token_id not in tokens[0] + tokens[1]
    assert len(tokens[0]) == 10  # nine words and </s>
    # Padding does not change the states of real tokens.
    alone, _ = encoder.encode(captions[:1])
    torch.testing.assert_close(alone[0, :10], states[0, :10], rtol=1e-4, atol=1e-5)


def test_t5_states_say_which_colour_names_the_background(debug_models):
    """A random T5 gives a colour word the same state in either role (cosine 0.997): the first
    layer's heads looking at the neighbours make the role show, as a trained T5's context does."""
    encoder = T5Encoder.from_pretrained(str(debug_models["text_encoder"]), model_max_length=16)
    captions = ["a red circle moves right on a yellow background", "a yellow circle moves right on a red background"]
    states, _ = encoder.encode(captions)  # (2, 16, D); "red" and "yellow" are tokens 1 and 7
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(states[0, 7], states[1, 1], dim=0) < 0.8  # "yellow": background against shape
    assert cosine(states[0, 1], states[1, 7], dim=0) < 0.8  # "red": shape against background
    assert cosine(states[0, 7], states[1, 7], dim=0) < 0.8  # the background slot: yellow against red


def test_the_committed_demo_t5_is_what_debug_models_writes(debug_models):
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo" / "t5"
    assert digest(demo) == digest(Path(debug_models["text_encoder"]))


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path, debug_models):
    again = write_debug_models(tmp_path / "again", seed=0)
    other = write_debug_models(tmp_path / "other", seed=1)
    for role in ("vae", "text_encoder"):
        assert digest(again[role]) == digest(debug_models[role])
        assert digest(other[role]) != digest(debug_models[role])


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"cannot load the VAE '.*nowhere'"):
        VideoAutoencoderKL.from_pretrained(str(tmp_path / "nowhere"))


def test_hub_name_offline_and_not_cached_says_what_to_do(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"DeepFloyd/t5-v1_1-xxl.*HF_HUB_OFFLINE=1.*sora debug-models"):
        T5Encoder.from_pretrained("DeepFloyd/t5-v1_1-xxl", cache_dir=str(tmp_path / "empty-cache"))


def test_vae_moments_are_the_diffusers_posterior_scaled(debug_models):
    """Latents are SD-scaled: mean x s and std x s of diffusers' own posterior (s = 0.18215)."""
    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]))
    video = torch.rand(1, 3, 3, 32, 48) * 2 - 1
    mean, logvar = vae.encode_moments(video)
    frames = video[0].permute(1, 0, 2, 3)  # (T, C, H, W)
    posterior = vae.module.encode(frames).latent_dist
    s = SD_VAE_SCALING_FACTOR
    torch.testing.assert_close(mean[0].permute(1, 0, 2, 3), posterior.mean * s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.exp(0.5 * logvar[0]).permute(1, 0, 2, 3), posterior.std * s, rtol=1e-4, atol=1e-6)
    decoded = vae.decode(mean)
    expected = vae.module.decode(posterior.mean).sample  # (T, C, H, W)
    torch.testing.assert_close(decoded[0].permute(1, 0, 2, 3), expected, rtol=1e-4, atol=1e-5)


def test_encode_many_gives_each_video_the_same_bytes_whatever_shares_its_calls(debug_models):
    """Preprocessing encodes the frames of a batch's rows together, in calls of a fixed number of
    frames: a video's latents must not depend on its neighbours, so a resumed run writes the same cache."""
    from sora_model.vae import VideoAutoencoderKL

    vae = VideoAutoencoderKL.from_pretrained(str(debug_models["vae"]))
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 5, 32, 48, generator=generator) * 2 - 1, torch.rand(3, 3, 32, 48, generator=generator) * 2 - 1
    c = torch.rand(3, 2, 48, 32, generator=generator) * 2 - 1  # another size: its own calls
    together = vae.encode_many([a, c, b], chunk=4)
    alone = [vae.encode_many([video], chunk=4)[0] for video in (a, c, b)]
    for (mean, logvar), (mean_alone, logvar_alone), video in zip(together, alone, (a, c, b), strict=True):
        assert mean.shape == (4, video.shape[1], video.shape[2] // 8, video.shape[3] // 8)
        assert torch.equal(mean, mean_alone) and torch.equal(logvar, logvar_alone)
    # Bytes on the host (what preprocessing passes) give what the same frames in [-1, 1] give.
    pixels = torch.randint(0, 256, (3, 5, 32, 48), generator=generator, dtype=torch.uint8)
    (mean_u8, _), (mean_float, _) = vae.encode_many([pixels], 4)[0], vae.encode_many([pixels.float() / 127.5 - 1], 4)[0]
    assert torch.equal(mean_u8, mean_float)
    # The same posterior as encoding each video by itself, up to rounding.
    mean, logvar = vae.encode_moments(a[None])
    torch.testing.assert_close(together[0][0], mean[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[0][1], logvar[0], rtol=1e-4, atol=1e-5)
