"""The trainer as a script file, for Spark's distributors (they run ``torchrun FILE ARGS``, not a module).

``DeepspeedTorchDistributor`` appends ``--deepspeed --deepspeed_config PATH`` to the arguments (the convention of
DeepSpeed's own argument parser); here that becomes the trainer's ``--deepspeed PATH``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def trainer_args(argv: list[str]) -> list[str]:
    """``argv`` with Spark DeepSpeed's ``--deepspeed [--deepspeed_config PATH]`` turned into ``--deepspeed PATH``."""
    args = list(argv)
    if "--deepspeed_config" in args:
        at = args.index("--deepspeed_config")
        config = args[at + 1]
        del args[at : at + 2]
        args = [arg for arg in args if arg != "--deepspeed"] + ["--deepspeed", config]
    elif args and args[-1] == "--deepspeed":  # the distributor's flag without a config
        args = args[:-1]
    return args


if __name__ == "__main__":
    # Run as a file, this folder is first on sys.path; the project root must be there instead, so that the
    # trainer imports as the package it is (and its modules do not shadow top-level ones).
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path[0] = str(HERE.parent)
    else:
        sys.path.insert(0, str(HERE.parent))
    from training.trainer import run_cli

    run_cli(trainer_args(sys.argv[1:]))
