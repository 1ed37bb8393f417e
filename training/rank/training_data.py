"""A run's training data on every rank: prepared once by the main process, checked against the checkpoint a resume
starts from, memory-mapped and split the same way on every rank.

Runs before any model is loaded, so a typo in the data, a changed file under ``--resume`` or a ``--test-size`` that
leaves nothing to train on costs seconds.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoConfig

from ..prepared_data import (
    TRAINING_COLUMNS,
    DataSpec,
    PreparedData,
    changed_parts,
    default_cache_dir,
    fingerprint_of,
    fingerprint_parts,
    prepare_data,
    split_held_out,
)
from ..settings import SettingsError, TrainSettings
from .handoff import on_main_process
from .modeling import config_max_length, load_tokenizer
from .run_record import RUN_CONFIG_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """The records a run trains and evaluates on, and the run record's data section."""

    train_dataset: Dataset
    eval_dataset: Dataset | None
    max_length: int
    facts: dict[str, Any]


def resolved_max_length(settings: TrainSettings) -> int:
    """``--max-length``, else the model's own context length (from its config: no weights are loaded)."""
    if settings.max_length:
        return settings.max_length
    config = AutoConfig.from_pretrained(settings.input_model, trust_remote_code=settings.trust_remote_code)
    return config_max_length(config)


def cache_dir_for(settings: TrainSettings) -> Path:
    return (
        Path(settings.dataset_cache_dir) if settings.dataset_cache_dir else default_cache_dir(settings.local_output_dir)
    )


def recorded_parts(checkpoint: Path) -> dict[str, Any] | None:
    """The data fingerprint's parts a checkpoint's run record holds (None for a checkpoint that has none)."""
    try:
        record = json.loads((checkpoint / RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record.get("data", {}).get("fingerprint_parts")


def check_resumed_data(checkpoint: Path, parts: dict[str, Any], *, allow_changed: bool) -> None:
    """Refuse (``SettingsError``, naming what changed) to resume from ``checkpoint`` on other data than it was trained
    on, unless ``allow_changed``."""
    recorded = recorded_parts(checkpoint)
    if recorded is None:
        logger.warning("%s records no data fingerprint (an older run): cannot check the data is the same", checkpoint)
        return
    changed = changed_parts(recorded, parts)
    if not changed:
        logger.info("The data is the data %s was trained on (fingerprint %s)", checkpoint.name, fingerprint_of(parts))
        return
    what = ", ".join(changed)
    if allow_changed:
        logger.warning("Resuming on changed data (--allow-changed-data): %s differ from %s", what, checkpoint.name)
        return
    raise SettingsError(
        f"--resume: the data is not what {checkpoint} was trained on ({what} changed), so the run would not continue "
        "the training it resumes. Restore the data, start a new run, or give --allow-changed-data to continue anyway"
    )


def prepare_on_main(settings: TrainSettings, max_length: int, checkpoint: Path | None) -> dict[str, Any]:
    """The main process's part: prepare (or reuse) the data and check it against the resumed checkpoint. The source
    is read once at most: not at all when the launch brought its digest (``--source-digest``: the notebook prepared
    the data), else as the records are read (the digest taken as they are)."""
    tokenizer = load_tokenizer(settings.input_model, trust_remote_code=settings.trust_remote_code)
    spec = DataSpec(settings.training_dataset, settings.columns, max_length, settings.seed)
    parts = fingerprint_parts(spec, tokenizer, source_digest=settings.source_digest) if settings.source_digest else None
    check = None
    if checkpoint is not None:  # before anything is reused or tokenized

        def check(parts: dict[str, Any]) -> None:
            check_resumed_data(checkpoint, parts, allow_changed=settings.allow_changed_data)

    prepared = prepare_data(
        spec, tokenizer, cache_dir_for(settings), num_proc=settings.dataset_num_proc, parts=parts, check=check
    )
    return {"path": str(prepared.path), "fingerprint": prepared.fingerprint, "info": prepared.info}


def run_data(settings: TrainSettings, checkpoint: Path | None) -> RunData:
    """The run's train and eval records on this rank (collective: every rank calls it)."""
    max_length = resolved_max_length(settings)
    answer = on_main_process(
        "training-data",
        lambda: prepare_on_main(settings, max_length, checkpoint),
        timeout_s=settings.wait_timeout,
        what=f"prepare the training data ({settings.training_dataset})",
    )
    prepared = PreparedData(Path(answer["path"]), answer["fingerprint"], answer["info"])
    if not prepared.path.is_dir():
        raise SettingsError(
            f"the prepared data {prepared.path} is not visible on {socket.gethostname()}: give --dataset-cache-dir a "
            "folder every node sees (shared storage)"
        )
    dataset = prepared.load()
    try:
        train_dataset, eval_dataset = split_held_out(dataset, settings.test_size, settings.seed)
    except ValueError as err:
        raise SettingsError(f"--test-size {settings.test_size}: {err}") from None
    logger.info(
        "Train data size: %d, test data size: %d",
        train_dataset.num_rows,
        eval_dataset.num_rows if eval_dataset is not None else 0,
    )
    facts = {
        "training_dataset": settings.training_dataset,
        "records": prepared.info["records"],
        "within_max_length": dataset.num_rows,
        "train_records": train_dataset.num_rows,
        "eval_records": eval_dataset.num_rows if eval_dataset is not None else 0,
        **prepared.facts(),
    }
    if eval_dataset is not None:
        eval_dataset = eval_dataset.select_columns(TRAINING_COLUMNS)
    return RunData(train_dataset.select_columns(TRAINING_COLUMNS), eval_dataset, max_length, facts)
