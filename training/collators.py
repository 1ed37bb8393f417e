"""Batching tokenized records for completion-only training: padded (Dolly's way) or packed without padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .consts import RESPONSE_KEY_NL
from .preprocess import IGNORE_INDEX, mask_prompt, response_start_from_key


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
            raise ValueError("DataCollatorForCompletionOnlyLM is for causal LMs: masked language modelling (mlm=True) "
                             "is not supported")
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


@dataclass
class DataCollatorForPackedCompletionOnlyLM:
    """Packs a batch into one row with no padding: position ids restart at each record.

    Without an attention mask (and without a KV cache, which would hide the packing from it), transformers builds a
    block-diagonal causal mask from the restarting position ids, so no record attends to another. A record's first
    label is always -100, so nothing is learned across a boundary.

    With ``response_logits_only``, the model computes vocabulary logits only where a response token is predicted
    (``logits_to_keep``), and the loss reads the matching targets from ``shift_labels``: the same loss, without
    the output layer's work on prompt tokens. ``labels`` stay in the batch for counting tokens.
    """

    tokenizer: PreTrainedTokenizerBase
    response_logits_only: bool = True
    return_tensors: str = "pt"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for example in examples:
            record_labels = labels_for(example, self.tokenizer)
            record_labels[0] = IGNORE_INDEX
            input_ids.extend(example["input_ids"])
            labels.extend(record_labels)
            position_ids.extend(range(len(example["input_ids"])))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "use_cache": False,
        }
        if self.response_logits_only:
            targets = batch["labels"][0, 1:]
            predicting = torch.nonzero(targets != IGNORE_INDEX).flatten()
            batch["logits_to_keep"] = predicting
            batch["shift_labels"] = targets[predicting].unsqueeze(0)
        return batch
