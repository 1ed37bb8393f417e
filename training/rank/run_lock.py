"""One run per output folder: an exclusive lock that names its holder and dies with it.

The lock is ``fcntl.flock`` on a file in the output folder, so the kernel releases it when the holding process
ends, however it ends (``kill -9`` included): a killed run never leaves it stuck. The file records who holds it
(host, pid, start time, command), so a second run is refused with a message naming the running one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".dolly-run.lock"


class OutputDirLockedError(RuntimeError):
    """Another run is writing to this output folder."""


def rendezvous() -> str | None:
    """What every rank of one distributed run shares, on every node: its rendezvous address (None alone)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, as the holder wrote it (or what is known when it could not be read)."""
    try:
        holder = json.loads(lock_path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its details yet"


def locked_error(output_dir: str | os.PathLike, lock_path: Path) -> OutputDirLockedError:
    return OutputDirLockedError(
        f"another run is writing to {output_dir} ({describe_holder(lock_path)}); "
        "wait for it to finish or choose another --local-output-dir"
    )


class OutputDirLock:
    """Exclusive, non-blocking lock on ``output_dir`` for the life of a run (a context manager)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise locked_error(self.output_dir, self.path) from None
            # The holder before us may have removed the file between our open and our lock: lock the file that is
            # at the path now, not an unlinked one.
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "rendezvous": rendezvous(),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        logger.info("Locked %s for this run", self.output_dir)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held, so no newcomer locks a stale file
        finally:
            os.close(self._fd)
            self._fd = None

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
def run_lock(output_dir: str | os.PathLike, main_process: bool) -> Iterator[None]:
    """Hold the output folder's lock for the run (main process), or check that no other run holds it (other ranks)."""
    if main_process:
        with OutputDirLock(output_dir):
            yield
    else:
        refuse_if_held_by_another_run(output_dir)
        yield
