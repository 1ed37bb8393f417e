"""A log a person can read, in every process: the notebook's and each training rank's.

- **Each line once.** Global rank 0 logs; the other ranks log only their warnings and errors, each line marked with
  its rank (``[rank 1]``). The same holds for DeepSpeed's own logger, which prints on every rank.
- **Nothing a user cannot act on.** A few library messages are filtered, each by its exact message and the logger
  or module that emits it, with the reason beside it. Nothing is filtered more broadly.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
RANK_LOG_FORMAT = "%(asctime)s %(levelname)s [rank {rank}] [%(name)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
DEEPSPEED_LOGGER = "DeepSpeed"


@dataclass(frozen=True)
class UnactionableMessage:
    """A library log record nobody can act on: its logger, and its message (``record.msg``) matched in full: a
    message template exactly, or ``pattern`` for a message the library formats itself (numbers in it)."""

    logger: str
    message: str
    reason: str
    pattern: bool = False

    def matches(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return False
        if self.pattern:
            return re.fullmatch(self.message, record.msg) is not None
        return record.msg == self.message


UNACTIONABLE_MESSAGES = (
    UnactionableMessage(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
        "kernels` and the kernels >= 0.11.1",
        "bitsandbytes looks for an optional CPU kernel on the Hugging Face hub at every import, on CPUs with "
        "AVX512-BF16. It only speeds up 4-bit products on CPU, works without it, and training nodes need not reach "
        "the hub, so installing `kernels` would not help.",
    ),
    UnactionableMessage(
        DEEPSPEED_LOGGER,
        "Attempting to get learning rate from scheduler before it has started",
        "The Trainer reads the learning rate for its first log before DeepSpeed's scheduler has stepped; the rate it "
        "logs is right.",
    ),
    UnactionableMessage(
        "accelerate.accelerator",
        r"(\[RANK \d+\] )?Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has "
        r"\d+\. Using DeepSpeed's value\.",
        "The Trainer accumulates gradients itself and gives accelerate 1 on purpose (transformers' trainer.py), then "
        "accelerate notes that DeepSpeed's config has the real count; DeepSpeed's value is the one used.",
        pattern=True,
    ),
)


@dataclass(frozen=True)
class UnactionableWarning:
    """A library ``warnings.warn`` nobody can act on: its category, the module it is attributed to, and its text."""

    category: type[Warning]
    module: str
    message: str
    reason: str


_DEPRECATED_BY_DEEPSPEED = "DeepSpeed's communication layer calls torch's old name; nothing in this project does."
UNACTIONABLE_WARNINGS = (
    UnactionableWarning(
        FutureWarning,
        "torch.distributed.c10d_logger",
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` "
        "instead.",
        _DEPRECATED_BY_DEEPSPEED,
    ),
    UnactionableWarning(
        FutureWarning,
        "torch.distributed.c10d_logger",
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` "
        "instead.",
        _DEPRECATED_BY_DEEPSPEED,
    ),
)


class DropUnactionable(logging.Filter):
    """Drops the records of :data:`UNACTIONABLE_MESSAGES` that belong to this filter's logger."""

    def __init__(self, logger_name: str):
        super().__init__()
        self.messages = [item for item in UNACTIONABLE_MESSAGES if item.logger == logger_name]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(item.matches(record) for item in self.messages)


class OtherRankLines(logging.Filter):
    """On a rank other than 0: only warnings and errors pass, each marked with the rank (for loggers with their own
    handler, such as DeepSpeed's, whose format this project does not set)."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


def launcher_rank() -> int:
    """The global rank the launcher gave this process (0 for the notebook and a lone process)."""
    return int(os.environ.get("RANK", "0"))


def filter_unactionable() -> None:
    """Install the filters for :data:`UNACTIONABLE_MESSAGES` and :data:`UNACTIONABLE_WARNINGS` (once; the package
    does it on import, before any library it uses is imported and logs)."""
    for name in {item.logger for item in UNACTIONABLE_MESSAGES}:
        library_logger = logging.getLogger(name)
        if not any(isinstance(existing, DropUnactionable) for existing in library_logger.filters):
            library_logger.addFilter(DropUnactionable(name))
    for item in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(item.message), category=item.category, module=item.module)


def configure_logging(rank: int | None = None) -> None:
    """Set up logging for this process (the CLI, the notebook, a benchmark): call once, before the run logs."""
    rank = launcher_rank() if rank is None else rank
    main = rank == 0
    logging.basicConfig(
        format=LOG_FORMAT if main else RANK_LOG_FORMAT.format(rank=rank),
        datefmt=DATE_FORMAT,
        level=logging.INFO if main else logging.WARNING,
    )
    filter_unactionable()
    if not main:
        # DeepSpeed's logger keeps its own handler and level (set when DeepSpeed is imported); a filter on the logger
        # itself survives that.
        logging.getLogger(DEEPSPEED_LOGGER).addFilter(OtherRankLines(rank))
        quiet_libraries_on_other_ranks()
        for handler in logging.getLogger("transformers").handlers:  # its records reach its own handler, not ours
            handler.addFilter(OtherRankLines(rank))


def quiet_libraries_on_other_ranks() -> None:
    """transformers' and datasets' own loggers and progress bars, as rank 0 alone shows them."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()  # also creates transformers' own handler
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
