"""Tokenizing dolly records and masking the prompt out of the loss.

Labels are computed per record at tokenization time: the prompt (everything up to and including the response key
that ends it) is -100, so only the response and ``### End`` are learned. The boundary is found by tokenizing the
prompt on its own, so a context that itself contains the text ``### Response:`` cannot move it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from .data import DatasetRecordError, records_dataset, with_training_text
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


def response_key_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of the response key when the tokenizer has it as one added token (as Dolly's tokenizers do), else None."""
    if RESPONSE_KEY_NL not in tokenizer.get_added_vocab():
        return None
    ids = tokenizer.encode(RESPONSE_KEY_NL, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _start_after_key(ids: Sequence[int], key_id: int, occurrence: int) -> int | None:
    """Position just after the ``occurrence``-th (from 1) ``key_id`` in ``ids``, or None."""
    seen = 0
    for position, token in enumerate(ids):
        if token == key_id:
            seen += 1
            if seen == occurrence:
                return position + 1
    return None


def _response_starts(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], prompts: list[str], indices: list[int]
) -> list[int]:
    """Where each record's response starts: after its prompt's tokens.

    With the response key as one added token, the tokenizer splits the text at every key before anything else, so
    the prompt's tokens are the record's tokens up to and including the prompt's own key: the last of the keys in
    the prompt text (a context may quote one). Found without tokenizing the prompt again; otherwise, or where that
    key is not found, the prompt is tokenized on its own and must be a prefix of the record.
    """
    key_id = response_key_id(tokenizer)
    starts: list[int | None] = [
        _start_after_key(ids, key_id, prompt.count(RESPONSE_KEY_NL)) if key_id is not None else None
        for ids, prompt in zip(input_ids, prompts)
    ]
    missing = [i for i, start in enumerate(starts) if start is None]
    if missing:
        prompt_ids = tokenizer([prompts[i] for i in missing])["input_ids"]
        for i, prompt in zip(missing, prompt_ids):
            if list(input_ids[i][: len(prompt)]) != list(prompt):
                raise DatasetRecordError(
                    f"record {indices[i] + 1}: field 'response': the tokenized prompt is not a prefix of the "
                    f"tokenized record, so the response key '{RESPONSE_KEY_NL.strip()}' that ends the prompt cannot "
                    "be located"
                )
            starts[i] = len(prompt)
    return starts  # type: ignore[return-value]


def _labels_from_fields(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], indices: list[int]
) -> list[list[int]]:
    prompts = [
        format_generation_prompt(instruction, context)
        for instruction, context in zip(batch["instruction"], batch.get("context") or [""] * len(input_ids))
    ]
    starts = _response_starts(tokenizer, input_ids, prompts, indices)
    return [mask_prompt(ids, start) for ids, start in zip(input_ids, starts)]


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


TRAINING_FEATURES = Features(
    {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")}
)


def training_features(
    batch: dict[str, list[Any]], indices: list[int] | None = None, *, tokenizer: PreTrainedTokenizerBase
) -> dict[str, list]:
    """A batch of checked records (``instruction``, ``context``, ``response``) rendered with Dolly's template and
    tokenized: ``input_ids``, ``labels`` (the prompt masked) and ``length``, for ``Dataset.map(batched=True)``."""
    batch = {**batch, **with_training_text(batch)}
    features = preprocess_batch(batch, tokenizer, indices=indices)
    return {**features, "length": [len(ids) for ids in features["input_ids"]]}


# Below this many records per process, starting worker processes costs more than it saves.
RECORDS_PER_PROCESS = 5_000
MAX_PROCESSES = 16


def default_num_proc(records: int) -> int:
    """Processes for tokenizing ``records``: the cores this process may use (at most :data:`MAX_PROCESSES`, at least
    :data:`RECORDS_PER_PROCESS` records each); 1 where datasets could not fork them (not Linux)."""
    if sys.platform != "linux":
        return 1  # datasets starts its workers by fork; spawn would re-import the trainer in each one
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, MAX_PROCESSES, records // RECORDS_PER_PROCESS))


def tokenize_dataset(
    records: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_proc: int | None = None,
    keep_fields: bool = False,
    cache_file_name: str | None = None,
) -> Dataset:
    """:func:`training_features` over a dataset of checked records, in ``num_proc`` processes (default:
    :func:`default_num_proc`), keeping the record's fields beside them with ``keep_fields``."""
    num_proc = num_proc or default_num_proc(records.num_rows)
    if num_proc > 1:
        # The workers are forked: the tokenizer's own threads are not, so each worker tokenizes on one core.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logger.info("Tokenizing %d records in %d process%s", records.num_rows, num_proc, "es" if num_proc > 1 else "")
    features = TRAINING_FEATURES if not keep_fields else Features({**records.features, **TRAINING_FEATURES})
    return records.map(
        training_features,
        fn_kwargs={"tokenizer": tokenizer},
        batched=True,
        with_indices=True,
        remove_columns=None if keep_fields else records.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file_name,
        desc="Tokenizing",
    )


def length_column(dataset: Dataset) -> np.ndarray:
    """Each record's length in tokens as one NumPy array, read from Arrow (not as Python objects): the ``length``
    column, or the lengths of the ``input_ids`` lists where there is none (or of any ``dataset["input_ids"]``)."""
    if not isinstance(dataset, Dataset):
        return np.asarray([len(ids) for ids in dataset["input_ids"]], dtype=np.int64)
    if "length" in dataset.column_names:
        column = dataset.with_format("arrow")["length"]
    else:
        column = pyarrow.compute.list_value_length(dataset.with_format("arrow")["input_ids"])
    return np.asarray(column.to_numpy(), dtype=np.int64)


def drop_too_long(dataset: Dataset, max_length: int) -> Dataset:
    """The records of at most ``max_length`` tokens (what is removed is logged); an error if none is left."""
    total = dataset.num_rows
    lengths = length_column(dataset)
    kept = (lengths <= max_length).nonzero()[0]
    removed = total - len(kept)
    if removed:
        logger.warning(
            "Removed %d of %d records (%.1f%%) longer than max length %d tokens; raise --max-length to keep them",
            removed,
            total,
            100.0 * removed / total,
            max_length,
        )
    if len(kept) == 0:
        raise ValueError(f"every record is longer than the max length of {max_length} tokens")
    return dataset.select(kept) if removed else dataset


def preprocess_dataset(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    seed: int = DEFAULT_SEED,
    training_dataset: str | Dataset = DEFAULT_TRAINING_DATASET,
    num_proc: int | None = None,
) -> Dataset:
    """Load, tokenize, length-filter (logging what is removed) and shuffle the training records (Dolly's function:
    ``input_ids`` and ``labels``; training itself prepares its data once per run, see training/prepared_data.py)."""
    if isinstance(training_dataset, Dataset):
        dataset = training_dataset
    else:
        dataset = records_dataset(training_dataset)
    logger.info("Preprocessing dataset")
    if "instruction" in dataset.column_names and "response" in dataset.column_names:
        dataset = tokenize_dataset(dataset, tokenizer, num_proc=num_proc)
    else:  # records given only as text
        dataset = dataset.map(
            lambda batch, indices: preprocess_batch(batch, tokenizer, max_length, indices=indices),
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            desc="Tokenizing",
        )
        dataset = dataset.map(lambda batch: {"length": [len(ids) for ids in batch["input_ids"]]}, batched=True)
    dataset = drop_too_long(dataset, max_length).remove_columns("length")
    logger.info("Shuffling dataset of %d records", dataset.num_rows)
    return dataset.shuffle(seed=seed)
