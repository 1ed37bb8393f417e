"""Training records read, checked, rendered and tokenized once, into an Arrow dataset named by what made it.

A run's data is prepared by one process (the driver or the main rank) into ``<cache>/<fingerprint>/`` (datasets'
own ``save_to_disk``), and every rank memory-maps it from there: no process holds the records as Python objects,
and no rank but the one that prepares tokenizes anything. The fingerprint is a digest of what decides the prepared
records (:func:`fingerprint_parts`): the source's content, the column mapping, the template, the tokenizer,
``max_length`` and the seed. A later run with the same ones (another output folder, another day) reuses the folder
and says so; a resume compares the fingerprint its checkpoint recorded with the data's now.

A dataset is built in a private ``.building-*`` folder inside the cache, marked complete (a marker naming its files
and sizes, :mod:`training.folder_commit`) and renamed into place, so a killed build leaves no half-written dataset
under a fingerprint, two runs that build the same one at once both end with one complete copy, and on a volume,
where a rename is a copy then a delete, no reader takes a folder whose files have not all arrived. A build whose
process is gone is swept by the next preparation in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from .columns import Columns
from .data import records_dataset, source_fingerprint
from .folder_commit import building_folder, commit, is_complete, mark_complete, sweep_abandoned_builds
from .preprocess import drop_too_long, tokenize_dataset
from .saved_model.prompts import format_training_text

logger = logging.getLogger(__name__)

PREPARATION_FORMAT = 1  # raise when the preparation itself changes what it writes
INFO_NAME = "dolly_prepared.json"
CACHE_FOLDER_NAME = "prepared_data"
TRAINING_COLUMNS = ["input_ids", "labels", "length"]
PART_NAMES = {
    "source": "the training data's content",
    "columns": "the column mapping (--columns)",
    "template": "the prompt template or the preparation",
    "tokenizer": "the tokenizer",
    "max_length": "--max-length",
    "seed": "--seed",
}


@dataclass(frozen=True)
class DataSpec:
    """What a run's prepared data is made from (besides the tokenizer)."""

    training_dataset: str
    columns: str | None
    max_length: int
    seed: int


# Text the tokenizer's fingerprint records the ids of: Dolly's template and keys, whitespace runs, digits, accents,
# CJK, emoji and punctuation, so that any change in how text becomes ids (normalizer, pre-tokenizer, merges, added
# tokens) changes them.
PROBE_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay  hello\tto Zoë, Ångström and 東京 🦊 — twice!!\n\nInput:\n  3.14159 + 2,718 = 5.86\r\n"
    "CamelCase snake_case kebab-case URL https://example.com/a?b=c&d=e\n\n### Response:\nOK.\n\n### End"
)
# The record-shaping code the prepared data depends on, by module and name: validation, the column mapping, the
# template, tokenizing and masking, the length filter. Its source is part of the fingerprint.
SHAPING_CODE = {
    "training.data": ("validate_record", "with_training_text"),
    "training.columns": ("Columns", "normalize_columns"),
    "training.saved_model.prompts": ("format_training_text",),
    "training.preprocess": (
        "find_last_subsequence",
        "response_start_from_key",
        "mask_prompt",
        "response_key_id",
        "_start_after_key",
        "_response_starts",
        "_labels_from_fields",
        "_labels_from_text",
        "preprocess_batch",
        "training_features",
        "drop_too_long",
    ),
}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def backend_definition(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """The fast tokenizer's definition as its library serialises it (None for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def merges_of(definition: dict[str, Any] | None) -> list[list[str]]:
    """A BPE model's merges, in order, as pairs, whichever way the library wrote them (``"a b"`` or ``["a", "b"]``)."""
    merges = ((definition or {}).get("model") or {}).get("merges") or []
    return [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in merges]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what ``tokenizer`` does, not of how a library version writes it down: its vocabulary and merges
    (as token ids and pairs), its special tokens as ids, and the ids it gives :data:`PROBE_TEXT` with and without
    special tokens. The same tokenizer under another ``tokenizers`` release keeps its prepared data."""
    specials = {}
    for name, value in sorted(tokenizer.special_tokens_map.items()):
        tokens = value if isinstance(value, list) else [value]
        specials[name] = [tokenizer.convert_tokens_to_ids(str(token)) for token in tokens]
    behaviour = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "merges": merges_of(backend_definition(tokenizer)),
        "special_tokens": specials,
        "probe": tokenizer(PROBE_TEXT)["input_ids"],
        "probe_plain": tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"],
    }
    return _digest(json.dumps(behaviour, sort_keys=True, ensure_ascii=False))


def shaping_code_digest() -> str:
    """A digest of the source of the code that shapes a record (:data:`SHAPING_CODE`): a change there makes new data."""
    import importlib
    import inspect

    sources = [
        inspect.getsource(getattr(importlib.import_module(module), name))
        for module, names in SHAPING_CODE.items()
        for name in names
    ]
    return _digest("\n".join(sources))


def template_digest() -> str:
    """A digest of Dolly's training template (with and without a context), of this preparation's format and of the
    code that shapes a record."""
    rendered = [format_training_text("{instruction}", "{response}", context) for context in ("{context}", None)]
    return _digest(json.dumps([PREPARATION_FORMAT, *rendered, shaping_code_digest()]))


def fingerprint_parts(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, source_digest: str | None = None
) -> dict[str, Any]:
    """What decides the prepared records, part by part (each named in :data:`PART_NAMES`). ``source_digest``: the
    source's digest where it was computed already (where the data was prepared), so the source is not read again."""
    return {
        "source": source_digest or source_fingerprint(spec.training_dataset),
        "columns": Columns.parse(spec.columns).text(),
        "template": template_digest(),
        "tokenizer": tokenizer_digest(tokenizer),
        "max_length": spec.max_length,
        "seed": spec.seed,
    }


def fingerprint_of(parts: dict[str, Any]) -> str:
    return _digest(json.dumps(parts, sort_keys=True))[:20]


def changed_parts(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The parts (described as :data:`PART_NAMES` does) in which two fingerprints' parts differ."""
    return [PART_NAMES.get(name, name) for name in PART_NAMES if recorded.get(name) != current.get(name)]


def default_cache_dir(local_output_dir: str | Path) -> Path:
    """Beside the runs: ``prepared_data`` in the output folder's parent."""
    return Path(local_output_dir).absolute().parent / CACHE_FOLDER_NAME


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset on disk: where it is, its fingerprint and what its info file says."""

    path: Path
    fingerprint: str
    info: dict[str, Any]

    def load(self) -> Dataset:
        """The dataset, memory-mapped (its rows in the seeded shuffled order; raw fields beside the tokens)."""
        return load_from_disk(str(self.path))

    @property
    def parts(self) -> dict[str, Any]:
        return self.info["parts"]

    def facts(self) -> dict[str, Any]:
        """The run record's view of it."""
        return {"fingerprint": self.fingerprint, "prepared_path": str(self.path), "fingerprint_parts": self.parts}


def existing(cache_dir: Path, fingerprint: str) -> PreparedData | None:
    """The complete prepared dataset of ``fingerprint`` in ``cache_dir``, if there is one."""
    path = cache_dir / fingerprint
    if not is_complete(path):  # the marker names every file with its size: a copy still arriving is not complete
        return None
    return PreparedData(path, fingerprint, json.loads((path / INFO_NAME).read_text(encoding="utf-8")))


def prepare_data(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    *,
    num_proc: int | None = None,
    parts: dict[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> PreparedData:
    """The prepared dataset for ``spec`` and ``tokenizer`` in ``cache_dir``: reused when it is there, else read,
    checked, tokenized (in ``num_proc`` processes), filtered to ``max_length``, shuffled with the seed and saved.

    The source is read once at most. ``parts`` (:func:`fingerprint_parts`, when the caller has the source's digest
    already) finds a prepared dataset without reading anything. Otherwise the records are read and checked first,
    the digest taken as they are read (JSON Lines, JSON, CSV; a table's copy has Spark's), and only then the
    fingerprint decides: the dataset prepared already, or this one tokenized from the records just read. ``check``
    sees the parts before anything is reused or tokenized (a resume's check against its checkpoint)."""
    cache_dir = Path(cache_dir)
    if parts is None and _prepared_from(cache_dir, spec, tokenizer):
        # Data was prepared from this source with these settings before: its digest first (a read, no parse), and
        # most likely the data is there. (Without such data, the digest is taken as the records are read below.)
        parts = fingerprint_parts(spec, tokenizer)
    if parts is not None and (found := existing(cache_dir, fingerprint_of(parts))) is not None:
        if check is not None:
            check(parts)
        _log_reuse(found)
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    sweep_abandoned_builds(cache_dir)
    building = building_folder(cache_dir / f"records-{uuid.uuid4().hex[:8]}")
    try:
        started = time.perf_counter()
        logger.info("Reading and checking %s", spec.training_dataset)
        # The records' cache is private to this build: keyed by its folder, not by a digest of the source.
        records = records_dataset(
            spec.training_dataset, spec.columns, cache_dir=building / "records", content=str(building)
        )
        read_seconds = time.perf_counter() - started
        if parts is None:
            parts = fingerprint_parts(
                spec, tokenizer, source_digest=source_fingerprint(spec.training_dataset, after_read=True)
            )
        if check is not None:
            check(parts)
        fingerprint = fingerprint_of(parts)
        if (found := existing(cache_dir, fingerprint)) is not None:
            _log_reuse(found)
            return found
        target = cache_dir / fingerprint
        info = _build(spec, tokenizer, parts, records, building, num_proc, started=started, read_seconds=read_seconds)
        mark_complete(building / "dataset", fingerprint=fingerprint)
        if not commit(building / "dataset", target):  # another run finished the same dataset first: as good
            logger.info("Another run prepared %s first; using its copy", target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logger.info("Prepared dataset %s in %.1f s", target, info["seconds"])
    return PreparedData(target, fingerprint, info)


def _prepared_from(cache_dir: Path, spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``cache_dir`` holds data prepared from ``spec``'s source with every other part of the fingerprint the
    same (the source's content may since have changed)."""
    if not cache_dir.is_dir():
        return False
    others = {
        key: value for key, value in fingerprint_parts(spec, tokenizer, source_digest="-").items() if key != "source"
    }
    for info_file in cache_dir.glob(f"*/{INFO_NAME}"):
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        recorded = {key: value for key, value in info.get("parts", {}).items() if key != "source"}
        if info.get("training_dataset") == spec.training_dataset and recorded == others:
            return True
    return False


def _log_reuse(found: PreparedData) -> None:
    logger.info(
        "Reusing prepared dataset %s (%d records; same data, columns, template, tokenizer, max length and seed)",
        found.path,
        found.info["records"],
    )


def _build(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    parts: dict[str, Any],
    records: Dataset,
    building: Path,
    num_proc: int | None,
    *,
    started: float,
    read_seconds: float,
) -> dict[str, Any]:
    """Tokenize the checked ``records`` into ``building/dataset`` with its info file; return the info."""
    logger.info("Preparing %s into %s", spec.training_dataset, building.parent)
    tokenized = tokenize_dataset(
        records,
        tokenizer,
        num_proc=num_proc,
        keep_fields=True,
        cache_file_name=str(building / "tokenized" / "tokenized.arrow"),
    )
    tokenize_seconds = time.perf_counter() - started - read_seconds
    kept = drop_too_long(tokenized, spec.max_length)
    shuffled = kept.shuffle(seed=spec.seed, indices_cache_file_name=str(building / "tokenized" / "shuffle.arrow"))
    shuffled.save_to_disk(str(building / "dataset"))
    info = {
        "format": PREPARATION_FORMAT,
        "training_dataset": spec.training_dataset,
        "parts": parts,
        "records": records.num_rows,
        "within_max_length": kept.num_rows,
        "seconds": round(time.perf_counter() - started, 2),
        "read_seconds": round(read_seconds, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
    }
    (building / "dataset" / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def split_held_out(dataset: Dataset, test_size: float | int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``test_size`` records (a count, or a ratio rounded up) by a seeded permutation of the row numbers;
    the same data, size and seed always hold out the same records. ``ValueError`` when none would be left."""
    total = dataset.num_rows
    held_out = 0 if not test_size else (int(np.ceil(test_size * total)) if isinstance(test_size, float) else test_size)
    if held_out == 0:
        return dataset, None
    if held_out >= total:
        raise ValueError(f"{held_out} records held out leaves none to train on (the data has {total})")
    order = np.random.default_rng(seed).permutation(total)
    train, test = np.sort(order[held_out:]), np.sort(order[:held_out])
    # In memory: the row numbers only (8 bytes a record), never a cache file written into the shared dataset.
    return dataset.select(train, keep_in_memory=True), dataset.select(test, keep_in_memory=True)
