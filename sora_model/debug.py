"""Tiny stand-ins for the real T5 and VAE, for tests and the demo (no download needed).

They are written with `save_pretrained`, so the project loads them through the very
`from_pretrained` calls that load `DeepFloyd/t5-v1_1-xxl` and `stabilityai/sd-vae-ft-ema`.
The VAE keeps the SD VAE's latent geometry (4 channels, spatial stride 8, scaling factor
0.18215), so latent shapes and every size computed from them are the real ones.
Weights come from fixed seeds: the same seed writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import T5Config, T5EncoderModel, T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

T5_SUBDIR = "t5"
VAE_SUBDIR = "vae"
DEBUG_TEXT_DIM = 64  # the debug T5's hidden size = caption channels of the debug model
SD_VAE_SCALING_FACTOR = 0.18215

# Words of the demo captions get their own pieces; any other ASCII text falls back to
# single characters, so every caption tokenizes without <unk>.
_WORDS = (
    "a an the on in of and with to at moves move moving left right up down slowly quickly "
    "background red green blue yellow orange purple white black gray pink cyan "
    "circle square triangle shape small large video image still frame"
).split()
_CHARACTERS = "".join(chr(code) for code in range(33, 127))  # printable ASCII but the space


def _debug_tokenizer() -> T5Tokenizer:
    """A T5 (unigram, sentencepiece-style) tokenizer over a small fixed vocabulary."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -5.0) for word in _WORDS]
    vocab += [(character, -10.0) for character in _CHARACTERS]
    vocab += [(f"▁{character}", -10.5) for character in _CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# The first layer's relative position bias towards the next and the previous token.
NEIGHBOUR_BIAS = 8.0


@torch.no_grad()
def attend_to_neighbours(t5: T5EncoderModel) -> None:
    """Make the first layer's heads look at a token's neighbours: half at the next, half at the previous.

    A T5 with random weights barely mixes its tokens: a colour word comes out the same whether it
    names the shape or the background (cosine 0.997 between "yellow" in "a red circle ... on a
    yellow background" and in "a yellow circle ... on a red background"), so to the diffusion
    model a caption would be a bag of words and "which colour is the background" unlearnable.
    A trained T5 encodes such roles; here the first layer's relative position bias does it
    crudely: each word's state then carries its neighbours' ("yellow" before "background";
    cosine 0.56 between the two roles), the way a real encoder's would carry its context.
    """
    attention = t5.encoder.block[0].layer[0].SelfAttention
    buckets = t5.config.relative_attention_num_buckets
    bucket = lambda offset: T5Attention._relative_position_bucket(  # noqa: E731
        torch.tensor(offset),
        bidirectional=True,
        num_buckets=buckets,
        max_distance=t5.config.relative_attention_max_distance,
    ).item()
    bias = attention.relative_attention_bias.weight  # (buckets, heads)
    heads = bias.shape[1]
    bias.zero_()
    bias[bucket(1), : heads // 2] = NEIGHBOUR_BIAS  # the next token (memory position - query position = 1)
    bias[bucket(-1), heads // 2 :] = NEIGHBOUR_BIAS  # the previous one


def write_debug_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write a tiny T5 encoder (+ tokenizer) and a tiny SD-geometry VAE under `out_dir`.

    Returns the two folders, to be used as `text_encoder.from_pretrained` and
    `vae.from_pretrained` in a config.
    """
    out_dir = Path(out_dir)
    t5_dir, vae_dir = out_dir / T5_SUBDIR, out_dir / VAE_SUBDIR
    tokenizer = _debug_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=DEBUG_TEXT_DIM,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",  # as T5 v1.1
                is_encoder_decoder=False,
            )
        )
        attend_to_neighbours(t5)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 3 downsamplings, stride 8
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=SD_VAE_SCALING_FACTOR,
        )
    tokenizer.save_pretrained(t5_dir)
    t5.save_pretrained(t5_dir)
    vae.save_pretrained(vae_dir)
    return {"text_encoder": t5_dir, "vae": vae_dir}
