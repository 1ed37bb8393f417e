"""One run per output folder: an exclusive lock file that names its holder, with a heartbeat, that works where
``flock`` does not.

The lock is a file created exclusively (``O_CREAT | O_EXCL``) in the output folder, naming its holder (launch id,
host, pid, start time, command); while the run lives, a thread rewrites it every :data:`HEARTBEAT_S` with a growing
beat count. ``flock`` is not used: on Unity Catalog volumes and DBFS (FUSE over object storage) a lock may hold on
one node only, so two launches on two nodes would both get it. A second launch finds the file and is refused with a
message naming the holder, unless the holder is gone: on the same host, its process has ended (a ``kill -9`` leaves
the file, and the next launch takes it over at once); on another host, its beat count has not moved for
:data:`STALE_AFTER_BEATS` beats (watched, not compared with any clock, since hosts' clocks differ).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".dolly-run.lock"
HEARTBEAT_S = float(os.environ.get("DOLLY_LOCK_HEARTBEAT_S", "10"))
STALE_AFTER_BEATS = 3


class OutputDirLockedError(RuntimeError):
    """Another run is writing to this output folder."""


def rendezvous() -> str | None:
    """What every rank of one distributed run shares, on every node: its rendezvous address (None alone)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def read_holder(lock_path: Path) -> dict[str, Any] | None:
    """What the holder wrote in the lock file (None when it cannot be read, or is being written)."""
    try:
        holder = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, as the holder wrote it (or what is known when it could not be read)."""
    holder = read_holder(lock_path)
    if holder is None:
        return "a process that has not written its details yet"
    launch = f"launch {holder['launch_id']}, " if holder.get("launch_id") else ""
    return f"{launch}pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def locked_error(output_dir: str | os.PathLike, lock_path: Path) -> OutputDirLockedError:
    return OutputDirLockedError(
        f"another run is writing to {output_dir} ({describe_holder(lock_path)}); "
        "wait for it to finish or choose another --local-output-dir"
    )


def process_alive(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` of this host is alive and is the one that started at ``started`` (ISO time)."""
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    if not started:
        return True
    try:
        return created <= datetime.fromisoformat(started).timestamp() + 2  # the holder wrote it after it began
    except ValueError:
        return True


def holder_gone(lock_path: Path) -> bool:
    """Whether the lock's holder is gone: on this host, its process has ended; elsewhere (or unreadable), its beat
    count did not move while watched for :data:`STALE_AFTER_BEATS` beats."""
    holder = read_holder(lock_path)
    if holder is not None and holder.get("host") == socket.gethostname():
        return not process_alive(int(holder.get("pid", -1)), holder.get("started"))
    first = holder.get("beat") if holder else None
    deadline = time.monotonic() + STALE_AFTER_BEATS * HEARTBEAT_S
    while time.monotonic() < deadline:
        time.sleep(min(1.0, HEARTBEAT_S / 2))
        now = read_holder(lock_path)
        if not lock_path.exists():
            return True  # released while we watched
        if now is not None and now.get("beat") != first:
            return False
    return True


class OutputDirLock:
    """Exclusive, non-blocking lock on ``output_dir`` for the life of a run (a context manager)."""

    def __init__(self, output_dir: str | os.PathLike, launch_id: str | None = None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE_NAME
        self.launch_id = launch_id
        self._holder: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                if not holder_gone(self.path):
                    raise locked_error(self.output_dir, self.path) from None
                logger.warning("Taking over %s: its holder is gone (%s)", self.path, describe_holder(self.path))
                self.path.unlink(missing_ok=True)
        else:
            raise locked_error(self.output_dir, self.path)
        os.close(fd)
        self._holder = {
            "launch_id": self.launch_id,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "rendezvous": rendezvous(),
            "beat": 0,
        }
        self._write()
        self._beating = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._beating.start()
        logger.info("Locked %s for this run", self.output_dir)

    def _write(self) -> None:
        with open(self.path, "w") as handle:
            handle.write(json.dumps(self._holder))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = read_holder(self.path)
            if current is not None and (current.get("pid"), current.get("host")) != (
                self._holder["pid"],
                self._holder["host"],
            ):
                logger.error("%s was taken over by another run (%s)", self.path, describe_holder(self.path))
                return
            self._holder["beat"] += 1
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        if self._holder is None:
            return
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        self.path.unlink(missing_ok=True)
        self._holder = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def refuse_if_held_by_another_run(output_dir: str | os.PathLike) -> None:
    """For a run's other ranks: refuse early when a live process of another run holds the folder's lock.

    Only the main process takes the lock; the others must not touch it (a lock attempt of theirs could make the main
    process's fail). The holder is this run's own main process when it shares our parent (the launcher) or our
    rendezvous address (a launcher on another node: no two live runs can listen on one address).
    """
    lock_path = Path(output_dir) / LOCK_FILE_NAME
    try:
        holder = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("host") != socket.gethostname() or holder.get("ppid") == os.getppid():
        return
    if holder.get("rendezvous") is not None and holder.get("rendezvous") == rendezvous():
        return
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return  # left by a run that was killed
    except PermissionError:
        pass  # alive, owned by another user
    raise locked_error(output_dir, lock_path)


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, main_process: bool, launch_id: str | None = None) -> Iterator[None]:
    """Hold the output folder's lock for the run (main process), or check that no other run holds it (other ranks)."""
    if main_process:
        with OutputDirLock(output_dir, launch_id):
            yield
    else:
        refuse_if_held_by_another_run(output_dir)
        yield
