"""Launches an earlier notebook run left running: each launch leaves a record in its training root while it runs,
and the next launch reports the ones still alive (with their GPUs), with a way to stop them.

A notebook's "Run all" or a restarted Python kernel forgets the launch it started, but the launch (in a session of
its own, so that a Ctrl-C does not tear it down half-way) goes on and keeps its GPUs; the next launch would then fail
for lack of memory, or share the GPUs without a word.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

RECORDS_FOLDER = ".dolly-launches"


@dataclass(frozen=True)
class LaunchRecord:
    pid: int  # the launcher: the leader of the launch's process group
    started: float  # its start time (psutil), so that a reused pid is not taken for it
    host: str
    output_dir: str
    command: str

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return False  # another machine's: not this one's to judge
        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.Error:
            return False

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} since {since}, writing {self.output_dir}"


def _folder(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir).absolute().parent / RECORDS_FOLDER


def record_launch(pid: int, output_dir: str | os.PathLike, command: str) -> Path:
    """Note a running launch in its training root; returns the record's path (remove it when the launch ends)."""
    record = LaunchRecord(pid, psutil.Process(pid).create_time(), socket.gethostname(), str(output_dir), command)
    path = _folder(output_dir) / f"{Path(output_dir).name}-{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record)))
    return path


def running_launches(output_dir: str | os.PathLike) -> list[LaunchRecord]:
    """The launches recorded in ``output_dir``'s training root that are still running on this machine (records of
    ended ones are removed)."""
    found = []
    folder = _folder(output_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = LaunchRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if record.alive():
            found.append(record)
        elif record.host == socket.gethostname():
            path.unlink(missing_ok=True)
    return found


def warn_about_running_launches(output_dir: str | os.PathLike) -> list[LaunchRecord]:
    """Log each launch still running from an earlier run, and how to stop it."""
    running = running_launches(output_dir)
    for record in running:
        logger.warning(
            "An earlier launch is still running (%s) and keeps its GPUs. Stop it with "
            "training.driver.launch_records.stop_launch(%d), or kill -TERM -- -%d",
            record.describe(),
            record.pid,
            record.pid,
        )
    return running


def stop_launch(pid: int, grace_s: float = 30.0) -> None:
    """Stop a recorded launch and everything it started: SIGTERM to its process group, SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
