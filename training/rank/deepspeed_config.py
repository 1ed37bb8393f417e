"""Choosing the DeepSpeed configuration a run actually uses."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# LoRA keeps the new tokens' rows trainable through peft's trainable tokens, which do not work under ZeRO-3
# (partitioned embeddings: gathered only on CUDA, and checkpoint saving fails, huggingface/peft#2946). With a frozen
# base, ZeRO-2 (sharded optimizer states and gradients) is what LoRA needs anyway.
LORA_ZERO_STAGE = 2


def deepspeed_config_for(
    config: str | None, *, lora: bool, load_universal: bool = False
) -> str | dict[str, Any] | None:
    """The config path as given; or, changed where the run needs it, its settings: at ZeRO-2 for a LoRA run on a
    ZeRO-3 config, and loading DeepSpeed's universal checkpoint for a resume on another number of ranks."""
    if not config or not (lora or load_universal):
        return config
    settings = json.loads(Path(config).read_text())
    zero = settings.get("zero_optimization", {})
    changed = False
    if lora and zero.get("stage") == 3:
        logger.warning(
            "LoRA run: using %s at ZeRO stage %d instead of 3 (peft's trainable tokens need it)",
            config,
            LORA_ZERO_STAGE,
        )
        zero["stage"] = LORA_ZERO_STAGE
        changed = True
    if load_universal:
        settings.setdefault("checkpoint", {})["load_universal"] = True
        changed = True
    return settings if changed else config
