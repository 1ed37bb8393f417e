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
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from .columns import DOLLY_COLUMNS, Columns
from .saved_model.consts import DEFAULT_TRAINING_DATASET
from .saved_model.prompts import format_training_text

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context", "category")
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
PARQUET_BATCH_ROWS = 10_000


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
    """Rows of a CSV file with a header row, named by the line each row starts on (empty cells read as empty).

    Read line by line (a cell may span lines), so memory does not grow with the file; a byte that is not UTF-8 is
    reported by its line."""
    with path.open("rb") as handle:
        lines = (
            _decode(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, f"{path}, line {number}")
            for number, raw in enumerate(handle, start=1)
        )
        reader = csv.DictReader(lines)
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
    """A Parquet file's rows, a record batch at a time (memory does not grow with the file)."""
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield f"{path}, record {number}", record
    except (pyarrow.ArrowException, OSError) as err:
        raise DatasetRecordError(f"{path}: not a readable Parquet file ({err})") from None


def _read_dataset(dataset: Iterable[dict], source: str) -> Iterator[tuple[str, Any]]:
    for number, record in enumerate(dataset, start=1):
        yield f"{source}, record {number}", record


FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .csv or .parquet)")
    yield from reader(path)


def _folder_files(path: Path) -> tuple[list[Path], list[Path]]:
    """A folder's data files (and its subfolders', hidden ones left out), in name order, and its other files."""
    files = sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    return [f for f in files if f.suffix.lower() in FILE_READERS], [
        f for f in files if f.suffix.lower() not in FILE_READERS
    ]


def _read_folder(path: Path) -> Iterator[tuple[str, Any]]:
    """Every data file in a folder (and its subfolders), each read and checked on its own; others are named."""
    data_files, skipped = _folder_files(path)
    if skipped:
        logger.warning(
            "%s: not reading %s (not .jsonl, .json, .csv or .parquet)", path, ", ".join(f.name for f in skipped)
        )
    if not data_files:
        raise DatasetRecordError(f"{path}: no .jsonl, .json, .csv or .parquet files in this folder")
    logger.info("Reading %d files from %s", len(data_files), path)
    for data_file in data_files:
        yield from _read_file(data_file)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _names_a_local_path(path_or_dataset: str) -> bool:
    """Whether a name that is not there was meant as a local file or folder (not a hub dataset)."""
    return Path(path_or_dataset).suffix.lower() in LOCAL_FILE_SUFFIXES or path_or_dataset.startswith((".", "/"))


def _raw_records(path_or_dataset: str) -> Iterator[tuple[str, Any]]:
    path = Path(path_or_dataset)
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        if _is_saved_dataset(path):
            loaded = load_from_disk(str(path))
            dataset = loaded["train"] if hasattr(loaded, "keys") else loaded
            yield from _read_dataset(dataset, str(path))
        else:
            yield from _read_folder(path)
    elif _names_a_local_path(path_or_dataset):
        raise FileNotFoundError(f"training dataset not found: {path_or_dataset}")
    else:
        yield from _read_dataset(load_dataset(path_or_dataset, split="train"), path_or_dataset)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_fingerprint(path_or_dataset: str) -> str:
    """A digest of what the records are read from, which changes when they do: a file's bytes; a folder's data files
    (names and bytes; a saved dataset's every file); a hub dataset's revision (the commit its files come from)."""
    path = Path(path_or_dataset)
    if path.is_file():
        return f"sha256:{_file_sha256(path)}"
    if path.is_dir():
        if _is_saved_dataset(path):
            files = sorted(f for f in path.rglob("*") if f.is_file())
        else:
            files = _folder_files(path)[0]
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
        return f"sha256:{digest.hexdigest()}"
    if _names_a_local_path(path_or_dataset):
        raise FileNotFoundError(f"training dataset not found: {path_or_dataset}")
    from datasets import load_dataset_builder

    return f"hub:{path_or_dataset}@{load_dataset_builder(path_or_dataset).hash}"


def validated_records(path_or_dataset: str, columns: str | Columns | None = None) -> Iterator[dict[str, str]]:
    """Every record of a hub dataset, a local folder, or a .jsonl/.json/.csv/.parquet file, checked and normalised to
    the four dolly fields, one at a time (in the user's ``columns``: a ``--columns`` value or :class:`Columns`)."""
    columns = columns if isinstance(columns, Columns) else Columns.parse(columns)
    found = 0
    for where, record in _raw_records(path_or_dataset):
        yield validate_record(record, where, columns)
        found += 1
    if not found:
        raise DatasetRecordError(f"{path_or_dataset}: no records found")


def read_records(path_or_dataset: str, columns: str | Columns | None = None) -> list[dict[str, str]]:
    """:func:`validated_records` as a list: for small data (tests, benchmarks). Training streams the records into
    Arrow instead (:func:`records_dataset`), so no process holds them all as Python objects."""
    return list(validated_records(path_or_dataset, columns))


def _records_of(path_or_dataset: str, columns: Columns, content: str) -> Iterator[dict[str, str]]:
    """:func:`validated_records`, for datasets' generator builder (``content``: the source's digest, for its cache)."""
    yield from validated_records(path_or_dataset, columns)


RECORD_FEATURES = Features({field: Value("string") for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)})


def records_dataset(
    path_or_dataset: str, columns: str | Columns | None = None, *, cache_dir: str | Path | None = None
) -> Dataset:
    """The checked records as an Arrow ``Dataset`` (the four dolly fields), written a batch at a time by datasets'
    own generator builder into ``cache_dir`` (datasets' cache by default) and memory-mapped from there.

    Each record goes through the same reader and check as :func:`read_records`, so an error names the file, the line
    or record, and the field (datasets' JSON and CSV readers cannot: pyarrow reports a block, pandas reads "NA" as
    missing)."""
    columns = columns if isinstance(columns, Columns) else Columns.parse(columns)
    try:
        return Dataset.from_generator(
            _records_of,
            features=RECORD_FEATURES,
            # datasets caches a generator's output by its arguments: the source's digest makes that cache follow the
            # source's content, not only its name.
            gen_kwargs={
                "path_or_dataset": path_or_dataset,
                "columns": columns,
                "content": source_fingerprint(path_or_dataset),
            },
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except DatasetGenerationError as err:  # datasets wraps what the generator raised
        cause = err.__cause__
        if isinstance(cause, (DatasetRecordError, FileNotFoundError, ValueError)):
            raise cause from None
        raise


def load_training_dataset(
    path_or_dataset: str = DEFAULT_TRAINING_DATASET, columns: str | Columns | None = None
) -> Dataset:
    """Load dolly records as a ``Dataset`` with the four dolly fields plus ``text``, the rendered training prompt."""
    logger.info("Loading dataset from %s", path_or_dataset)
    dataset = records_dataset(path_or_dataset, columns)
    logger.info("Found %d rows", dataset.num_rows)
    return dataset.map(with_training_text, batched=True, desc="Rendering")


def with_training_text(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """A batch of records with ``text``, each rendered with Dolly's training template."""
    return {
        "text": [
            format_training_text(instruction, response, context)
            for instruction, response, context in zip(batch["instruction"], batch["response"], batch["context"])
        ]
    }
