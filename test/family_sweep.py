"""Several models trained one after another in the same ranks: ``--module family_sweep`` under a launcher, for
test/test_families.py (one launch for every family, instead of one launch each).

``DOLLY_SWEEP`` is a JSON list of ``[model_dir, output_dir]``; every other argument is the trainer's command line,
given to each training with the model and output folder replaced.
"""

from __future__ import annotations

import json
import os
import sys

from accelerate.state import AcceleratorState

from training.logs import configure_logging
from training.rank.distributed import exit_after_success, leave_process_group
from training.settings import TrainSettings, given_settings
from training.trainer import main, train


def sweep() -> None:
    configure_logging()
    for model_dir, output_dir in json.loads(os.environ["DOLLY_SWEEP"]):
        args = [*sys.argv[1:], "--input-model", model_dir, "--local-output-dir", output_dir]
        train(TrainSettings(**given_settings(main.make_context("trainer", args))))
        # accelerate takes one DeepSpeed plugin per process: forget this run's (the process group stays).
        AcceleratorState._reset_state(reset_partial_state=False)
    if leave_process_group():
        exit_after_success()


if __name__ == "__main__":
    sweep()
