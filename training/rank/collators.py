"""Batching tokenized records for completion-only training, Dolly's way: padded rows (packed rows: training/packing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..preprocess import IGNORE_INDEX, mask_prompt, response_start_from_key
from ..saved_model.consts import RESPONSE_KEY_NL


def labels_for(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The example's labels; examples without them are masked here, after the last response key."""
    if "labels" in example:
        return list(example["labels"])
    start = response_start_from_key(example["input_ids"], tokenizer)
    if start is None:
        raise RuntimeError(
            f"Could not find response key '{RESPONSE_KEY_NL.strip()}' in token ids {list(example['input_ids'])[:32]}..."
        )
    return mask_prompt(example["input_ids"], start)


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


@dataclass
class DataCollatorForCompletionOnlyLM:
    """Pads a batch on the right to its longest record (to a multiple of ``pad_to_multiple_of``).

    Prompt tokens and padding are -100 in the labels, so only responses are learned. ``mlm`` is accepted as Dolly
    passes it (``mlm=False``, its collator subclassed the language-modelling one); this collator is causal only.
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = 8
    return_tensors: str = "pt"
    mlm: bool = False

    def __post_init__(self) -> None:
        if self.mlm:
            raise ValueError(
                "DataCollatorForCompletionOnlyLM is for causal LMs: masked language modelling (mlm=True) "
                "is not supported"
            )
        if self.return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {self.return_tensors!r}")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.as_tensor(example["input_ids"])
            labels[row, :length] = torch.as_tensor(labels_for(example, self.tokenizer))
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
