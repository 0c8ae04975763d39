"""STDiT and STDiT2: checkpoint names and shapes, forward shapes, masks, kernels, a tiny training run."""

from __future__ import annotations

import functools
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
from sora_model.errors import ModelLoadError
from sora_model.layers import RotaryEmbedding
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


def conditioning(batch: int, height=136, width=240, frames=5, fps=8.0) -> dict[str, torch.Tensor]:
    full = lambda value: torch.full((batch,), float(value))  # noqa: E731
    return {"height": full(height), "width": full(width), "num_frames": full(frames), "fps": full(fps)}


def caption(batch: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randn(batch, length, DEBUG_TEXT)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length - 3 :] = False
    return y, mask


def test_stdit2_any_size_in_and_out():
    model = debug_stdit2().eval()
    x = torch.randn(2, 4, 5, 17, 30)  # odd latent height: padded to the patch, cropped back
    y, mask = caption(2)
    out = model(x, torch.tensor([10, 500]), y, mask, **conditioning(2))
    assert out.shape == (2, 8, 5, 17, 30) and out.dtype == torch.float32


def test_condition_frames_get_the_timestep_zero_modulation():
    model = debug_stdit2().eval()
    for parameter in model.final_layer.parameters():  # zero-initialised: give it something to show
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(1, 4, 4, 8, 8)
    y, mask = caption(1)
    t = torch.tensor([600])
    plain = model(x, t, y, mask, **conditioning(1, 64, 64, 4))
    all_true = model(x, t, y, mask, torch.ones(1, 4, dtype=torch.bool), **conditioning(1, 64, 64, 4))
    torch.testing.assert_close(plain, all_true)  # nothing conditioned: the same as no mask
    first_frozen = torch.tensor([[False, True, True, True]])
    masked = model(x, t, y, mask, first_frozen, **conditioning(1, 64, 64, 4))
    assert not torch.allclose(masked, plain)
    at_zero = model(x, torch.tensor([0]), y, mask, **conditioning(1, 64, 64, 4))
    assert not torch.allclose(masked[:, :, 0], plain[:, :, 0])
    assert at_zero.shape == masked.shape


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
    model = debug_stdit2(enable_flashattn=True).eval()
    reference = debug_stdit2().eval()
    x = torch.randn(1, 4, 2, 8, 8)
    y, mask = caption(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = model(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
        model(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
    b = reference(x, torch.tensor([5]), y, mask, **conditioning(1, 64, 64, 2))
    torch.testing.assert_close(a, b)
    assert len([w for w in caught if "flash-attn" in str(w.message)]) <= 1


def test_rope_depends_on_relative_position_only():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    rq, rk = rope(q.contiguous()), rope(k.contiguous())
    scores = rq[0, 0] @ rk[0, 0].T  # (6, 6)
    torch.testing.assert_close(scores[0, 2], scores[3, 5])
    torch.testing.assert_close(scores[1, 1], (q[0, 0, 0] * k[0, 0, 0]).sum())


def test_stdit_v1_scales_act_on_the_position_embeddings():
    size = build_model("STDiT-XL/2", 8, 4, input_size=(4, 8, 8)).size
    base = STDiT(size.__class__(size.family, 1, 24, 2), input_size=(4, 8, 8), caption_channels=8, model_max_length=4)
    half = STDiT(size.__class__(size.family, 1, 24, 2), input_size=(4, 8, 8), caption_channels=8, model_max_length=4,
                 space_scale=0.5, time_scale=2 / 3)  # fmt: skip
    assert not torch.allclose(base.pos_embed, half.pos_embed)
    assert not torch.allclose(base.pos_embed_temporal, half.pos_embed_temporal)
    x = torch.randn(1, 4, 4, 8, 8)
    y = torch.randn(1, 3, 8)
    assert base(x, torch.tensor([3]), y).shape == (1, 8, 4, 8, 8)


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


def test_2d_position_embedding_against_the_formula():
    from sora_model.layers import sincos_2d

    table = sincos_2d(8, 2, 3)  # (h*w, 8), row-major: token (h=1, w=2) is row 5
    w, h = 2.0, 1.0
    expected_row = [
        *[math.sin(w), math.sin(w / 100), math.cos(w), math.cos(w / 100)],  # first half: the w coordinate
        *[math.sin(h), math.sin(h / 100), math.cos(h), math.cos(h / 100)],
    ]
    np.testing.assert_allclose(table[5], expected_row, rtol=1e-6)
    stretched = sincos_2d(8, 2, 3, scale=0.5, base_size=4)  # coordinates / scale x base_size / size
    u = w / 0.5 * 4 / 3  # the w coordinate, divided by the scale, stretched by base_size / width
    np.testing.assert_allclose(
        stretched[5][:4], [math.sin(u), math.sin(u / 100), math.cos(u), math.cos(u / 100)], rtol=1e-5
    )


def test_timestep_embedding_against_the_formula():
    from sora_model.layers import timestep_embedding

    emb = timestep_embedding(torch.tensor([3.0]), dim=4)  # half = 2: frequencies 1 and 1/100
    np.testing.assert_allclose(emb[0].numpy(), [math.cos(3), math.cos(0.03), math.sin(3), math.sin(0.03)], rtol=1e-6)


def test_unpatchify_inverts_patchify():
    model = debug_stdit2()
    x = torch.randn(2, 8, 3, 6, 10)
    tokens = rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (ph pw c)", ph=2, pw=2)  # patch (1, 2, 2)
    torch.testing.assert_close(model.unpatchify(tokens, 3, 3, 5), x)


def test_guidance_scale_one_is_the_conditional_prediction():
    from sora_model.diffusion import classifier_free_guidance

    model = debug_stdit2().eval()
    for parameter in model.final_layer.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
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

    model = debug_stdit2().eval()
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
    from sora_model.sizes import Family, ModelSize
    from sora_model.stdit import DiT

    model = DiT(ModelSize(Family.DIT, 2, 48, 4), input_size=(3, 8, 8), caption_channels=16, model_max_length=5)
    out = model(torch.randn(2, 4, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=bool))
    assert out.shape == (2, 8, 3, 8, 8)
    assert "blocks.0.adaLN_modulation.1.weight" in model.state_dict()
    with pytest.raises(ValueError, match="no frame conditioning"):
        model(torch.randn(1, 4, 3, 8, 8), torch.tensor([1]), torch.randn(1, 5, 16), x_mask=torch.ones(1, 3, dtype=bool))


def test_layernorm_kernel_request_is_an_option_not_a_crash():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("debug", DEBUG_TEXT, 16, input_sq_size=64, enable_layernorm_kernel=True)
    assert isinstance(model, STDiT2)
    assert len([w for w in caught if "layer_norm" in str(w.message)]) <= 1


def test_activation_checkpointing_applies_from_outside():
    """The model has no checkpointing switch: wrapping its blocks from outside gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(1, 4, 2, 8, 8)
    y, mask = caption(1)
    extra = conditioning(1, 64, 64, 2)

    def gradients(model):
        model(x, torch.tensor([300]), y, mask, **extra).pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = debug_stdit2()
    wrapped = debug_stdit2()
    for block in wrapped.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    reference, checkpointed = gradients(plain), gradients(wrapped)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6)


def test_stdit_v1_recomputes_the_position_embedding_for_another_grid():
    from sora_model.sizes import Family, ModelSize

    model = STDiT(ModelSize(Family.STDIT, 1, 24, 2), input_size=(2, 32, 32), caption_channels=8, model_max_length=4)
    seen = {}
    original = model._spatial_embedding
    model._spatial_embedding = lambda h, w: seen.setdefault((h, w), original(h, w))
    model(torch.randn(1, 4, 2, 16, 64), torch.tensor([3]), torch.randn(1, 3, 8))  # 8 x 32 = 256 tokens, like 16 x 16
    assert seen and list(seen) == [(8, 32)]
