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
- ``signal-group-while-publishing:0``: as the finished model's save begins, rank 0 sends SIGTERM to every process
  of the launch (its process group: the launcher and every rank, as a cluster shutdown does); every rank then pauses
  for :data:`PAUSE_S` inside the save.
- ``kill-while-converting:0``: on a resume on another number of ranks, the main process kills itself (SIGKILL) while
  it converts the checkpoint, :data:`PAUSE_S` into it (the other ranks are waiting for it by then).
- ``packing-check-fails-on-rank:R``: rank R's packing self-check reports a failure (the others' pass).
- ``slow-mlflow-upload:S``: logging the MLflow model (rank 0, while publishing) takes S seconds more, as an upload
  of a large model to a slow store does.

``DOLLY_FAULT_PAUSE_S`` sets :data:`PAUSE_S` (a step longer than a launcher's 30 seconds, say);
``DOLLY_FAULT_SILENT_S`` sets how long a waiting rank gives a silent main process (``handoff.SILENT_LIMIT_S``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

import training.rank.dolly_trainer as dolly_trainer
from training.rank.publish import STAGING_DIR_NAME
from training.rank.stopping import STOP_FILE_NAME, launcher_ancestors
from training.trainer import run_cli

PAUSE_S = float(os.environ.get("DOLLY_FAULT_PAUSE_S", "3"))  # default: beyond the launcher watch's 1-second poll


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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        kind, _ = _fault()
        if kind == "signal-group-while-publishing" and output_dir and Path(output_dir).name == STAGING_DIR_NAME:
            if self.args.process_index == 0:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(PAUSE_S)
        super().save_model(output_dir, _internal_call)

    def _save_rng_state(self, output_dir: str) -> None:
        kind, step = _fault()
        last_rank = self.args.process_index == self.args.world_size - 1
        if kind == "kill-while-saving" and self.state.global_step == step and last_rank:
            _kill_self()
        super()._save_rng_state(output_dir)


def fail_packing_check_on(rank: int) -> None:
    import dataclasses

    import training.rank.packing as packing

    real_check = packing.check_packing

    def check(*args, **kwargs):
        result = real_check(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) != rank:
            return result
        return dataclasses.replace(result, difference=result.scale + 1.0)  # beyond any tolerance

    packing.check_packing = check  # the name the collator choice calls


def kill_while_converting() -> None:
    import training.rank.elastic as elastic

    real_make_loadable_here = elastic._make_loadable_here

    def make_loadable_here(resume):
        if int(os.environ.get("RANK", "0")) == 0:
            time.sleep(PAUSE_S)
            _kill_self()
        real_make_loadable_here(resume)

    elastic._make_loadable_here = make_loadable_here


def slow_mlflow_upload(seconds: float) -> None:
    import training.saved_model.mlflow_model as mlflow_model

    real_log = mlflow_model.log_pipeline_model

    def log_pipeline_model(*args, **kwargs):
        time.sleep(seconds)
        return real_log(*args, **kwargs)

    mlflow_model.log_pipeline_model = log_pipeline_model  # publish imports it from the module when it logs


if __name__ == "__main__":
    dolly_trainer.DollyTrainer = FaultyTrainer  # what run_training builds
    if "DOLLY_FAULT_SILENT_S" in os.environ:
        import training.rank.handoff as handoff

        handoff.SILENT_LIMIT_S = float(os.environ["DOLLY_FAULT_SILENT_S"])
    if _fault()[0] == "kill-while-converting":
        kill_while_converting()
    if _fault()[0] == "packing-check-fails-on-rank":
        fail_packing_check_on(_fault()[1])
    if _fault()[0] == "slow-mlflow-upload":
        slow_mlflow_upload(_fault()[1])
    run_cli()
