"""The trainer as a script file, for Spark's distributors (they run ``torchrun FILE ARGS``, not a module).

``DeepspeedTorchDistributor`` appends ``--deepspeed --deepspeed_config PATH`` to the arguments (the convention of
DeepSpeed's own argument parser); here that becomes the trainer's ``--deepspeed PATH``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parents[1]


def trainer_args(argv: list[str]) -> list[str]:
    """``argv`` with Spark DeepSpeed's ``--deepspeed [--deepspeed_config PATH]`` turned into the trainer's
    ``--deepspeed PATH`` (parsed as options, so they may come anywhere)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--deepspeed", action="store_true")  # DeepSpeed's "use DeepSpeed" switch
    parser.add_argument("--deepspeed_config", default=None)
    distributor, trainer = parser.parse_known_args(argv)
    return trainer + (["--deepspeed", distributor.deepspeed_config] if distributor.deepspeed_config else [])


if __name__ == "__main__":
    # Run as a file, this folder is first on sys.path; the project root must be there instead, so that the
    # trainer imports as the package it is (and its modules do not shadow top-level ones).
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path[0] = str(PROJECT_ROOT)
    else:
        sys.path.insert(0, str(PROJECT_ROOT))
    from training.trainer import run_cli

    run_cli(trainer_args(sys.argv[1:]))
