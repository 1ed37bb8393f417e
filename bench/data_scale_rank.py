"""The trainer CLI, noting for bench/data_scale.py when each rank finishes its first optimizer step and how long
each process spends tokenizing: ``--module bench.data_scale_rank`` under a launcher.

Writes under ``$DOLLY_BENCH_DIR``: ``first_step_rank<R>.json`` (the wall-clock time of the first optimizer step's
end) and ``tokenize_<pid>.txt`` (one line per tokenized batch: rank, records, seconds; datasets' worker processes
inherit the rank).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

import training.preprocess as preprocess
import training.rank.dolly_trainer as dolly_trainer
from training.trainer import run_cli

_training_features = preprocess.training_features


def _folder() -> Path:
    return Path(os.environ["DOLLY_BENCH_DIR"])


def timed_training_features(batch, indices=None, *, tokenizer):
    started = time.perf_counter()
    features = _training_features(batch, indices, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    with open(_folder() / f"tokenize_{os.getpid()}.txt", "a") as handle:
        handle.write(f"{os.environ.get('RANK', '0')} {len(batch['instruction'])} {seconds:.6f}\n")
    return features


class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            path = _folder() / f"first_step_rank{args.process_index}.json"
            path.write_text(json.dumps({"first_step_end": time.time()}))


class NotingTrainer(dolly_trainer.DollyTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(FirstStep())


if __name__ == "__main__":
    preprocess.training_features = timed_training_features
    dolly_trainer.DollyTrainer = NotingTrainer  # what run_training builds
    run_cli()
