"""bitsandbytes quantization settings for loading models in 8-bit or 4-bit."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig


def quantization_config(*, load_in_8bit: bool = False, load_in_4bit: bool = False) -> BitsAndBytesConfig | None:
    """A bitsandbytes config for 8-bit or 4-bit (NF4, double-quantized) weights, or None for full precision."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_in_4bit:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None
