"""Resuming on a different number of ranks or nodes than the checkpoint was written with.

Two things must carry over for the resumed run to be the run it continues:

- **The global batch** (records per optimizer step: per-device batch x accumulation x ranks). The data order and the
  optimizer's steps follow from it, so a resume keeps it: :func:`keep_global_batch` picks the per-device batch and
  accumulation for the new number of ranks, logs how, and refuses at start (before any model is loaded), saying what
  to set, when no whole numbers keep it exactly.
- **The optimizer's partitions.** ZeRO splits the optimizer states (and, at stage 3, the weights) by rank, and
  DeepSpeed refuses to load them on another world size. DeepSpeed's own tool converts the checkpoint into its
  *universal* form (``deepspeed.checkpoint.ds_to_universal``: a file per parameter, not per rank), which any world
  size loads with ``"checkpoint": {"load_universal": true}``. The main process converts (once per checkpoint, marked
  complete like the checkpoint itself); the other ranks wait for it (``training.rank.handoff``: with a timeout, and not
  past the main process's death).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..folder_commit import write_atomically
from ..settings import SettingsError, TrainSettings
from .checkpoints import COMPLETE_MARKER, checkpoint_step
from .handoff import on_main_process
from .run_record import RUN_CONFIG_NAME

logger = logging.getLogger(__name__)

UNIVERSAL_MARKER = "universal_complete.json"


@dataclass(frozen=True)
class BatchShape:
    """How a step's records were split: per-device batch, accumulation steps, ranks."""

    per_device: int
    accumulation: int
    ranks: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.ranks

    def __str__(self) -> str:
        rank_word = "rank" if self.ranks == 1 else "ranks"
        return f"{self.per_device} per device x {self.accumulation} accumulation x {self.ranks} {rank_word}"


def checkpoint_batch_shape(checkpoint: Path) -> BatchShape | None:
    """The batch shape a complete checkpoint was written with (None for a checkpoint without a run record)."""
    marker, record = checkpoint / COMPLETE_MARKER, checkpoint / RUN_CONFIG_NAME
    if not (marker.is_file() and record.is_file()):
        return None
    settings = json.loads(record.read_text()).get("settings", {})
    ranks = json.loads(marker.read_text()).get("world_size")
    if not ranks:
        return None
    return BatchShape(settings["per_device_train_batch_size"], settings["gradient_accumulation_steps"], ranks)


def keep_global_batch(settings: TrainSettings, written: BatchShape, ranks: int) -> TrainSettings:
    """``settings`` with a per-device batch and accumulation that keep ``written``'s global batch on ``ranks``.

    The settings' own values are kept when they already do; else the per-device batch stays and the accumulation
    changes; else the largest per-device batch below the settings' that divides the step. Raises ``SettingsError``
    saying what to set when the global batch does not split over ``ranks`` at all.
    """
    wanted = written.global_batch
    asked = BatchShape(settings.per_device_train_batch_size, settings.gradient_accumulation_steps, ranks)
    if asked.global_batch == wanted:
        if ranks != written.ranks:
            logger.info(
                "Resuming on %d ranks (the checkpoint was written by %d): global batch %d kept, %s (was %s)",
                ranks,
                written.ranks,
                wanted,
                asked,
                written,
            )
        return settings
    if wanted % ranks:
        raise SettingsError(
            f"--resume: the checkpoint's global batch of {wanted} records per step ({written}) does not split over "
            f"{ranks} ranks; run on a number of ranks that divides {wanted}, or start a new run"
        )
    per_rank = wanted // ranks
    per_device = next(size for size in range(min(asked.per_device, per_rank), 0, -1) if per_rank % size == 0)
    kept = BatchShape(per_device, per_rank // per_device, ranks)
    logger.warning(
        "Resuming on %d ranks (the checkpoint was written by %d): keeping its global batch of %d records per step as "
        "%s (it was %s; the settings asked for %s). To choose yourself, set --per-device-train-batch-size and "
        "--gradient-accumulation-steps so that their product x %d = %d.",
        ranks,
        written.ranks,
        wanted,
        kept,
        written,
        asked,
        ranks,
        wanted,
    )
    return replace(settings, per_device_train_batch_size=kept.per_device, gradient_accumulation_steps=kept.accumulation)


def engine_checkpoint(checkpoint: Path) -> Path | None:
    """The DeepSpeed engine's folder in a Trainer checkpoint (``global_stepN``), if it has one."""
    step = checkpoint_step(checkpoint)
    folder = checkpoint / f"global_step{step}"
    return folder if folder.is_dir() else None


def universal_folder(checkpoint: Path) -> Path:
    return checkpoint / f"global_step{checkpoint_step(checkpoint)}_universal"


def convert_to_universal(checkpoint: Path, *, extract_workers: int = 4, merge_workers: int = 2) -> Path:
    """DeepSpeed's universal form of ``checkpoint``'s engine states, beside them (once; marked when complete)."""
    target = universal_folder(checkpoint)
    if (checkpoint / UNIVERSAL_MARKER).is_file():
        return target
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    if target.exists():  # a conversion that did not finish
        shutil.rmtree(target)
    logger.info("Converting %s to DeepSpeed's universal checkpoint (any number of ranks loads it)", checkpoint)
    started = time.monotonic()
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(engine_checkpoint(checkpoint)),
            output_folder=str(target),
            num_extract_workers=extract_workers,
            num_merge_workers=merge_workers,
            keep_temp_folder=False,
            strict=True,
            # The Trainer's checkpoints lack the version note Megatron-DeepSpeed writes (ZeRO-1/2 ask for it); with
            # data parallelism only there is nothing else to record (DeepSpeed's own --inject_missing_state).
            inject_missing_state=True,
        )
    )  # also writes checkpoint/latest_universal, the tag DeepSpeed loads
    write_atomically(checkpoint / UNIVERSAL_MARKER, json.dumps({"folder": target.name}) + "\n")
    logger.info("Converted %s in %.0f s", checkpoint, time.monotonic() - started)
    return target


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: a complete checkpoint, the ranks that wrote it and the ranks that go on from it."""

    checkpoint: Path
    written_ranks: int
    ranks: int

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) or 0

    @property
    def universal(self) -> bool:
        """Whether DeepSpeed loads the checkpoint's universal form (another number of ranks, engine states)."""
        return self.written_ranks != self.ranks and engine_checkpoint(self.checkpoint) is not None


def resume_point(settings: TrainSettings, checkpoint: Path, ranks: int) -> tuple[TrainSettings, ResumePoint]:
    """Settings that keep the checkpoint's global batch on ``ranks`` (or ``SettingsError``), and where to resume.
    Reads the checkpoint's records only: call :func:`make_loadable` to prepare it."""
    written = checkpoint_batch_shape(checkpoint)
    if written is None:
        return settings, ResumePoint(checkpoint, ranks, ranks)
    return keep_global_batch(settings, written, ranks), ResumePoint(checkpoint, written.ranks, ranks)


def make_loadable(resume: ResumePoint, *, wait_timeout: float) -> None:
    """On another number of ranks, the main process converts the DeepSpeed checkpoint to its universal form and
    gives every new rank an RNG state; the others wait until it is done (at most ``wait_timeout`` seconds, and not
    past the main process's death). Collective; runs before any model is loaded."""
    if resume.written_ranks == resume.ranks:
        return
    on_main_process(
        "universal-checkpoint",
        lambda: _make_loadable_here(resume),
        timeout_s=wait_timeout,
        what=f"convert {resume.checkpoint} for {resume.ranks} ranks",
    )


def _make_loadable_here(resume: ResumePoint) -> None:
    provide_rng_states(resume.checkpoint, resume.written_ranks, resume.ranks)
    if resume.universal:
        convert_to_universal(resume.checkpoint)
    else:  # the Trainer's own optimizer file loads on any number of ranks
        write_atomically(resume.checkpoint / UNIVERSAL_MARKER, json.dumps({"folder": None}) + "\n")


def rng_state_name(rank: int, ranks: int) -> str:
    """The RNG file the Trainer reads for ``rank`` of ``ranks`` (a lone process reads one without a number)."""
    return "rng_state.pth" if ranks == 1 else f"rng_state_{rank}.pth"


def provide_rng_states(checkpoint: Path, written_ranks: int, ranks: int) -> None:
    """Give each of ``ranks`` the RNG file the Trainer looks for: rank ``r`` takes the state of the checkpoint's
    rank ``r mod written_ranks`` (a copy, beside the originals; dropout cannot repeat exactly on another split)."""
    for rank in range(ranks):
        target = checkpoint / rng_state_name(rank, ranks)
        source = checkpoint / rng_state_name(rank % written_ranks, written_ranks)
        if not target.exists() and source.exists():
            shutil.copy2(source, target)
