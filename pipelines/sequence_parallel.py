"""Sequence parallelism (`plugin="zero2-seq"`, `sp_size`), applied to a single-device STDiT or
STDiT2 from outside: Ulysses-style all-to-all, written with `torch.distributed`.

Layout. The world is dp x sp: ranks [g*sp, (g+1)*sp) form SP group g, whose DP rank is g. The
ranks of a group train one batch together; the epoch plan deals batches to DP ranks, and
everything random in a step is seeded by the DP rank (`Layout.dp_rank`), so sp_size=2 on 2
workers trains exactly what sp_size=1 on 1 worker trains.

What is split. A latent of T x h x w patches is T frames of S = h*w tokens. Each rank keeps
a contiguous 1/sp of every frame's tokens (S is padded up to a multiple of sp; padded tokens
are never attended to and are dropped before the final layer), and all T frames of them:

- spatial self-attention (a frame's S tokens) is the one place where a token needs tokens
  another rank holds. Ulysses: q, k and v trade their head split for the sequence split
  with one all-to-all, every rank attends over all S tokens for H/sp heads, and a second
  all-to-all trades back. So `num_heads % sp_size == 0`.
- temporal self-attention runs over the T frames of one spatial position; every rank holds
  all frames of its positions, so it is exact where it is, RoPE positions included.
- cross-attention: a token's query against the whole caption, which every rank holds: exact
  where it is. (Open-Sora 1.0 exchanges heads here too; that moves data for nothing.)
- the MLP and the adaLN modulation (per sample, or per frame under a frame mask) act per token.

Splitting space rather than time works for images (T = 1) and any frame count; padding makes
any h*w work, so the only divisibility asked for is that of the heads.

The loss. The tokens are gathered before the final layer and every rank of a group computes
the whole loss: the diffusion's losses are per-sample means over whole latents (IDDPM's
variational bound, frame masks), and the gathered tokens are small next to the activations
the split saves.

Gradients. DeepSpeed averages gradients over the whole world (ZeRO-2 shards over the whole
world too: every rank holds the same weights, and optimizer state divides by dp*sp rather
than dp). A parameter's true gradient within a group is the sum of what the group's ranks
computed on their tokens; the gather's backward multiplies the incoming gradient by sp and
the split's backward divides the gathered gradient by sp, so the world average is the
average over DP groups of each group's sum, as with one worker per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange

from pipelines.config import ConfigError
from sora_model.layers import Attention, attention
from sora_model.sizes import MODEL_SIZES, Family


@dataclass(frozen=True)
class Layout:
    """Where a rank stands in a world of dp x sp ranks."""

    rank: int
    world: int
    sp_size: int = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def layout(rank: int, world: int, sp_size: int) -> Layout:
    """The rank's place; the world must be a whole number of SP groups."""
    check_world(world, sp_size)
    return Layout(rank, world, sp_size)


def check_world(world: int, sp_size: int) -> None:
    if world % sp_size:
        raise ConfigError(
            f"sp_size={sp_size} needs a number of workers divisible by it (workers = dp x sp), got {world}: "
            f"use --num-workers {max(sp_size, world - world % sp_size)}"
        )


def check_model(model_type: str, sp_size: int) -> None:
    """Sequence parallelism fits STDiT and STDiT2 whose heads divide among the SP ranks."""
    size = MODEL_SIZES[model_type]
    if size.family is Family.DIT:
        raise ConfigError(
            f"plugin 'zero2-seq': model {model_type} attends over all frames at once; sequence parallelism "
            "is built for STDiT and STDiT2"
        )
    if size.num_heads % sp_size:
        raise ConfigError(
            f"plugin 'zero2-seq': model {model_type} has {size.num_heads} heads, not divisible by sp_size={sp_size} "
            f"(each SP rank attends with num_heads / sp_size heads)"
        )


def new_groups(layout: Layout) -> dist.ProcessGroup:
    """This rank's SP group; every rank creates every group, in the same order, as torch asks."""
    mine = None
    for start in range(0, layout.world, layout.sp_size):
        group = dist.new_group(list(range(start, start + layout.sp_size)))
        if start == layout.dp_rank * layout.sp_size:
            mine = group
    return mine


# --------------------------------------------------------------------------- collectives with autograd


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Send the k-th of sp chunks along `scatter_dim` to rank k; concatenate what arrives along `gather_dim`."""
    size = dist.get_world_size(group)
    inputs = [chunk.contiguous() for chunk in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _own_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class AllToAll(torch.autograd.Function):
    """Trades the split of `scatter_dim` for that of `gather_dim`; the backward trades back."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class Split(torch.autograd.Function):
    """Keep this rank's chunk of `dim`. Backward: gather the chunks' gradients, divided by sp
    (each arrives multiplied by sp from `Gather`, see the module's docstring)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim = group, dim
        return _own_chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim) / dist.get_world_size(ctx.group), None, None


class Gather(torch.autograd.Function):
    """Concatenate every rank's chunk along `dim`. Backward: this rank's chunk of the gradient,
    multiplied by sp (every rank computes the same loss from the gathered tensor)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group, ctx.dim) * dist.get_world_size(ctx.group), None, None


# --------------------------------------------------------------------------- applied to a model


class SequenceParallel:
    """The SP group of one rank and the token grid of the forward pass under way."""

    def __init__(self, group, sp_size: int) -> None:
        self.group, self.sp_size = group, sp_size
        self.frames = self.tokens = 0  # T and S of the latent being run (set by the model's pre-hook)

    @property
    def padded(self) -> int:
        """S rounded up to a multiple of sp."""
        return -(-self.tokens // self.sp_size) * self.sp_size

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*S, D) -> (B, T*S_pad/sp, D): this rank's share of every frame's tokens."""
        x = rearrange(x, "b (t s) d -> b t s d", t=self.frames)  # (B, T, S, D)
        x = torch.nn.functional.pad(x, (0, 0, 0, self.padded - self.tokens))  # (B, T, S_pad, D)
        x = Split.apply(x, self.group, 2)  # (B, T, S_pad/sp, D)
        return rearrange(x, "b t s d -> b (t s) d")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*S_pad/sp, D) -> (B, T*S, D), padding dropped."""
        x = rearrange(x, "b (t s) d -> b t s d", t=self.frames)  # (B, T, S_pad/sp, D)
        x = Gather.apply(x, self.group, 2)[:, :, : self.tokens]  # (B, T, S, D)
        return rearrange(x, "b t s d -> b (t s) d")

    def key_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(batch, S_pad) True for real tokens; None when nothing is padded."""
        if self.padded == self.tokens:
            return None
        return (torch.arange(self.padded, device=device) < self.tokens).expand(batch, -1)


class UlyssesAttention(Attention):
    """Spatial self-attention over tokens split across the SP group (Ulysses): heads traded for
    the sequence before attending, and back after. Same parameters and state_dict keys as
    `Attention`; `install` sets the class and `sequence_parallel` on the model's own modules."""

    sequence_parallel: SequenceParallel

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        sp = self.sequence_parallel
        qkv = self.qkv(x)  # (B, S_pad/sp, 3D)
        qkv = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # (3, B, H, S_pad/sp, Dh)
        qkv = AllToAll.apply(qkv, sp.group, 2, 3)  # (3, B, H/sp, S_pad, Dh)
        q, k, v = qkv.unbind(0)  # (B, H/sp, S_pad, Dh) each
        if rope is not None:
            q, k = rope(q), rope(k)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(
            q, k, v, self.use_flash, key_padding_mask=sp.key_mask(q.shape[0], q.device)
        )  # (B, H/sp, S_pad, Dh)
        out = AllToAll.apply(out, sp.group, 2, 1)  # (B, H, S_pad/sp, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, S_pad/sp, D)


def _block(module: torch.nn.Module) -> torch.nn.Module:
    """A transformer block, looking through activation checkpointing's wrapper."""
    return getattr(module, "_checkpoint_wrapped_module", module)


def install(model: torch.nn.Module, group, sp_size: int) -> SequenceParallel:
    """Make `model` (STDiT or STDiT2, activation checkpointing applied or not) run with its tokens
    split across `group`: the model's forward records the token grid, the first block's input is
    split, every spatial attention becomes Ulysses, the final layer's input is gathered."""
    sp = SequenceParallel(group, sp_size)

    def record_grid(module, args, kwargs):
        frames, rows, cols = module.patch_grid(args[0] if args else kwargs["x"])
        sp.frames, sp.tokens = frames, rows * cols

    def split_tokens(module, args):
        return (sp.split(args[0]), *args[1:])

    def gather_tokens(module, args):
        return (sp.gather(args[0]), *args[1:])

    model.register_forward_pre_hook(record_grid, with_kwargs=True)
    model.blocks[0].register_forward_pre_hook(split_tokens)
    model.final_layer.register_forward_pre_hook(gather_tokens)
    for block in model.blocks:
        attn = _block(block).attn
        attn.__class__ = UlyssesAttention
        attn.sequence_parallel = sp
    return sp
