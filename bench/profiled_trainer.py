"""The trainer CLI with ``torch.profiler`` around a few optimizer steps: ``--module bench.profiled_trainer`` under a
launcher, for bench/profile_launcher.py.

``DOLLY_PROFILE="FIRST:COUNT:FOLDER"`` profiles steps FIRST .. FIRST+COUNT-1 (counted from 1) on every rank and
writes ``FOLDER/rank<N>.json``: the wall seconds of those steps, the intra-op threads, each operator's self CPU
time (time inside the operator itself, not its children) summed over its calls, and the token positions the rank
computed in each of those steps (padding included: what its compute follows).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import training.rank.dolly_trainer as dolly_trainer
from training.trainer import run_cli


class ProfileSteps(TrainerCallback):
    def __init__(self, first: int, count: int, folder: Path):
        self.first, self.last, self.folder = first, first + count - 1, folder
        self.profiler: torch.profiler.profile | None = None
        self.started = 0.0
        self.positions_per_step: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
            self.started = time.perf_counter()
        if self.profiler is not None:
            self.positions_per_step.append(0)

    def count(self, positions: int) -> None:
        if self.profiler is not None:
            self.positions_per_step[-1] += positions

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != self.last:
            return
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        operators = {
            event.key: {"self_cpu_seconds": event.self_cpu_time_total / 1e6, "calls": event.count}
            for event in self.profiler.key_averages()
        }
        self.profiler = None
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{args.process_index}.json").write_text(
            json.dumps(
                {
                    "steps": [self.first, self.last],
                    "wall_seconds": wall,
                    "intra_op_threads": torch.get_num_threads(),
                    "operators": operators,
                    "positions_per_step": self.positions_per_step,
                }
            )
        )


class ProfiledTrainer(dolly_trainer.DollyTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        first, count, folder = os.environ["DOLLY_PROFILE"].split(":", 2)
        self.profile = ProfileSteps(int(first), int(count), Path(folder))
        self.add_callback(self.profile)

    def training_step(self, model, inputs, *args, **kwargs):
        self.profile.count(inputs["input_ids"].numel())
        return super().training_step(model, inputs, *args, **kwargs)


if __name__ == "__main__":
    dolly_trainer.DollyTrainer = ProfiledTrainer  # what run_training builds
    run_cli()
