"""Tokenizing dolly records and masking the prompt out of the loss.

Labels are computed per record at tokenization time: the prompt (everything up to and including the response key
that ends it) is -100, so only the response and ``### End`` are learned. The boundary is found by tokenizing the
prompt on its own, so a context that itself contains the text ``### Response:`` cannot move it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .data import DatasetRecordError, load_training_dataset
from .saved_model.consts import DEFAULT_SEED, DEFAULT_TRAINING_DATASET, RESPONSE_KEY_NL
from .saved_model.prompts import format_generation_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def find_last_subsequence(sequence: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Index where the last occurrence of ``pattern`` starts in ``sequence``, or None."""
    width = len(pattern)
    if width == 0:
        return None
    pattern = list(pattern)
    for start in range(len(sequence) - width, -1, -1):
        if list(sequence[start : start + width]) == pattern:
            return start
    return None


def response_start_from_key(input_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Position just after the last response key in already-tokenized text (for records given only as text)."""
    key_ids = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    start = find_last_subsequence(input_ids, key_ids)
    return None if start is None else start + len(key_ids)


def mask_prompt(input_ids: Sequence[int], response_start: int) -> list[int]:
    """Labels for one record: -100 for the prompt, the token ids for the response."""
    return [IGNORE_INDEX] * response_start + list(input_ids[response_start:])


def _labels_from_fields(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], indices: list[int]
) -> list[list[int]]:
    prompts = [
        format_generation_prompt(instruction, context)
        for instruction, context in zip(batch["instruction"], batch.get("context") or [""] * len(input_ids))
    ]
    prompt_ids = tokenizer(prompts)["input_ids"]
    labels = []
    for ids, prompt, index in zip(input_ids, prompt_ids, indices):
        if list(ids[: len(prompt)]) != list(prompt):
            raise DatasetRecordError(
                f"record {index + 1}: field 'response': the tokenized prompt is not a prefix of the tokenized record, "
                f"so the response key '{RESPONSE_KEY_NL.strip()}' that ends the prompt cannot be located"
            )
        labels.append(mask_prompt(ids, len(prompt)))
    return labels


def _labels_from_text(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], indices: list[int]
) -> list[list[int]]:
    labels = []
    for ids, index in zip(input_ids, indices):
        start = response_start_from_key(ids, tokenizer)
        if start is None:
            raise DatasetRecordError(f"record {index + 1}: field 'text': no response key '{RESPONSE_KEY_NL.strip()}'")
        labels.append(mask_prompt(ids, start))
    return labels


def preprocess_batch(
    batch: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    indices: list[int] | None = None,
) -> dict[str, list]:
    """Tokenize a batch of records (fields ``text`` and, preferably, ``instruction``/``context``) with labels.

    ``max_length`` is accepted for compatibility with Dolly's signature; records are not truncated here so that
    over-long ones can be counted and reported by :func:`preprocess_dataset`.
    """
    texts = batch["text"]
    indices = indices if indices is not None else list(range(len(texts)))
    input_ids = tokenizer(texts)["input_ids"]
    if "instruction" in batch:
        labels = _labels_from_fields(batch, tokenizer, input_ids, indices)
    else:
        labels = _labels_from_text(tokenizer, input_ids, indices)
    return {"input_ids": input_ids, "labels": labels}


def preprocess_dataset(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    seed: int = DEFAULT_SEED,
    training_dataset: str | Dataset = DEFAULT_TRAINING_DATASET,
) -> Dataset:
    """Load, tokenize, length-filter (logging what is removed) and shuffle the training records."""
    dataset = training_dataset if isinstance(training_dataset, Dataset) else load_training_dataset(training_dataset)
    logger.info("Preprocessing dataset")
    dataset = dataset.map(
        lambda batch, indices: preprocess_batch(batch, tokenizer, max_length, indices=indices),
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )
    total = dataset.num_rows
    dataset = dataset.filter(lambda rec: len(rec["input_ids"]) <= max_length, desc="Filtering by length")
    removed = total - dataset.num_rows
    if removed:
        logger.warning(
            "Removed %d of %d records (%.1f%%) longer than max length %d tokens; raise --max-length to keep them",
            removed,
            total,
            100.0 * removed / total,
            max_length,
        )
    if dataset.num_rows == 0:
        raise ValueError(f"every record is longer than the max length of {max_length} tokens")
    logger.info("Shuffling dataset of %d records", dataset.num_rows)
    return dataset.shuffle(seed=seed)
