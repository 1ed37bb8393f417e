"""Loading and validating dolly-format instruction records.

A record has a non-empty string ``instruction`` and ``response``, and optionally a string ``context`` and
``category``. Every record is checked; the first bad one stops the run with an error that names the source, the
line (for JSON Lines files) or record number, and the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

from datasets import Dataset, load_dataset, load_from_disk

from .consts import DEFAULT_TRAINING_DATASET
from .prompts import format_training_text

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context", "category")
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetRecordError(ValueError):
    """A training record is malformed; the message names where and which field."""


def validate_record(record: Any, where: str) -> dict[str, str]:
    """Check one raw record and return it normalised to the four string fields."""
    if not isinstance(record, dict):
        raise DatasetRecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    clean: dict[str, str] = {}
    for field in REQUIRED_FIELDS:
        if field not in record or record[field] is None:
            raise DatasetRecordError(f"{where}: field '{field}' is missing")
        value = record[field]
        if not isinstance(value, str):
            raise DatasetRecordError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DatasetRecordError(f"{where}: field '{field}' is empty")
        clean[field] = value
    for field in OPTIONAL_FIELDS:
        value = record.get(field)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DatasetRecordError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        clean[field] = value
    return clean


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetRecordError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" dataset files are really JSON Lines.
        yield from _read_jsonl(path)
        return
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DatasetRecordError(f"{path}: expected a list of records (or JSON Lines)")
    for index, record in enumerate(records):
        yield f"{path}, record {index}", record


def _read_dataset(dataset: Iterable[dict], source: str) -> Iterator[tuple[str, Any]]:
    for index, record in enumerate(dataset):
        yield f"{source}, record {index}", record


def _raw_records(path_or_dataset: str) -> Iterator[tuple[str, Any]]:
    path = Path(path_or_dataset)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            yield from _read_dataset(load_dataset("parquet", data_files=str(path), split="train"), str(path))
        else:
            raise ValueError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")
    elif path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            loaded = load_from_disk(str(path))
            dataset = loaded["train"] if hasattr(loaded, "keys") else loaded
        else:
            dataset = load_dataset(str(path), split="train")
        yield from _read_dataset(dataset, str(path))
    elif path.suffix.lower() in LOCAL_FILE_SUFFIXES or path_or_dataset.startswith((".", "/")):
        raise FileNotFoundError(f"training dataset not found: {path_or_dataset}")
    else:
        yield from _read_dataset(load_dataset(path_or_dataset, split="train"), path_or_dataset)


def read_records(path_or_dataset: str) -> list[dict[str, str]]:
    """Read and validate every record of a hub dataset, a local folder, or a .jsonl/.json/.parquet file."""
    records = [validate_record(record, where) for where, record in _raw_records(path_or_dataset)]
    if not records:
        raise DatasetRecordError(f"{path_or_dataset}: no records found")
    return records


def load_training_dataset(path_or_dataset: str = DEFAULT_TRAINING_DATASET) -> Dataset:
    """Load dolly records as a ``Dataset`` with the original fields plus ``text``, the rendered training prompt."""
    logger.info("Loading dataset from %s", path_or_dataset)
    records = read_records(path_or_dataset)
    logger.info("Found %d rows", len(records))
    for record in records:
        record["text"] = format_training_text(record["instruction"], record["response"], record["context"])
    return Dataset.from_list(records)
