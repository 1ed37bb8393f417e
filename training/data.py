"""Loading and validating dolly-format instruction records, in the user's own columns.

A record has a non-empty string ``instruction`` and ``response``, and optionally a string ``context`` and
``category``. Data in other columns is mapped onto those four (:class:`Columns`: ``--columns
instruction=question,context=passage,response=answer``, or the ``alpaca`` preset for ``instruction``, ``input`` and
``output``). Every record is checked; the first bad one stops the run with an error that names the source, the line
(for JSON Lines and CSV files) or record number, and the field, in the user's column names when they are mapped
(``line 6: column 'answer' (the response) is empty``); lines and records are counted from 1, as a person reads a
file. A folder is read file by file (every ``.jsonl``, ``.json``, ``.csv`` and ``.parquet`` in it), so an error names
the file, and no file is dropped without a word. A UTF-8 byte-order mark is accepted; other text must be UTF-8.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk

from .columns import DOLLY_COLUMNS, Columns
from .saved_model.consts import DEFAULT_TRAINING_DATASET
from .saved_model.prompts import format_training_text

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context", "category")
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DatasetRecordError(ValueError):
    """A training record is malformed; the message names where and which field."""


def validate_record(record: Any, where: str, columns: Columns = DOLLY_COLUMNS) -> dict[str, str]:
    """Check one raw record and return it normalised to the four dolly fields (strings)."""
    if not isinstance(record, dict):
        raise DatasetRecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    clean: dict[str, str] = {}
    for field in REQUIRED_FIELDS:
        column, name = getattr(columns, field), columns.describe(field)
        if column not in record or record[column] is None:
            raise DatasetRecordError(f"{where}: {name} is missing")
        value = record[column]
        if not isinstance(value, str):
            raise DatasetRecordError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DatasetRecordError(f"{where}: {name} is empty")
        clean[field] = value
    for field in OPTIONAL_FIELDS:
        value = record.get(getattr(columns, field))
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DatasetRecordError(f"{where}: {columns.describe(field)} must be a string, got {type(value).__name__}")
        clean[field] = value
    return clean


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetRecordError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}, line {line_number}"
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):  # as Windows editors write
                raw = raw[len(codecs.BOM_UTF8) :]
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetRecordError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None


def _whole_file_text(path: Path) -> str:
    """A whole file as UTF-8 text (a byte-order mark dropped); a byte that is not UTF-8 is reported by its line."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetRecordError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _whole_file_text(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" dataset files are really JSON Lines.
        yield from _read_jsonl(path)
        return
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DatasetRecordError(f"{path}: expected a list of records (or JSON Lines), got {type(records).__name__}")
    for number, record in enumerate(records, start=1):
        yield f"{path}, record {number}", record


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV file with a header row, named by the line each row starts on (empty cells read as empty)."""
    text = _whole_file_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise DatasetRecordError(f"{path}, line {start}: more cells than the header has columns")
            yield f"{path}, line {start}", row
            start = reader.line_num + 1
    except csv.Error as err:
        raise DatasetRecordError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DatasetRecordError(f"{path}: not a readable Parquet file ({err})") from None
    yield from _read_dataset(table.to_pylist(), str(path))


def _read_dataset(dataset: Iterable[dict], source: str) -> Iterator[tuple[str, Any]]:
    for number, record in enumerate(dataset, start=1):
        yield f"{source}, record {number}", record


FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .csv or .parquet)")
    yield from reader(path)


def _read_folder(path: Path) -> Iterator[tuple[str, Any]]:
    """Every data file in a folder (and its subfolders), each read and checked on its own; others are named."""
    files = sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    data_files = [f for f in files if f.suffix.lower() in FILE_READERS]
    skipped = [f.name for f in files if f.suffix.lower() not in FILE_READERS]
    if skipped:
        logger.warning("%s: not reading %s (not .jsonl, .json, .csv or .parquet)", path, ", ".join(skipped))
    if not data_files:
        raise DatasetRecordError(f"{path}: no .jsonl, .json, .csv or .parquet files in this folder")
    logger.info("Reading %d files from %s", len(data_files), path)
    for data_file in data_files:
        yield from _read_file(data_file)


def _raw_records(path_or_dataset: str) -> Iterator[tuple[str, Any]]:
    path = Path(path_or_dataset)
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            loaded = load_from_disk(str(path))
            dataset = loaded["train"] if hasattr(loaded, "keys") else loaded
            yield from _read_dataset(dataset, str(path))
        else:
            yield from _read_folder(path)
    elif path.suffix.lower() in LOCAL_FILE_SUFFIXES or path_or_dataset.startswith((".", "/")):
        raise FileNotFoundError(f"training dataset not found: {path_or_dataset}")
    else:
        yield from _read_dataset(load_dataset(path_or_dataset, split="train"), path_or_dataset)


def read_records(path_or_dataset: str, columns: str | Columns | None = None) -> list[dict[str, str]]:
    """Read and validate every record of a hub dataset, a local folder, or a .jsonl/.json/.csv/.parquet file, in
    the user's ``columns`` (a ``--columns`` value or :class:`Columns`; dolly's own names by default)."""
    columns = columns if isinstance(columns, Columns) else Columns.parse(columns)
    records = [validate_record(record, where, columns) for where, record in _raw_records(path_or_dataset)]
    if not records:
        raise DatasetRecordError(f"{path_or_dataset}: no records found")
    return records


def load_training_dataset(
    path_or_dataset: str = DEFAULT_TRAINING_DATASET, columns: str | Columns | None = None
) -> Dataset:
    """Load dolly records as a ``Dataset`` with the four dolly fields plus ``text``, the rendered training prompt."""
    logger.info("Loading dataset from %s", path_or_dataset)
    records = read_records(path_or_dataset, columns)
    logger.info("Found %d rows", len(records))
    for record in records:
        record["text"] = format_training_text(record["instruction"], record["response"], record["context"])
    return Dataset.from_list(records)
