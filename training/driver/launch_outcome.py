"""How a launch ended, told truthfully: its errors (the failing rank's exception, or a stop), the stop a notebook
asks for (the stop file, written on an interrupt), and how the launch's last lines and output folder decide which.

Shared by the launchers started from a command line (``training.driver.launch``) and through Spark
(``training.driver.spark``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..folder_commit import write_atomically
from ..rank.checkpoints import checkpoint_step, list_checkpoints
from ..rank.saving import LOADER_ENTRY_FILES
from ..rank.stopping import NOTHING_TRAINED, STOP_FILE_NAME

logger = logging.getLogger(__name__)
T = TypeVar("T")

RANK_EXIT = re.compile(r"exits with return code = (-?\d+)")
# What a failing rank prints last: an exception line (``module.Name: message``) or a native abort.
ERROR_LINE = re.compile(
    r"^(?:\[rank\d+\]: )?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b.*"
    r"|terminate called.*|Fatal Python error.*)$"
)


class TrainingFailedError(RuntimeError):
    """The training launcher failed, or said it succeeded without a finished model."""


class TrainingStopped(RuntimeError):
    """The run stopped on request, after a complete checkpoint: run it again with ``--resume``."""


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT to this process raise ``KeyboardInterrupt`` and nothing else (a job
    scheduler's stop is a stop; and PySpark's own SIGINT handler, which cancels every Spark job, waits outside)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def request_stop(output_dir: str | os.PathLike, launch_id: str | None = None) -> Path:
    """Ask every rank of the launch ``launch_id`` writing to ``output_dir`` to stop after its step: the stop file
    rank 0 checks at each step's end (the folder is on storage every node sees), naming the launch it stops. Ranks
    that have not started yet stop before their first step."""
    path = Path(output_dir) / STOP_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    request = {
        "launch_id": launch_id,
        "requested_by": f"pid {os.getpid()} on {socket.gethostname()}",
        "at": time.time(),
    }
    write_atomically(path, json.dumps(request))
    return path


def wait_stopping_on_interrupt(
    wait: Callable[[], T],
    output_dir: str | os.PathLike,
    *,
    stop_at_once: Callable[[], None],
    launch_id: str | None = None,
) -> tuple[T, bool]:
    """``wait()`` for a launch to end. The first interrupt asks its ranks to stop after their step (and waits on);
    a second calls ``stop_at_once``. Returns what ``wait`` returned and whether a stop was asked for."""
    stop_requested = False
    try:
        with signals_as_interrupt():
            while True:
                try:
                    return wait(), stop_requested
                except KeyboardInterrupt:
                    if stop_requested:
                        logger.warning("Interrupted again: stopping the launch at once")
                        stop_at_once()
                        continue
                    stop_requested = True
                    request_stop(output_dir, launch_id)
                    logger.warning(
                        "Interrupted: the ranks stop after their current step and write a checkpoint there "
                        "(interrupt again to stop at once)"
                    )
    finally:
        if stop_requested:
            (Path(output_dir) / STOP_FILE_NAME).unlink(missing_ok=True)


def stopped_error(output_dir: str | os.PathLike, how: str) -> TrainingStopped:
    """The error a stopped launch raises: where it stopped, and how to go on."""
    complete = list_checkpoints(output_dir)
    if not complete:
        return TrainingStopped(
            f"training stopped before its first checkpoint ({how}): {NOTHING_TRAINED}; launch it again to start over"
        )
    where = f"stopped at step {checkpoint_step(complete[-1])}"
    return TrainingStopped(
        f"training {where} ({how}): run again with --resume and --local-output-dir {output_dir} to continue (in the "
        f"notebook: resume_run={Path(output_dir).name})"
    )


def failure_summary(lines: list[str]) -> str:
    """The failing rank's error from the launcher's last lines: its exception (with the traceback lines before it)
    and which rank processes exited with which code."""
    error_at = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
    parts = []
    if error_at:
        last = error_at[-1]
        start = max(
            (i for i, line in enumerate(lines[: last + 1]) if "Traceback (most recent call last)" in line),
            default=max(0, last - 1),
        )
        parts.append("\n".join(lines[max(start, last - 12) : last + 1]))
    exits = [line.strip() for line in lines if RANK_EXIT.search(line)]
    if exits:
        parts.append("\n".join(exits[-4:]))
    return "\n".join(parts) or "\n".join(lines[-20:])


def published_since(output_dir: str | os.PathLike, started: float) -> bool:
    """Whether ``output_dir`` holds a finished model published after ``started`` (by this launch)."""
    entries = [Path(output_dir) / name for name in LOADER_ENTRY_FILES]
    return any(entry.is_file() and entry.stat().st_mtime >= started for entry in entries)


def ranks_reported_a_stop(lines: list[str]) -> bool:
    """Whether the ranks' last lines say they stopped on request (``... run again with --resume``, or before their
    first step)."""
    return any("run again with --resume" in line or NOTHING_TRAINED in line for line in lines)
