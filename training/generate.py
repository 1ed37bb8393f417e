"""Generating responses from a trained model: loading it, and answering instructions through the pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .rank.lora import is_adapter_dir, load_adapter_model
from .rank.quantization import quantization_config
from .saved_model.instruct_pipeline import InstructionTextGenerationPipeline, get_special_token_id

__all__ = [
    "InstructionTextGenerationPipeline",
    "generate_response",
    "get_special_token_id",
    "load_model_tokenizer_for_generate",
]

logger = logging.getLogger(__name__)


def load_model_tokenizer_for_generate(
    pretrained_model_name_or_path: str,
    *,
    dtype: torch.dtype | str = "auto",
    device_map: str | dict | None = "auto",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a trained model and its tokenizer for generation (left padding, for batched prompts).

    A full model folder or an adapter-only LoRA output (the base model it names is loaded, then the adapter).
    ``load_in_8bit``/``load_in_4bit`` quantize the weights with bitsandbytes to fit smaller GPUs. 8-bit weights
    compute in float16 unless ``dtype`` says otherwise: bitsandbytes casts other inputs to float16 for every
    product anyway, and warns each time it does.
    """
    logger.info("Loading %s for generation", pretrained_model_name_or_path)
    if load_in_8bit and dtype == "auto":
        dtype = torch.float16
    tokenizer = AutoTokenizer.from_pretrained(
        pretrained_model_name_or_path, padding_side="left", trust_remote_code=trust_remote_code
    )
    load_kwargs = dict(
        dtype=dtype,
        device_map=device_map,
        quantization_config=quantization_config(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit),
        trust_remote_code=trust_remote_code,
    )
    if is_adapter_dir(pretrained_model_name_or_path):
        model = load_adapter_model(pretrained_model_name_or_path, tokenizer, **load_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **load_kwargs)
    model.eval()
    return model, tokenizer


def generate_response(
    instruction: str | dict[str, str] | list[str | dict[str, str]],
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 1,
    **kwargs: Any,
) -> str | list[str]:
    """Answer one instruction (or a list of them) with the Dolly prompt; ``kwargs`` go to ``generate``."""
    generation_pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer, **kwargs)
    if isinstance(instruction, list):
        results = generation_pipeline(instruction, batch_size=batch_size)
        return [result[0]["generated_text"] for result in results]
    return generation_pipeline(instruction)[0]["generated_text"]
