"""Checkpoints a run can trust: marked complete only once every rank has written its part.

The Trainer writes a checkpoint in pieces, from every rank (the model, each rank's optimizer partition and RNG
state, then the trainer state from rank 0). A run killed part-way leaves a folder that can look whole: rank 0 may
have written ``trainer_state.json`` while another rank's files are missing. So after each save every rank waits
at a barrier, and only then rank 0 writes ``checkpoint_complete.json`` (atomically), naming every file of the
checkpoint with its size (:mod:`training.folder_commit`: on a volume a file can be listed before all of it has
arrived). Resuming trusts only checkpoints so marked, and takes the one with the highest step number.

Old checkpoints are rotated out here too, after the new one is marked, and only complete ones count: the
Trainer's own rotation runs before the save is known to be whole, and could delete the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import folder_commit
from .distributed import barrier, is_main_process

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete(checkpoint: Path) -> bool:
    """Marked complete, with every file the marker names there at its size (a copy still arriving is not)."""
    return folder_commit.is_complete(checkpoint, COMPLETE_MARKER)


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, complete or not, lowest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, child) for child in folder.iterdir() if (step := checkpoint_step(child)) is not None]
    return [path for _, path in sorted(found)]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, lowest step first (interrupted ones are skipped with a warning)."""
    complete = []
    for checkpoint in checkpoint_folders(output_dir):
        if is_complete(checkpoint):
            complete.append(checkpoint)
        else:
            logger.warning("Ignoring incomplete checkpoint %s (interrupted while saving)", checkpoint)
    return complete


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete checkpoints that were never marked complete: a resumed run would otherwise write into them, and
    the Trainer's rotation would count them against ``save_total_limit`` in place of complete ones."""
    for checkpoint in checkpoint_folders(output_dir):
        if not is_complete(checkpoint):
            logger.warning("Removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond the newest ``keep`` (all are kept when ``keep`` is None)."""
    if not keep or keep < 1:
        return
    complete = [c for c in checkpoint_folders(output_dir) if is_complete(c)]
    for checkpoint in complete[:-keep]:
        logger.info("Deleting older checkpoint %s (save_total_limit %d)", checkpoint, keep)
        # The marker first: a deletion cut short leaves an incomplete checkpoint (never resumed from, removed at the
        # next start), not one that claims to be complete with its shards half gone.
        (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(checkpoint, ignore_errors=True)


class CheckpointCompletion(TrainerCallback):
    """After each save, once every rank has written its part, mark the checkpoint complete, then rotate.

    Give the Trainer ``save_total_limit=None`` and this callback the limit, so rotation counts complete
    checkpoints only. ``write_beside`` (rank 0, before the marker) adds files to each checkpoint, such as the run's
    ``run_config.json``: a checkpoint marked complete has them.
    """

    def __init__(self, save_total_limit: int | None = None, write_beside: Callable[[Path], object] | None = None):
        self.save_total_limit = save_total_limit
        self.write_beside = write_beside

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        barrier()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and checkpoint.is_dir():
            if self.write_beside is not None:
                self.write_beside(checkpoint)
            folder_commit.mark_complete(
                checkpoint, COMPLETE_MARKER, global_step=state.global_step, world_size=args.world_size
            )
            logger.info("Checkpoint %s complete", checkpoint)
            rotate_checkpoints(args.output_dir, self.save_total_limit)
