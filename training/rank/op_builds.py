"""No hung launches: torch's build locks that nobody holds any more are cleared before DeepSpeed builds its ops.

DeepSpeed compiles some ops the first time a run needs them (its CPU communication op on CPU ranks, ``cpu_adam`` for
the configs that offload the optimizer), through ``torch.utils.cpp_extension``, which guards each build folder
with a ``lock`` file: the builder creates it, holds it open while it builds, and removes it when done; everyone
else waits for the file to go. A builder killed part-way (a launch stopped during its first build) leaves the file
behind, and every later launch then waits for it forever. A lock that no process has open, seen twice a moment
apart, is such a leftover: it is removed, with a warning. A lock a live process holds is a build in progress: the
log says which process this launch will wait for.

"No process has it open" can only be known of this machine's processes, so builds go to a folder of this host's
own (torch's default build folder with the host name below it, unless ``TORCH_EXTENSIONS_DIR`` says otherwise: a
home folder shared by nodes would make another node's build look abandoned), and only each node's local rank 0
clears its locks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "lock"
# torch removes the lock right after closing it: a lock seen without a holder twice, this far apart, is a leftover.
SECOND_LOOK_S = 0.5


def extensions_root() -> Path:
    """Where torch builds extensions (``TORCH_EXTENSIONS_DIR``, else its default under the user's cache)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def use_host_build_folder() -> Path:
    """Point torch's builds at this host's own folder (unless ``TORCH_EXTENSIONS_DIR`` is set); return it."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from torch.utils.cpp_extension import get_default_build_root

        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(get_default_build_root()) / socket.gethostname())
    return extensions_root()


def prepare_op_builds() -> list[Path]:
    """Before DeepSpeed builds anything, on every rank: this host's build folder; on local rank 0: its dead locks
    cleared (:func:`clear_dead_build_locks`). Returns the locks removed."""
    root = use_host_build_folder()
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return []
    return clear_dead_build_locks(root)


def build_locks(root: Path) -> list[Path]:
    """The build locks under ``root`` (``root/<python-cuda>/<op>/lock``, or ``root/<op>/lock``)."""
    if not root.is_dir():
        return []
    return sorted({*root.glob(f"*/{LOCK_NAME}"), *root.glob(f"*/*/{LOCK_NAME}")})


def lock_holders(locks: list[Path]) -> dict[Path, list[int]]:
    """For each lock, the processes (of this machine, visible to this user) that have it open."""
    import psutil

    wanted = {os.path.realpath(lock): lock for lock in locks}
    holders: dict[Path, list[int]] = {lock: [] for lock in locks}
    for process in psutil.process_iter():
        try:
            for opened in process.open_files():
                if opened.path in wanted:
                    holders[wanted[opened.path]].append(process.pid)
        except psutil.Error:
            continue
    return holders


def clear_dead_build_locks(root: Path | None = None) -> list[Path]:
    """Remove the build locks under ``root`` that no live process holds; log the ones a live build holds.
    Returns the locks removed."""
    root = extensions_root() if root is None else root
    locks = build_locks(root)
    if not locks:
        return []
    unheld = [lock for lock, pids in lock_holders(locks).items() if not pids]
    for lock, pids in lock_holders([lock for lock in locks if lock not in unheld]).items():
        logger.warning(
            "Op %s is being built by pid %s; this launch waits for that build",
            lock.parent.name,
            ", ".join(map(str, pids)),
        )
    if not unheld:
        return []
    time.sleep(SECOND_LOOK_S)
    removed = []
    for lock, pids in lock_holders([lock for lock in unheld if lock.exists()]).items():
        if pids:
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        logger.warning(
            "Removed %s: a build lock its builder left when it was stopped; %s will be built again",
            lock,
            lock.parent.name,
        )
    return removed
