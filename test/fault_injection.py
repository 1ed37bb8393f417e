"""The trainer CLI with a fault injected at a chosen step, for tests: ``--module fault_injection`` under a launcher.

``DOLLY_FAULT`` picks the fault, each at a deterministic point (``N``: a step number):

- ``kill-after-checkpoint:N``: every rank sends itself SIGKILL as step N+1 begins, after checkpoint-N was marked
  complete.
- ``kill-while-saving:N``: while checkpoint-N is being written, the last rank is killed before it writes its RNG
  state; rank 0 goes on to write its trainer state (so the folder looks whole) and waits at the completion barrier
  until the launcher ends it.
- ``signal-launcher-at:N``: as step N+1 begins, rank 0 sends SIGTERM to the outermost launcher that started the
  ranks (DeepSpeed's ``deepspeed`` runner, or torchrun); every rank then pauses for :data:`PAUSE_S` (a long step), so
  the stop arrives while step N+1 runs.
- ``pause-for-stop-file-at:N``: as step N+1 begins, every rank writes ``OUTPUT/.paused-rankR`` and waits until the
  output folder's stop file appears (the notebook's stop), then the step goes on.
- ``hang-at:N``: as step N+1 begins, every rank sends itself SIGTERM, then sleeps far beyond any grace period (a
  step that never ends), so only the grace period can stop it.
- ``packing-check-fails-on-rank:R``: rank R's packing self-check reports a failure (the others' pass).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

import training.rank.dolly_trainer as dolly_trainer
from training.rank.stopping import STOP_FILE_NAME, launcher_ancestors
from training.trainer import run_cli

PAUSE_S = 3.0  # beyond the launcher watch's 1-second poll


def _fault() -> tuple[str, int]:
    kind, step = os.environ["DOLLY_FAULT"].split(":")
    return kind, int(step)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class AtStepBegin(TrainerCallback):
    """Runs ``action(args)`` once, as step ``step`` + 1 begins."""

    def __init__(self, step: int, action):
        self.step, self.action, self.done = step, action, False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = True
            self.action(args)


def signal_launcher(args) -> None:
    if args.process_index == 0:
        os.kill(launcher_ancestors()[-1].pid, signal.SIGTERM)
    time.sleep(PAUSE_S)


def pause_for_stop_file(args) -> None:
    output = Path(args.output_dir)
    (output / f".paused-rank{args.process_index}").write_text("")
    while not (output / STOP_FILE_NAME).exists():
        time.sleep(0.1)


def hang(args) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(3600)


ACTIONS = {
    "kill-after-checkpoint": lambda args: _kill_self(),
    "signal-launcher-at": signal_launcher,
    "pause-for-stop-file-at": pause_for_stop_file,
    "hang-at": hang,
}


class FaultyTrainer(dolly_trainer.DollyTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kind, step = _fault()
        if kind in ACTIONS:
            self.add_callback(AtStepBegin(step, ACTIONS[kind]))

    def _save_rng_state(self, output_dir: str) -> None:
        kind, step = _fault()
        last_rank = self.args.process_index == self.args.world_size - 1
        if kind == "kill-while-saving" and self.state.global_step == step and last_rank:
            _kill_self()
        super()._save_rng_state(output_dir)


def fail_packing_check_on(rank: int) -> None:
    import dataclasses

    import training.rank.packing_check as packing_check

    real_check = packing_check.check_packing

    def check(*args, **kwargs):
        result = real_check(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) != rank:
            return result
        return dataclasses.replace(result, difference=result.scale + 1.0)  # beyond any tolerance

    packing_check.check_packing = check


if __name__ == "__main__":
    dolly_trainer.DollyTrainer = FaultyTrainer  # what run_training builds
    if _fault()[0] == "packing-check-fails-on-rank":
        fail_packing_check_on(_fault()[1])
    run_cli()
