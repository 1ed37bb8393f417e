"""The trainer CLI, counting who reads and who tokenizes the training records: ``--module data_counting``.

Each process appends to ``$DOLLY_COUNT_DIR/<pid>.txt`` a line ``read RANK`` each time it starts reading the source
and ``tokenize RANK N`` for each batch of N records it tokenizes (datasets' map runs in this process with one
tokenizing process, so every batch is seen).
"""

from __future__ import annotations

import os
from pathlib import Path

import training.data as data
import training.preprocess as preprocess
from training.trainer import run_cli

_validated_records = data.validated_records
_training_features = preprocess.training_features


def _note(line: str) -> None:
    folder = Path(os.environ["DOLLY_COUNT_DIR"])
    with open(folder / f"{os.getpid()}.txt", "a") as handle:
        handle.write(f"{line} {os.environ.get('RANK', '0')}\n")


def counted_validated_records(*args, **kwargs):
    _note("read")
    yield from _validated_records(*args, **kwargs)


def counted_training_features(batch, indices=None, *, tokenizer):
    _note(f"tokenize {len(batch['instruction'])}")
    return _training_features(batch, indices, tokenizer=tokenizer)


def counts(folder: Path) -> dict[str, dict[str, int]]:
    """``{"read": {rank: times}, "tokenize": {rank: records}}`` from the notes in ``folder``."""
    found: dict[str, dict[str, int]] = {"read": {}, "tokenize": {}}
    for notes in folder.glob("*.txt"):
        for line in notes.read_text().splitlines():
            parts = line.split()
            rank = parts[-1]
            amount = int(parts[1]) if parts[0] == "tokenize" else 1
            found[parts[0]][rank] = found[parts[0]].get(rank, 0) + amount
    return found


if __name__ == "__main__":  # imported by the tests for counts(), it changes nothing
    data.validated_records = counted_validated_records
    preprocess.training_features = counted_training_features
    run_cli()
