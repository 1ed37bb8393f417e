"""Folders that are complete when their marker says so: commits that hold on object storage.

A prepared dataset, a table's copy and a checkpoint are written file by file, then marked complete by a marker file
written last that names every file in the folder and its size. Readers check the marker, never the folder's
existence: on Unity Catalog volumes and DBFS (FUSE over object storage) a folder rename is a copy then a delete, so
a reader can see the renamed folder, and even its marker, before all of its files have arrived; the marker's list
says which files and sizes to wait for.

A folder is built under a private ``.building-<name>@<host>@<pid>`` name beside its final place; one whose owner
process is gone (a SIGTERM before the clean-up, a killed driver) is swept by the next build in the same place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER_NAME = "_dolly_complete.json"
BUILDING_PREFIX = ".building-"
# A building folder of a process on another host cannot be checked for life: swept when untouched this long.
FOREIGN_BUILD_STALE_SECONDS = 24 * 3600


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees either nothing or all of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def manifest(folder: Path, marker_name: str = MARKER_NAME) -> dict[str, int]:
    """Every file under ``folder`` (but the marker and temporary files) by its relative path, with its size."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != marker_name and not path.name.endswith(".tmp"):
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def mark_complete(folder: str | os.PathLike, marker_name: str = MARKER_NAME, **facts: Any) -> dict[str, Any]:
    """Write the folder's marker, last: ``facts`` and every file with its size. Returns what it wrote."""
    folder = Path(folder)
    record = {**facts, "files": manifest(folder, marker_name)}
    write_atomically(folder / marker_name, json.dumps(record) + "\n")
    return record


def read_marker(folder: str | os.PathLike, marker_name: str = MARKER_NAME) -> dict[str, Any] | None:
    """The marker's record if the folder is complete: the marker is there, whole, and every file it names is there
    with its size. None otherwise (also while a copy is still arriving). A marker written before markers named
    their files (no ``files``) is taken as it is."""
    folder = Path(folder)
    try:
        record = json.loads((folder / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    for name, size in record.get("files", {}).items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return record


def is_complete(folder: str | os.PathLike, marker_name: str = MARKER_NAME) -> bool:
    return read_marker(folder, marker_name) is not None


def building_folder(target: Path) -> Path:
    """A private folder beside ``target`` to build it in, naming its owner (host and pid)."""
    return target.with_name(f"{BUILDING_PREFIX}{target.name}@{socket.gethostname()}@{os.getpid()}")


def commit(building: Path, target: Path, marker_name: str = MARKER_NAME, *, replace: bool = False) -> bool:
    """Move a marked ``building`` folder to ``target``. Returns False (and removes ``building``) when another process
    committed a complete ``target`` first; a ``target`` left incomplete by an interrupted copy is replaced. With
    ``replace``, a complete ``target`` is replaced too (moved aside first, removed after)."""
    if read_marker(building, marker_name) is None:
        raise RuntimeError(f"{building} is not marked complete: mark it before committing it")
    if replace and target.exists():
        aside = target.with_name(f"{BUILDING_PREFIX}{target.name}-replaced@{socket.gethostname()}@{os.getpid()}")
        target.rename(aside)
        try:
            building.rename(target)
        except OSError:
            aside.rename(target)  # the earlier copy stays
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return True
    for _ in range(2):
        try:
            building.rename(target)
            return True
        except OSError:
            if is_complete(target, marker_name):
                shutil.rmtree(building, ignore_errors=True)
                return False
            # An incomplete target: a rename (copy then delete) cut short. Ours replaces it.
            logger.warning("Replacing %s: it was left incomplete", target)
            shutil.rmtree(target, ignore_errors=True)
    raise OSError(f"could not move {building} to {target}")


def _owner_gone(host: str, pid: int, folder: Path) -> bool:
    if host != socket.gethostname():
        return time.time() - folder.stat().st_mtime > FOREIGN_BUILD_STALE_SECONDS
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # The pid is alive: it is the owner only if it started before the folder was made (pids are reused).
    try:
        started = os.stat(f"/proc/{pid}").st_mtime
    except OSError:
        return False
    return started > folder.stat().st_mtime + 1


def sweep_abandoned_builds(parent: str | os.PathLike) -> list[Path]:
    """Remove the ``.building-*`` folders in ``parent`` whose owner is gone (on this host: its pid has ended, or is
    now another process; on another host: untouched for a day), each with a log line. Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for folder in parent.glob(f"{BUILDING_PREFIX}*"):
        try:
            _, host, pid = folder.name.rsplit("@", 2)
            gone = _owner_gone(host, int(pid), folder)
        except (ValueError, OSError):
            continue
        if gone:
            logger.info("Removing %s: its build was abandoned (owner pid %s on %s is gone)", folder, pid, host)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
