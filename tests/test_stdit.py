"""STDiT, STDiT2 and DiT: checkpoint names and shapes, forward values, masks, kernels, a tiny training run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file

from sora_model.checkpoint import load_weights, read_state_dict
from sora_model.diffusion import IDDPM
from sora_model.dit import DiT
from sora_model.errors import ModelLoadError
from sora_model.layers import RotaryEmbedding, sincos_embedding, timestep_embedding, warn_once
from sora_model.sizes import Family, ModelSize
from sora_model.stdit import STDiT, STDiT2, build_model

C = 1152
# Written from Open-Sora's source (stdit.py / stdit2.py / layers/blocks.py): name -> shape.
STDIT_TOP = {
    "pos_embed": (1, 256, C),
    "pos_embed_temporal": (1, 16, C),
    "x_embedder.proj.weight": (C, 4, 1, 2, 2),
    "x_embedder.proj.bias": (C,),
    "t_embedder.mlp.0.weight": (C, 256),
    "t_embedder.mlp.0.bias": (C,),
    "t_embedder.mlp.2.weight": (C, C),
    "t_embedder.mlp.2.bias": (C,),
    "t_block.1.weight": (6 * C, C),
    "t_block.1.bias": (6 * C,),
    "y_embedder.y_embedding": (120, 4096),
    "y_embedder.y_proj.fc1.weight": (C, 4096),
    "y_embedder.y_proj.fc1.bias": (C,),
    "y_embedder.y_proj.fc2.weight": (C, C),
    "y_embedder.y_proj.fc2.bias": (C,),
    "final_layer.scale_shift_table": (2, C),
    "final_layer.linear.weight": (32, C),
    "final_layer.linear.bias": (32,),
}
STDIT_BLOCK = {
    "scale_shift_table": (6, C),
    "attn.qkv.weight": (3 * C, C),
    "attn.qkv.bias": (3 * C,),
    "attn.proj.weight": (C, C),
    "attn.proj.bias": (C,),
    "cross_attn.q_linear.weight": (C, C),
    "cross_attn.q_linear.bias": (C,),
    "cross_attn.kv_linear.weight": (2 * C, C),
    "cross_attn.kv_linear.bias": (2 * C,),
    "cross_attn.proj.weight": (C, C),
    "cross_attn.proj.bias": (C,),
    "mlp.fc1.weight": (4 * C, C),
    "mlp.fc1.bias": (4 * C,),
    "mlp.fc2.weight": (C, 4 * C),
    "mlp.fc2.bias": (C,),
    "attn_temp.qkv.weight": (3 * C, C),
    "attn_temp.qkv.bias": (3 * C,),
    "attn_temp.proj.weight": (C, C),
    "attn_temp.proj.bias": (C,),
}
STDIT2_TOP = {
    **{k: v for k, v in STDIT_TOP.items() if not k.startswith("pos_embed")},
    "y_embedder.y_embedding": (200, 4096),
    "t_block_temp.1.weight": (3 * C, C),
    "t_block_temp.1.bias": (3 * C,),
    "rope.freqs": (36,),
    **{
        f"{name}_embedder.mlp.0.weight": (dim, 256)
        for name, dim in (("csize", 384), ("ar", 384), ("fl", C), ("fps", C))
    },
    **{f"{name}_embedder.mlp.0.bias": (dim,) for name, dim in (("csize", 384), ("ar", 384), ("fl", C), ("fps", C))},
    **{
        f"{name}_embedder.mlp.2.weight": (dim, dim)
        for name, dim in (("csize", 384), ("ar", 384), ("fl", C), ("fps", C))
    },
    **{f"{name}_embedder.mlp.2.bias": (dim,) for name, dim in (("csize", 384), ("ar", 384), ("fl", C), ("fps", C))},
}
STDIT2_BLOCK = {
    **STDIT_BLOCK,
    "attn.q_norm.weight": (72,),
    "attn.k_norm.weight": (72,),
    "attn_temp.q_norm.weight": (72,),
    "attn_temp.k_norm.weight": (72,),
    "scale_shift_table_temporal": (3, C),
}


def expected(top: dict, block: dict) -> dict[str, tuple[int, ...]]:
    return {**top, **{f"blocks.{i}.{k}": v for i in range(28) for k, v in block.items()}}


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_stdit_xl2_names_and_shapes_equal_open_sora():
    with torch.device("meta"):
        model = build_model("STDiT-XL/2", 4096, 120, input_size=(16, 32, 32))
    assert shapes(model) == expected(STDIT_TOP, STDIT_BLOCK)


def test_stdit2_xl2_names_and_shapes_equal_open_sora():
    with torch.device("meta"):
        model = build_model("STDiT2-XL/2", 4096, 200, qk_norm=True)
    assert shapes(model) == expected(STDIT2_TOP, STDIT2_BLOCK)


# --------------------------------------------------------------------------- the debug size

DEBUG_TEXT = 64


def debug_stdit2(**options) -> STDiT2:
    torch.manual_seed(0)
    return build_model("debug", DEBUG_TEXT, 16, qk_norm=True, input_sq_size=64, **options)


def visible(model: torch.nn.Module, *modules: torch.nn.Module) -> torch.nn.Module:
    """Random values for the zero-initialised final layer (and all of `modules`), so outputs show something."""
    generator = torch.Generator().manual_seed(1)
    for module in (model.final_layer, *modules):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    return model


def conditioning(batch: int, height=136, width=240, frames=5, fps=8.0) -> dict[str, torch.Tensor]:
    full = lambda value: torch.full((batch,), float(value))  # noqa: E731
    sizes = {"height": full(height), "width": full(width), "num_frames": full(frames), "fps": full(fps)}
    return sizes | {"ar": full(height / width)}  # sampling's aspect ratio


def caption(batch: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randn(batch, length, DEBUG_TEXT)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length - 3 :] = False
    return y, mask


def test_stdit2_any_size_in_and_out():
    model = visible(debug_stdit2().eval())
    x = torch.randn(2, 4, 5, 17, 30)  # odd latent height: padded to the patch, cropped back
    y, mask = caption(2)
    t = torch.tensor([10, 500])
    out = model(x, t, y, mask, **conditioning(2))
    assert out.shape == (2, 8, 5, 17, 30) and out.dtype == torch.float32
    # The padding is zeros: padding by hand and cropping the output gives the same values.
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1))  # latent height 17 -> 18
    torch.testing.assert_close(out, model(padded, t, y, mask, **conditioning(2))[:, :, :, :17])
    # Each sample is its own: the second alone gives the same output.
    torch.testing.assert_close(out[1:], model(x[1:], t[1:], y[1:], mask[1:], **conditioning(1)))


def test_condition_frames_get_the_timestep_zero_modulation():
    model = debug_stdit2().eval()
    visible(model, model.blocks[0])
    x = torch.randn(1, 4, 4, 8, 8)
    y, mask = caption(1)
    t = torch.tensor([600])
    plain = model(x, t, y, mask, **conditioning(1, 64, 64, 4))
    all_true = model(x, t, y, mask, torch.ones(1, 4, dtype=torch.bool), **conditioning(1, 64, 64, 4))
    torch.testing.assert_close(plain, all_true)  # nothing conditioned: the same as no mask
    first_frozen = torch.tensor([[False, True, True, True]])
    masked = model(x, t, y, mask, first_frozen, **conditioning(1, 64, 64, 4))
    assert not torch.allclose(masked[:, :, 0], plain[:, :, 0])
    # In a block, a condition frame is modulated as at timestep 0: with every frame a condition
    # frame, a block given the modulations of t and of t0 computes what it computes given t0's alone.
    block, dim = model.blocks[0], model.size.hidden_size
    tokens, caption_states = torch.randn(1, 4 * 16, dim), model.y_embedder(y)  # 4 frames of 4 x 4 patches
    t_modulation, t_temporal, t0_modulation, t0_temporal = (torch.randn(1, k * dim) for k in (6, 3, 6, 3))
    all_frozen = torch.zeros(1, 4, dtype=torch.bool)
    frozen = block(tokens, caption_states, mask, t_modulation, t_temporal, 4, model.rope, all_frozen,
                   t0_modulation, t0_temporal)  # fmt: skip
    at_zero = block(tokens, caption_states, mask, t0_modulation, t0_temporal, 4, model.rope)
    torch.testing.assert_close(frozen, at_zero)
    assert not torch.allclose(frozen, block(tokens, caption_states, mask, t_modulation, t_temporal, 4, model.rope))
    # The final layer leaves the generated frames as they are and modulates the condition frame again.
    t_emb, t0_emb = torch.randn(1, dim), torch.randn(1, dim)
    final_plain = model.final_layer(tokens, t_emb)
    final_masked = model.final_layer(tokens, t_emb, first_frozen, t0_emb, 4)
    torch.testing.assert_close(final_masked[:, 16:], final_plain[:, 16:])
    assert not torch.allclose(final_masked[:, :16], final_plain[:, :16])


def test_padding_tokens_of_a_caption_do_not_matter():
    model = debug_stdit2().eval()
    x = torch.randn(1, 4, 2, 8, 8)
    y, _ = caption(1, 7)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    other = y.clone()
    other[:, 4:] = torch.randn(1, 3, DEBUG_TEXT) * 10
    a = model(x, torch.tensor([100]), y, mask, **conditioning(1, 64, 64, 2))
    b = model(x, torch.tensor([100]), other, mask, **conditioning(1, 64, 64, 2))
    torch.testing.assert_close(a, b)


def test_caption_dropout_and_null_caption_belong_to_the_model():
    model = debug_stdit2(class_dropout_prob=1.0)
    y, _ = caption(2)
    null = model.null_caption(2, y.shape[1])
    assert null.shape == y.shape
    model.train()
    dropped = model.y_embedder(y)
    model.eval()
    torch.testing.assert_close(dropped, model.y_embedder(null))
    assert not torch.allclose(model.y_embedder(y), dropped)


def test_flash_attention_request_falls_back_with_one_warning():
    model = visible(debug_stdit2(enable_flashattn=True).eval())
    reference = visible(debug_stdit2().eval())
    x = torch.randn(1, 4, 2, 8, 8)
    y, mask = caption(1)
    warn_once.cache_clear()  # an earlier test may have given the warning already
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = model(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
        model(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
    b = reference(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
    torch.testing.assert_close(a, b)
    assert len([w for w in caught if "flash-attn" in str(w.message)]) == 1  # once, not on every call


def test_rope_depends_on_relative_position_only():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    rq, rk = rope(q.contiguous()), rope(k.contiguous())
    scores = rq[0, 0] @ rk[0, 0].T  # (6, 6)
    torch.testing.assert_close(scores[0, 2], scores[3, 5])
    torch.testing.assert_close(scores[1, 1], (q[0, 0, 0] * k[0, 0, 0]).sum())


def test_stdit_v1_scales_act_on_the_position_embeddings():
    size = ModelSize(Family.STDIT, depth=1, hidden_size=24, num_heads=2)
    options = {"input_size": (4, 8, 8), "caption_channels": 8, "model_max_length": 4}
    base = STDiT(size, **options)
    # Positions are divided by the scales: patch (h=0, w=1) sits at w = 2, frame 1 at 1.5.
    scaled = STDiT(size, **options, space_scale=0.5, time_scale=2 / 3)
    # pos_embed (1, 4*4, 24): row 1 is (h=0, w=1), its first 12 channels embed w (6 sines, 6 cosines)
    np.testing.assert_allclose(scaled.pos_embed[0, 1, [0, 6]], [math.sin(2.0), math.cos(2.0)], rtol=1e-6)
    np.testing.assert_allclose(base.pos_embed[0, 1, [0, 6]], [math.sin(1.0), math.cos(1.0)], rtol=1e-6)
    np.testing.assert_allclose(scaled.pos_embed_temporal[0, 1, [0, 12]], [math.sin(1.5), math.cos(1.5)], rtol=1e-6)
    # and the forward reads them: with the same weights, each scale changes the output.
    generator = torch.Generator().manual_seed(0)
    for parameter in base.parameters():
        torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    weights = {k: v for k, v in base.state_dict().items() if not k.startswith("pos_embed")}
    x, t, y = torch.randn(1, 4, 4, 8, 8), torch.tensor([3]), torch.randn(1, 3, 8)
    out = base.eval()(x, t, y)
    assert out.shape == (1, 8, 4, 8, 8)
    for scales in ({"space_scale": 0.5}, {"time_scale": 2 / 3}):
        other = STDiT(size, **options, **scales)
        other.load_state_dict(weights, strict=False)
        assert not torch.allclose(other.eval()(x, t, y), out), scales


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", "folder"])
def test_weights_round_trip_strictly(tmp_path: Path, suffix: str):
    source = debug_stdit2()
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        path = tmp_path / "weights.pth"
        torch.save({"model": state}, path)  # a wrapped checkpoint, as trainers write them
    elif suffix == ".safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "checkpoint"
        path.mkdir()
        save_file(state, path / "ema.safetensors")
    torch.manual_seed(123)
    target = build_model("debug", DEBUG_TEXT, 16, qk_norm=True, input_sq_size=64)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_wrong_model_type_is_a_clear_error(tmp_path: Path):
    save_file({k: v.contiguous() for k, v in debug_stdit2().state_dict().items()}, tmp_path / "w.safetensors")
    other = build_model("debug", DEBUG_TEXT, 16, qk_norm=False, input_sq_size=64)
    with pytest.raises(ModelLoadError, match=r"does not fit this model: unexpected .*q_norm.*is model.type right"):
        load_weights(other, tmp_path / "w.safetensors")


def test_pickled_code_in_a_pth_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object()}, path)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_missing_checkpoint_is_named(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"checkpoint not found: .*nope\.pth"):
        read_state_dict(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- it learns


def test_debug_model_learns_a_fixed_batch_in_seconds():
    torch.manual_seed(0)
    model = debug_stdit2().train()
    scheduler = IDDPM(num_sampling_steps=5)
    x0 = torch.randn(2, 4, 3, 8, 8)
    y, mask = caption(2)
    extra = conditioning(2, 64, 64, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        t = torch.randint(0, scheduler.num_timesteps, (2,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        fn = lambda xt, ts, xm: model(xt, ts, y, mask, xm, **extra)  # noqa: E731
        loss = scheduler.training_losses(fn, x0, t, noise)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


# --------------------------------------------------------------------------- small references


def test_position_embeddings_against_the_formula():
    table = sincos_embedding(8, (2, 3))  # (h*w, 8), row-major: token (h=1, w=2) is row 5
    w, h = 2.0, 1.0
    expected_row = [
        *[math.sin(w), math.sin(w / 100), math.cos(w), math.cos(w / 100)],  # first half: the w coordinate
        *[math.sin(h), math.sin(h / 100), math.cos(h), math.cos(h / 100)],
    ]
    np.testing.assert_allclose(table[5], expected_row, rtol=1e-6)
    stretched = sincos_embedding(8, (2, 3), scale=0.5, base_size=4)  # coordinates / scale x base_size / size
    u = w / 0.5 * 4 / 3  # the w coordinate, divided by the scale, stretched by base_size / width
    np.testing.assert_allclose(
        stretched[5][:4], [math.sin(u), math.sin(u / 100), math.cos(u), math.cos(u / 100)], rtol=1e-5
    )
    frames = sincos_embedding(4, (3,), scale=2 / 3)  # (t, 4): frame 2 sits at 2 / (2/3) = 3
    np.testing.assert_allclose(frames[2], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)], rtol=1e-6)


def test_timestep_embedding_against_the_formula():
    emb = timestep_embedding(torch.tensor([3.0]), dim=4)  # half = 2: frequencies 1 and 1/100
    np.testing.assert_allclose(emb[0].numpy(), [math.cos(3), math.cos(0.03), math.sin(3), math.sin(0.03)], rtol=1e-6)


def test_unpatchify_inverts_patchify():
    model = debug_stdit2()
    x = torch.randn(2, 8, 3, 6, 10)
    tokens = rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (ph pw c)", ph=2, pw=2)  # patch (1, 2, 2)
    torch.testing.assert_close(model.unpatchify(tokens, 3, 3, 5), x)


def test_guidance_scale_one_is_the_conditional_prediction():
    from sora_model.diffusion import classifier_free_guidance

    model = visible(debug_stdit2().eval())
    x = torch.randn(1, 4, 2, 8, 8)
    y, mask = caption(1)
    t = torch.tensor([400])
    extra = conditioning(2, 64, 64, 2)
    both = lambda xt, ts, xm: model(xt, ts, torch.cat([y, model.null_caption(1, 7)]), mask, xm, **extra)  # noqa: E731
    guided = classifier_free_guidance(both, cfg_scale=1.0, cfg_channel=None)(x, t, None)
    conditional = model(x, t, y, mask, **conditioning(1, 64, 64, 2))
    torch.testing.assert_close(guided, conditional, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["iddpm", "dpm-solver"])
def test_sampling_the_debug_model_returns_the_requested_shape(kind):
    from sora_model.diffusion import build_scheduler

    model = visible(debug_stdit2().eval())
    y, mask = caption(1)
    scheduler = build_scheduler(kind, num_sampling_steps=3, cfg_scale=4.0)
    extra = conditioning(2, 64, 96, 3)
    both = lambda xt, ts, xm: model(xt, ts, torch.cat([y, model.null_caption(1, 7)]), mask, xm, **extra)  # noqa: E731
    noise = torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    first = scheduler.sample(both, noise, generator=torch.Generator().manual_seed(1))
    again = scheduler.sample(both, noise, generator=torch.Generator().manual_seed(1))
    assert first.shape == (1, 4, 3, 8, 12) and torch.isfinite(first).all()
    torch.testing.assert_close(first, again)  # deterministic for a seed


def test_dit_forward_and_names():
    model = DiT(ModelSize(Family.DIT, 2, 48, 4), input_size=(3, 8, 8), caption_channels=16, model_max_length=5).eval()
    x, t, y = torch.randn(2, 4, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 3 + [False] * 2])
    out = model(x, t, y, mask.repeat(2, 1))
    assert out.shape == (2, 8, 3, 8, 8)
    assert not out.any()  # adaLN-zero: the untrained model predicts exactly zero
    assert "blocks.0.adaLN_modulation.1.weight" in model.state_dict()
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    out = model(x, t, y, mask.repeat(2, 1))
    # The caption is pooled over its real tokens: its padding does not matter ...
    other = y.clone()
    other[:, 3:] = torch.randn(2, 2, 16) * 10
    torch.testing.assert_close(model(x, t, other, mask.repeat(2, 1)), out)
    assert not torch.allclose(model(x, t, other), model(x, t, y))  # ... unless there is no mask
    torch.testing.assert_close(model(x, t, y, mask), out)  # one mask for a guidance batch: repeated
    with pytest.raises(ValueError, match="no frame conditioning"):
        model(torch.randn(1, 4, 3, 8, 8), torch.tensor([1]), torch.randn(1, 5, 16), x_mask=torch.ones(1, 3, dtype=bool))


def test_layernorm_kernel_request_is_an_option_not_a_crash():
    warn_once.cache_clear()  # an earlier test may have given the warning already
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("debug", DEBUG_TEXT, 16, input_sq_size=64, enable_layernorm_kernel=True)
        build_model("debug", DEBUG_TEXT, 16, input_sq_size=64, enable_layernorm_kernel=True)
    assert isinstance(model, STDiT2)
    assert len([w for w in caught if "layer_norm" in str(w.message)]) == 1  # once, not for every model


def test_stdit_v1_recomputes_the_position_embedding_for_another_grid():
    """A latent of another grid gets its own sin-cos table, even with as many tokens as the trained one."""
    size = ModelSize(Family.STDIT, 1, 24, 2)
    square = STDiT(size, input_size=(2, 32, 32), caption_channels=8, model_max_length=4)  # 16 x 16 patches
    generator = torch.Generator().manual_seed(0)
    for parameter in square.parameters():
        torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    wide = STDiT(size, input_size=(2, 16, 64), caption_channels=8, model_max_length=4)  # 8 x 32 patches
    wide.load_state_dict({k: v for k, v in square.state_dict().items() if not k.startswith("pos_embed")}, strict=False)
    assert not torch.allclose(square.pos_embed, wide.pos_embed)  # both (1, 256, 24)
    x, t, y = torch.randn(1, 4, 2, 16, 64), torch.tensor([3]), torch.randn(1, 3, 8)  # an 8 x 32 grid
    torch.testing.assert_close(square.eval()(x, t, y), wide.eval()(x, t, y))


def test_stdit_always_adds_the_temporal_position_embedding_as_open_sora(monkeypatch):
    """Open-Sora 1.0's STDiT takes `no_temporal_pos_emb` and ignores it: block 0 always gets the
    temporal embedding. Here the flag is refused by STDiT, and the config's is ignored with a warning."""
    from pipelines.config import ModelConfig
    from pipelines.models import load_model

    with pytest.raises(TypeError):
        STDiT(ModelSize(Family.STDIT, 1, 24, 2), no_temporal_pos_emb=True)
    model = STDiT(ModelSize(Family.STDIT, 2, 24, 2), input_size=(3, 8, 8), caption_channels=8, model_max_length=4)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():  # the final layer starts at zero: give every weight a value
        torch.nn.init.normal_(parameter, std=0.1, generator=generator)
    model.eval()
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([500]), y)
        model.pos_embed_temporal.zero_()  # without the temporal embedding the output differs
        assert not torch.allclose(model(x, torch.tensor([500]), y), out)
    from sora_model.sizes import MODEL_SIZES

    monkeypatch.setitem(MODEL_SIZES, "tiny-stdit", ModelSize(Family.STDIT, 1, 24, 2))
    warn_once.cache_clear()
    with pytest.warns(UserWarning, match="no_temporal_pos_emb=True is ignored by tiny-stdit, as Open-Sora's STDiT"):
        load_model(ModelConfig(type="tiny-stdit", no_temporal_pos_emb=True), 8, 4, (1, 4, 4))
