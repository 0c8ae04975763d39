"""The caption encoder: T5's encoder (DeepFloyd/t5-v1_1-xxl in Open-Sora)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, T5EncoderModel

from sora_model.loading import load_pretrained


class T5Encoder:
    """Captions -> (B, L, D) hidden states and a (B, L) mask of real tokens."""

    def __init__(self, tokenizer, model: T5EncoderModel, model_max_length: int) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.model_max_length = model_max_length
        self.output_dim = int(model.config.d_model)  # 4096 for T5-XXL: the STDiT caption channels

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        model_max_length: int = 120,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> T5Encoder:
        """Load tokenizer and encoder of `name` (hub id or local folder) with `from_pretrained`.

        Keep `dtype` fp32 (Open-Sora encodes captions in fp32): T5 v1.1 overflows in fp16.
        """
        options = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}
        tokenizer = load_pretrained("T5 tokenizer", name, lambda: AutoTokenizer.from_pretrained(name, **options))
        model = load_pretrained(
            "T5 encoder", name, lambda: T5EncoderModel.from_pretrained(name, dtype=dtype, **options)
        )
        return cls(tokenizer, model.eval(), model_max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions padded to model_max_length: ((B, L, D) states, (B, L) int mask)."""
        if not captions:
            raise ValueError("no captions to encode")
        tokens = self.tokenizer(
            captions,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)  # (B, L)
        mask = tokens.attention_mask.to(self.device)  # (B, L)
        states = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return states, mask
