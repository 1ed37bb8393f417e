"""Running the trainer CLI in a subprocess, as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_trainer(args: list[str], *, deepspeed_ranks: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m training.trainer ARGS``, or under ``deepspeed --num_gpus N`` when ``deepspeed_ranks`` is given."""
    if deepspeed_ranks:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(deepspeed_ranks)]
        command = launcher + ["--module", "training.trainer"] + args
    else:
        command = [sys.executable, "-m", "training.trainer"] + args
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def quick_training_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """A few steps of training with frequent checkpoints, for tests."""
    return [
        "--input-model", str(model_dir), "--training-dataset", str(data), "--local-output-dir", str(output_dir),
        "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "4", "--test-size", "8",
        "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3",
        "--warmup-steps", "0", *extra,
    ]
