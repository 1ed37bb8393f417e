"""Throughput where users train: Dolly's recipe and ours, each under ``deepspeed --num_gpus 2`` with ZeRO-3.

    python -m bench.throughput_deepspeed [--model embedded] [--train-records 120] [--batch-size 6]

Every arm runs the real trainer CLI (``--module training.trainer``) in a launch of its own, with the same records,
the same global batch (``--batch-size`` split over the ranks), one epoch, the same learning rate and
``config/cpu_config.json`` (on a GPU machine, pass another config). Two batchings:

- original: ``--no-packing``, Dolly's batches: each batch padded to its longest record (multiple of 8).
- ours: the default, padding-free packing with per-record attention and response-only logits.

each with the step's records split over the ranks two ways (``--runs ARM:BALANCE,...`` picks the launches):

- unbalanced: ``--no-balance-ranks``, as the Trainer deals them (Dolly's recipe is ``original, unbalanced``);
- balanced: the default, each rank about the same work (``training/rank/dolly_trainer.py``).

Useful tokens per second across both ranks = the Trainer's own count of non-padding input tokens
(``num_input_tokens_seen``, gathered over ranks) / its ``train_runtime``. Results go to
bench/results/throughput_deepspeed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, default_dataset, result_header, split_records, write_json
from bench.throughput import resolve_model
from training.driver.launch import free_port
from training.logs import configure_logging

logger = logging.getLogger(__name__)

ARMS = {"original": ["--no-packing"], "ours": []}
BALANCE = {"unbalanced": ["--no-balance-ranks"], "balanced": []}
DOLLYS_RECIPE = "original, unbalanced"


def launch_arm(
    arm: str,
    options: argparse.Namespace,
    data: Path,
    out: Path,
    *,
    module: str = "training.trainer",
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One arm in its own DeepSpeed launch (of ``module``, with ``extra`` flags and ``env`` on top of this one's),
    writing to ``out``; its figures from the trainer state it saved."""
    per_device = options.batch_size // options.ranks
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(options.ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        module,
        "--input-model",
        resolve_model(options.model),
        "--training-dataset",
        str(data),
        "--local-output-dir",
        str(out),
        "--deepspeed",
        str(options.deepspeed),
        "--epochs",
        "1",
        "--per-device-train-batch-size",
        str(per_device),
        "--test-size",
        "0",
        "--save-steps",
        "100000",
        "--logging-steps",
        "5",
        "--lr",
        str(options.lr),
        "--warmup-steps",
        "0",
        "--max-length",
        str(options.max_length),
        "--seed",
        str(options.seed),
        "--no-mlflow",
        *ARMS[arm],
        *extra,
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{completed.stderr[-4000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    summary = next(entry for entry in reversed(state["log_history"]) if "train_runtime" in entry)
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return {
        "arm": arm,
        "flags": [*ARMS[arm], *extra],
        "useful_tokens": summary["num_input_tokens_seen"],
        "train_runtime_seconds": summary["train_runtime"],
        "launch_wall_seconds": wall,
        "useful_tokens_per_second": summary["num_input_tokens_seen"] / summary["train_runtime"],
        "optimizer_steps": state["global_step"],
        "final_training_loss": losses[-1] if losses else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--training-dataset", default=default_dataset())
    parser.add_argument("--train-records", type=int, default=120)
    parser.add_argument("--eval-records", type=int, default=40, help="held out first, as bench.throughput does")
    parser.add_argument("--batch-size", type=int, default=6, help="records per optimizer step, over all ranks")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--deepspeed", type=Path, default=PROJECT_ROOT / "config" / "cpu_config.json")
    parser.add_argument(
        "--runs",
        default=",".join(f"{arm}:{balance}" for balance in BALANCE for arm in ARMS),
        help="comma-separated ARM:BALANCE launches, in order (default: all four)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "throughput_deepspeed.json")
    options = parser.parse_args(argv)
    if options.batch_size % options.ranks:
        parser.error(f"--batch-size {options.batch_size} does not split over {options.ranks} ranks")
    options.runs = [tuple(run.split(":")) for run in options.runs.split(",")]
    for run in options.runs:
        if len(run) != 2 or run[0] not in ARMS or run[1] not in BALANCE:
            parser.error(
                f"--runs: {':'.join(run)!r} is not ARM:BALANCE with ARM in {list(ARMS)}, BALANCE in {list(BALANCE)}"
            )
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    options = parse_args(argv)
    train, _ = split_records(options.training_dataset, options.eval_records, options.train_records, options.seed)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "records.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in train))
        for arm, balance in options.runs:
            name = f"{arm}, {balance}"
            logger.info("Arm %s", name)
            results[name] = launch_arm(arm, options, data, Path(scratch) / f"{arm}-{balance}", extra=BALANCE[balance])
    payload: dict[str, Any] = {
        **result_header("bench.throughput_deepspeed", argv),
        "model": options.model,
        "training_dataset": Path(options.training_dataset).name,
        "train_records": len(train),
        "ranks": options.ranks,
        "batch_size": options.batch_size,
        "deepspeed_config": options.deepspeed.name,
        "arms": results,
    }
    speed = {name: result["useful_tokens_per_second"] for name, result in results.items()}
    comparisons = {
        "ours / Dolly's recipe": ("ours, balanced", DOLLYS_RECIPE),
        "ours, unbalanced / Dolly's recipe": ("ours, unbalanced", DOLLYS_RECIPE),
        "Dolly's batches, balanced / unbalanced": ("original, balanced", "original, unbalanced"),
        "ours, balanced / unbalanced": ("ours, balanced", "ours, unbalanced"),
    }
    payload["ratios"] = {
        label: speed[a] / speed[b] for label, (a, b) in comparisons.items() if a in speed and b in speed
    }
    if "ours / Dolly's recipe" in payload["ratios"]:
        payload["ratio_vs_original"] = payload["ratios"]["ours / Dolly's recipe"]
    write_json(options.out, payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "arms"}, indent=2))
    return payload


if __name__ == "__main__":
    main()
