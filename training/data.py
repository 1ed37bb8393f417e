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
import collections
import csv
import hashlib
import json
import logging
import os
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


# Bytes read from each source file by this process (the readers and the digest), for the benchmarks.
SOURCE_BYTES_READ: collections.Counter[str] = collections.Counter()
# The SHA-256 of each source file a reader read whole, in order, by this process, with the file's size and mtime
# then: the digest of a file just parsed is known without reading it again (see :func:`source_fingerprint`).
_DIGESTS_SEEN: dict[str, tuple[int, int, str]] = {}
TABLE_COPY_MARKER = ".dolly_table.json"  # a table's copy (training/driver/spark.py): its marker holds Spark's digest


class _CountedFile:
    """A binary file that adds what is read from it to :data:`SOURCE_BYTES_READ`, and hashes what it reads: a file
    read from its start to its end without a seek leaves its digest in :data:`_DIGESTS_SEEN`."""

    def __init__(self, path: Path):
        self._file = path.open("rb")
        self._key = str(path)
        self._hash = hashlib.sha256()
        self._in_order = True
        self._at_end = False

    def _count(self, data: bytes) -> bytes:
        SOURCE_BYTES_READ[self._key] += len(data)
        if self._in_order:
            self._hash.update(data)
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._count(self._file.read(size))
        self._at_end = self._at_end or not data or size is None or size < 0
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self._count(self._file.readline(size))
        self._at_end = self._at_end or not data
        return data

    def readinto(self, buffer) -> int:
        count = self._file.readinto(buffer) or 0
        self._count(bytes(memoryview(buffer)[:count]))
        self._at_end = self._at_end or count == 0
        return count

    def __iter__(self) -> Iterator[bytes]:
        for line in self._file:
            yield self._count(line)
        self._at_end = True

    def seek(self, offset: int, whence: int = 0) -> int:
        before = self._file.tell()
        position = self._file.seek(offset, whence)
        if position == 0:  # back to the start (after a look at a byte-order mark): the hash starts again from there
            self._hash, self._in_order, self._at_end = hashlib.sha256(), True, False
        else:  # any other jump: the bytes hashed are no longer the file's, in order
            self._in_order = self._in_order and position == before
        return position

    def close(self) -> None:
        if self._in_order and self._at_end and not self._file.closed:
            status = os.fstat(self._file.fileno())
            _DIGESTS_SEEN[self._key] = (status.st_size, status.st_mtime_ns, self._hash.hexdigest())
        self._file.close()

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # tell, readable, fileno, ... as the file has them
        return getattr(self._file, name)


def _open_source(path: Path) -> _CountedFile:
    return _CountedFile(path)


def _digest_seen(path: Path) -> str | None:
    """The digest of ``path`` from a whole read by this process, if the file has not changed since."""
    seen = _DIGESTS_SEEN.get(str(path))
    if seen is None:
        return None
    status = path.stat()
    return seen[2] if (status.st_size, status.st_mtime_ns) == seen[:2] else None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetRecordError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_source(path) as handle:
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


JSON_PEEK_BYTES = 1 << 20  # how much of a .json file is read to tell an array, an object and JSON Lines apart


def _json_layout(path: Path) -> str:
    """How a ``.json`` file holds its records, from its first bytes: ``array`` (``[...]``), ``object`` (one object,
    such as ``{"data": [...]}``) or ``lines`` (JSON Lines, which ``Dataset.to_json`` writes as ``.json``)."""
    with _open_source(path) as handle:
        head = handle.read(JSON_PEEK_BYTES).removeprefix(codecs.BOM_UTF8)
    text = head.lstrip()
    if text.startswith(b"["):
        return "array"
    first, newline, rest = text.partition(b"\n")
    if not newline:  # one line (or a first line longer than the peek): one object
        return "object"
    try:
        json.loads(first)
    except (ValueError, UnicodeDecodeError):
        return "object"  # an object spread over lines
    return "lines" if rest.strip() else "object"


def _json_error(path: Path, number: int, err: Exception) -> DatasetRecordError:
    if isinstance(err, UnicodeDecodeError):
        return DatasetRecordError(f"{path}, record {number}: not UTF-8 text; save the file as UTF-8")
    return DatasetRecordError(f"{path}, record {number}: not valid JSON ({err})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file's records as a stream (never the whole file in memory): a JSON array item by item, the
    ``data`` list of an object, or JSON Lines line by line; each record named by its file and number."""
    import ijson

    layout = _json_layout(path)
    if layout == "lines":
        yield from _read_jsonl(path)
        return
    prefix = "item" if layout == "array" else "data.item"
    number = 0
    # yajl's C parser (ijson's default) stops at integers beyond 64 bits; ijson's Python parser reads any integer, so
    # the rest of the file is read with it when that happens (records already read are not read twice).
    for parser in (ijson, ijson.get_backend("python")):
        with _open_source(path) as handle:
            if handle.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
                handle.seek(0)
            try:
                for count, record in enumerate(parser.items(handle, prefix, use_float=True), 1):
                    if count > number:
                        number = count
                        yield f"{path}, record {number}", record
                break
            except (ijson.JSONError, UnicodeDecodeError) as err:
                if parser is ijson and "integer overflow" in str(err):
                    continue
                raise _json_error(path, number + 1, err) from None
    if layout == "object" and number == 0 and not _has_data_list(path):
        yield from _read_jsonl(path)  # one record on one line, or not a list of records: said there


def _has_data_list(path: Path) -> bool:
    """Whether a ``.json`` object's top level has a ``data`` list (streamed: the file is not loaded)."""
    import ijson

    with path.open("rb") as handle:
        if handle.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            handle.seek(0)
        try:
            return any(prefix == "data" and event == "start_array" for prefix, event, _ in ijson.parse(handle))
        except (ijson.JSONError, UnicodeDecodeError):
            return False


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV file with a header row, named by the line each row starts on (empty cells read as empty).

    Read line by line (a cell may span lines), so memory does not grow with the file; a byte that is not UTF-8 is
    reported by its line."""
    with _open_source(path) as handle:
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
        with _open_source(path) as handle:
            batches = pyarrow.parquet.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH_ROWS)
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


def _file_sha256(path: Path, *, reuse_seen: bool = False) -> str:
    """``path``'s SHA-256; with ``reuse_seen``, from the whole read a reader just made of it, when there was one."""
    if reuse_seen and (seen := _digest_seen(path)) is not None:
        return seen
    with _open_source(path) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_fingerprint(path_or_dataset: str, *, after_read: bool = False) -> str:
    """A digest of what the records are read from, which changes when they do: a file's bytes; a folder's data files
    (names and bytes; a saved dataset's every file); a table's copy, the digest Spark computed of its rows; a hub
    dataset's revision (the commit its files come from).

    ``after_read``: the records were just read by this process, so a file read whole, in order (JSON Lines, JSON,
    CSV) is not read again: its digest was taken as it was parsed. A Parquet file, read by its footer first, is."""
    path = Path(path_or_dataset)
    if path.is_file():
        return f"sha256:{_file_sha256(path, reuse_seen=after_read)}"
    if path.is_dir():
        table = path / TABLE_COPY_MARKER
        if table.is_file():
            copied = json.loads(table.read_text(encoding="utf-8"))
            if copied.get("digest"):
                return f"table:{copied['table']}@{copied['digest']}"
        if _is_saved_dataset(path):
            files = sorted(f for f in path.rglob("*") if f.is_file())
        else:
            files = _folder_files(path)[0]
        digest = hashlib.sha256()
        for file in files:
            digest.update(
                f"{file.relative_to(path).as_posix()}\0{_file_sha256(file, reuse_seen=after_read)}\n".encode()
            )
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
    path_or_dataset: str,
    columns: str | Columns | None = None,
    *,
    cache_dir: str | Path | None = None,
    content: str | None = None,
) -> Dataset:
    """The checked records as an Arrow ``Dataset`` (the four dolly fields), written a batch at a time by datasets'
    own generator builder into ``cache_dir`` (datasets' cache by default) and memory-mapped from there.

    Each record goes through the same reader and check as :func:`read_records`, so an error names the file, the line
    or record, and the field (datasets' JSON and CSV readers cannot: pyarrow reports a block, pandas reads "NA" as
    missing). ``content``: the source's digest when the caller has it (:func:`source_fingerprint`), so the source is
    not read again to key the cache."""
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
                "content": content or source_fingerprint(path_or_dataset),
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
