"""Deciding how a model trains on packed rows: whether it can, and with which attention."""

from __future__ import annotations

import inspect

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .collators import DataCollatorForPackedCompletionOnlyLM
from .packed_attention import PACKED_SDPA, register_packed_sdpa

# Attention implementations that read packed sequences from restarting position ids.
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", PACKED_SDPA}


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model: PreTrainedModel) -> bool:
    """Whether the model can train on packed rows: it takes position ids and its attention honours them."""
    model = unwrap(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    return takes_positions and getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION


def packing_collator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> DataCollatorForPackedCompletionOnlyLM | None:
    """The packed collator, with per-record attention switched on where the model uses SDPA; None if unsupported."""
    if not supports_packing(model):
        return None
    if unwrap(model).config._attn_implementation == "sdpa":
        unwrap(model).set_attn_implementation(register_packed_sdpa())
    return DataCollatorForPackedCompletionOnlyLM(tokenizer=tokenizer)


def restore_attention(model: PreTrainedModel) -> None:
    """Saved models use plain SDPA: the packed-row attention is a training-time choice."""
    base = unwrap(model)
    if base.config._attn_implementation == PACKED_SDPA:
        base.set_attn_implementation("sdpa")
