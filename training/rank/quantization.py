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
        compute_dtype = (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training; returns the layers changed.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without gradients (an evaluation, the packing
    self-check, sample answers) converts its weight, once and for good, into a packed inference layout; the next
    training step then fails with "a view of a leaf Variable that requires grad is being used in an in-place
    operation" (bitsandbytes 0.50, ``nn/modules.py``). The conversion only speeds up CPU inference, so training runs
    without it. GPUs never take that path.
    """
    import bitsandbytes

    layers = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
