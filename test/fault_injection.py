"""The trainer CLI with a fault injected at a chosen step, for tests: ``--module fault_injection`` under a launcher.

``DOLLY_FAULT`` picks the fault (a real SIGKILL, sent by each rank to itself at a deterministic point):

- ``kill-after-checkpoint:N``: every rank is killed as step N+1 begins, after checkpoint-N was marked complete.
- ``kill-while-saving:N``: while checkpoint-N is being written, the last rank is killed before it writes its RNG
  state; rank 0 goes on to write its trainer state (so the folder looks whole) and waits at the completion barrier
  until the launcher ends it.
"""

from __future__ import annotations

import logging
import os
import signal

from transformers import TrainerCallback

import training.trainer as trainer_module


def _fault() -> tuple[str, int]:
    kind, step = os.environ["DOLLY_FAULT"].split(":")
    return kind, int(step)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            _kill_self()


class FaultyTrainer(trainer_module.DollyTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kind, step = _fault()
        if kind == "kill-after-checkpoint":
            self.add_callback(KillAfterCheckpoint(step))

    def _save_rng_state(self, output_dir: str) -> None:
        kind, step = _fault()
        last_rank = self.args.process_index == self.args.world_size - 1
        if kind == "kill-while-saving" and self.state.global_step == step and last_rank:
            _kill_self()
        super()._save_rng_state(output_dir)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    trainer_module.DollyTrainer = FaultyTrainer
    trainer_module.main()
