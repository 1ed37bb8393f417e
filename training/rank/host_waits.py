"""Counting the times the host waits for the device in each optimizer step (``--count-host-waits``).

On a GPU every ``.item()``, ``.tolist()``, ``nonzero`` or pageable copy of a device tensor makes the host wait until
the device has finished the work queued before it, and the next kernels are launched only after that. PyTorch
reports each such wait when ``torch.cuda.set_sync_debug_mode("warn")`` is on; this callback counts the reports
between the ends of consecutive optimizer steps, notes where each comes from (the Python line that called the op),
and writes ``host_waits.json`` into the output folder at the end of training (main process). Without CUDA there is
nothing to count, and the file says so.
"""

from __future__ import annotations

import collections
import json
import logging
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .distributed import is_main_process

logger = logging.getLogger(__name__)

FILE_NAME = "host_waits.json"
SYNC_MESSAGE = "called a synchronizing CUDA operation"


class HostWaitCounter(TrainerCallback):
    """Counts host waits per optimizer step (see the module's docstring)."""

    def __init__(self):
        self.per_step: list[int] = []
        self.where: collections.Counter[str] = collections.Counter()
        self._current = 0
        self._showwarning = None
        self._filters = None
        self.active = torch.cuda.is_available()

    def _count(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_MESSAGE in str(message):
            self._current += 1
            self.where[f"{filename}:{lineno}"] += 1
            return
        self._showwarning(message, category, filename, lineno, file, line)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if not self.active:
            return
        self._filters = warnings.filters[:]
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}.*")  # every wait, not the first per line
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._count
        torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.per_step.append(self._current)  # the first step also holds the waits of starting to train
        self._current = 0

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.active:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning
            warnings.filters[:] = self._filters
        if is_main_process():
            path = Path(args.output_dir) / FILE_NAME
            path.write_text(json.dumps(self.summary(), indent=2) + "\n")
            logger.info("Host waits per optimizer step written to %s", path)

    def summary(self) -> dict[str, Any]:
        if not self.active:
            return {"measured": False, "reason": "no CUDA device: the host never waits for one"}
        steady = self.per_step[1:] or self.per_step
        return {
            "measured": True,
            "per_step": self.per_step,
            "median_after_first_step": statistics.median(steady) if steady else None,
            "where": dict(self.where.most_common()),
        }
