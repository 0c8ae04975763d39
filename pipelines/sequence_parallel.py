"""Sequence parallelism (`plugin="zero2-seq"`, `sp_size`), applied to a single-device STDiT or
STDiT2 from outside: Ulysses-style all-to-all, written with `torch.distributed`.

Layout. The world is dp x sp: ranks [g*sp, (g+1)*sp) form SP group g, whose DP rank is g. The
ranks of a group train one batch together; the epoch plan deals batches to DP ranks, and
everything random in a step is seeded by the DP rank (`Layout.dp_rank`), so sp_size=2 on 2
workers trains exactly what sp_size=1 on 1 worker trains.

What is split (`sp_split`). A latent of T x h x w patches is T frames of S = h*w tokens, a
sequence of T*S. Two layouts, both exact:

- "space" (the default): each rank keeps a contiguous 1/sp of every frame's tokens (S is padded
  up to a multiple of sp; padded tokens are never attended to and are dropped before the final
  layer), and all T frames of them.
  - spatial self-attention (a frame's S tokens) is the one place where a token needs tokens
    another rank holds. Ulysses: q, k and v trade their head split for the sequence split with
    one all-to-all, every rank attends over all S tokens for H/sp heads, and a second
    all-to-all trades back.
  - temporal self-attention runs over the T frames of one position, all of which the rank
    holds; cross-attention is a token's query against the whole caption, which every rank
    holds: both are exact where they are, and exchanging would move data for nothing.
  Images (T = 1) and any frame count split; padding makes any h*w work.
- "time": Open-Sora 1.0's layout. Each rank keeps T/sp whole frames (a contiguous 1/sp of the
  T*S sequence), so T must divide among the ranks (checked at start, per bucket). Spatial
  self-attention is exact where it is; temporal self-attention exchanges as above, RoPE applied
  over the whole T; cross-attention exchanges too, as Open-Sora 1.0's does: the queries trade
  heads for the sequence and each rank attends with its H/sp heads of the caption.

Either way `num_heads % sp_size == 0`. The MLP and the adaLN modulation (per sample, or per
frame under a frame mask) act per token; under "time" each block gets its rank's frames of the
frame mask and of STDiT's temporal position table.

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

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange

from bucketing.assign import parse_bucket_name
from pipelines.config import ConfigError
from sora_model.layers import Attention, CrossAttention, attention
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


def check_time_split(buckets: list[str], model_type: str, sp_size: int) -> None:
    """sp_split='time': every bucket's latent frames (patches along T) divide among the SP ranks."""
    patch_t = MODEL_SIZES[model_type].patch_size[0]
    uneven = [bucket for bucket in buckets if -(-parse_bucket_name(bucket)[1] // patch_t) % sp_size]
    if uneven:
        raise ConfigError(
            f"sp_split='time' with sp_size={sp_size}: the frames of bucket(s) {', '.join(uneven)} do not divide "
            "among the ranks (each rank holds T / sp_size whole frames); drop those buckets from bucket_config "
            "or use sp_split='space', which splits every frame's tokens and takes any frame count"
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
    """The SP group of one rank and the token grid of the forward pass under way; the split
    itself is `SpaceSplit`'s or `TimeSplit`'s."""

    def __init__(self, group, sp_size: int) -> None:
        self.group, self.sp_size = group, sp_size
        self.frames = self.tokens = 0  # T and S of the latent being run (set by the model's pre-hook)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*S, D) -> this rank's share, (B, N_local, D)."""
        raise NotImplementedError

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share -> (B, T*S, D), every rank's share in place."""
        raise NotImplementedError

    def key_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(batch, sequence) True for the real tokens of the sequence an exchanged attention sees; None: all real."""
        return None


class SpaceSplit(SequenceParallel):
    """Each rank holds a contiguous 1/sp of every frame's S tokens (S padded up to a multiple of
    sp), all T frames of them. Spatial self-attention exchanges; temporal and cross-attention
    are exact where they are."""

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


class TimeSplit(SequenceParallel):
    """Open-Sora 1.0's layout: each rank holds T/sp whole frames (a contiguous 1/sp of the T*S
    sequence). Spatial self-attention is exact where it is; temporal self-attention and
    cross-attention exchange, as Open-Sora 1.0's SeqParallelAttention and
    SeqParallelMultiHeadCrossAttention do. T must divide among the ranks."""

    @property
    def local_frames(self) -> int:
        return self.frames // self.sp_size

    def check(self) -> None:
        if self.frames % self.sp_size:
            raise ConfigError(
                f"sp_split='time': a latent of {self.frames} frames (patches along T) does not divide among "
                f"sp_size={self.sp_size} ranks; use buckets whose frame count it divides, or sp_split='space'"
            )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T*S, D) -> (B, T/sp*S, D): this rank's frames."""
        self.check()
        return Split.apply(x, self.group, 1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return Gather.apply(x, self.group, 1)

    def local(self, per_frame: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """This rank's frames of a per-frame tensor (frame mask, temporal position table)."""
        if per_frame is None:
            return None
        rank = dist.get_rank(self.group)
        return per_frame.narrow(dim, rank * self.local_frames, self.local_frames)

    def block_arguments(self, arguments: dict) -> None:
        """A block's call as its rank sees it: its frames, their mask and temporal positions."""
        arguments["frames"] = self.local_frames
        arguments["x_mask"] = self.local(arguments.get("x_mask"), 1)  # (B, T/sp)
        if "temporal_pos_embed" in arguments:  # STDiT: (1, T, D) -> (1, T/sp, D)
            arguments["temporal_pos_embed"] = self.local(arguments["temporal_pos_embed"], 1)


class UlyssesAttention(Attention):
    """Self-attention over a sequence split across the SP group (Ulysses): heads traded for
    the sequence before attending, and back after. Same parameters and state_dict keys as
    `Attention`; `install` sets the class and `sequence_parallel` on the model's own modules."""

    sequence_parallel: SequenceParallel

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        sp = self.sequence_parallel
        qkv = self.qkv(x)  # (B, N/sp, 3D)
        qkv = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # (3, B, H, N/sp, Dh)
        qkv = AllToAll.apply(qkv, sp.group, 2, 3)  # (3, B, H/sp, N, Dh)
        q, k, v = qkv.unbind(0)  # (B, H/sp, N, Dh) each
        if rope is not None:  # over the whole sequence: every position where it is
            q, k = rope(q), rope(k)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, self.use_flash, key_padding_mask=sp.key_mask(q.shape[0], q.device))  # (B, H/sp, N, Dh)
        out = AllToAll.apply(out, sp.group, 2, 1)  # (B, H, N/sp, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N/sp, D)


class UlyssesCrossAttention(CrossAttention):
    """Cross-attention with queries split across the SP group: the queries trade heads for the
    sequence, each rank attends with its H/sp heads of the caption's keys and values, and the
    output trades back. Same parameters and state_dict keys as `CrossAttention`."""

    sequence_parallel: SequenceParallel

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sp = self.sequence_parallel
        q = rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, H, N/sp, Dh)
        q = AllToAll.apply(q, sp.group, 1, 2)  # (B, H/sp, N, Dh)
        k, v = rearrange(self.kv_linear(y), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)  # (B, H, L, Dh)
        k, v = _own_chunk(k, sp.group, 1), _own_chunk(v, sp.group, 1)  # (B, H/sp, L, Dh): this rank's heads
        out = attention(q, k, v, self.use_flash, key_padding_mask=mask)  # (B, H/sp, N, Dh)
        out = AllToAll.apply(out, sp.group, 2, 1)  # (B, H, N/sp, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N/sp, D)


def _block(module: torch.nn.Module) -> torch.nn.Module:
    """A transformer block, looking through activation checkpointing's wrapper."""
    return getattr(module, "_checkpoint_wrapped_module", module)


def install(model: torch.nn.Module, group, sp_size: int, split: str = "space") -> SequenceParallel:
    """Make `model` (STDiT or STDiT2, activation checkpointing applied or not) run with its tokens
    split across `group` along `split` ("space" or "time", see the module's docstring): the model's
    forward records the token grid, the first block's input is split, the attentions that need
    tokens of other ranks become Ulysses, the final layer's input is gathered."""
    sp = {"space": SpaceSplit, "time": TimeSplit}[split](group, sp_size)

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
    for wrapper in model.blocks:
        block = _block(wrapper)
        exchanged = [block.attn] if split == "space" else [block.attn_temp, block.cross_attn]
        for module in exchanged:
            module.__class__ = UlyssesCrossAttention if isinstance(module, CrossAttention) else UlyssesAttention
            module.sequence_parallel = sp
        if split == "time":
            wrapper.register_forward_pre_hook(_local_frames(sp, inspect.signature(block.forward)), with_kwargs=True)
    return sp


def _local_frames(sp: TimeSplit, signature: inspect.Signature):
    """A pre-hook giving a block (through any wrapper) its rank's frames: frames, x_mask, temporal positions."""

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        sp.block_arguments(bound.arguments)
        return bound.args, bound.kwargs

    return hook
