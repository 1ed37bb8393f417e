"""Running the trainer CLI in a subprocess, as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from training.launch import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_DIR = Path(__file__).resolve().parent
NOTEBOOK = PROJECT_ROOT / "train_dolly.py"
CELL_SEPARATOR = "\n# COMMAND ----------\n"


def notebook_cells() -> list[str]:
    """The notebook's cells, as Databricks splits its source format."""
    header = "# Databricks notebook source\n"
    text = NOTEBOOK.read_text()
    assert text.startswith(header)
    return [cell.strip("\n") for cell in text[len(header):].split(CELL_SEPARATOR)]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(TEST_DIR), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts leaves its stacks in the output
    env.update(extra)
    return env


def trainer_command(
    args: list[str], *, deepspeed_ranks: int | None = None, module: str = "training.trainer", master_port: int | None = None
) -> list[str]:
    """``python -m MODULE ARGS``, or under ``deepspeed --num_gpus N`` (on a free port) when ``deepspeed_ranks`` is given."""
    if deepspeed_ranks:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(deepspeed_ranks),
                    "--master_addr", "127.0.0.1", "--master_port", str(master_port or free_port())]
        return launcher + ["--module", module] + args
    return [sys.executable, "-m", module] + args


def run_trainer(
    args: list[str],
    *,
    deepspeed_ranks: int | None = None,
    module: str = "training.trainer",
    env: dict[str, str] | None = None,
    timeout: int = 600,
    master_port: int | None = None,
    **popen_kwargs,
) -> subprocess.CompletedProcess:
    """Run the trainer (or a module wrapping it) to the end and capture its output."""
    return subprocess.run(
        trainer_command(args, deepspeed_ranks=deepspeed_ranks, module=module, master_port=master_port), cwd=PROJECT_ROOT,
        env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout, **popen_kwargs,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    """The run exited 0; otherwise the failure shows the ends of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def quick_training_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """A few steps of training with frequent checkpoints, for tests."""
    return [
        "--input-model", str(model_dir), "--training-dataset", str(data), "--local-output-dir", str(output_dir),
        "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "4", "--test-size", "8",
        "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3",
        "--warmup-steps", "0", *extra,
    ]


CPU_ZERO3_CONFIG = PROJECT_ROOT / "config" / "cpu_config.json"


def zero3_run_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """The arguments of the shared 2-rank ZeRO-3 run (conftest's ``zero3_run``), writing to ``output_dir``."""
    return quick_training_args(model_dir, data, output_dir, "--deepspeed", str(CPU_ZERO3_CONFIG), "--seed", "11", *extra)


def lora_run_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """The arguments of the shared 2-rank LoRA run (conftest's ``lora_run``), writing to ``output_dir``."""
    return zero3_run_args(model_dir, data, output_dir, "--lora-r", "8", "--lora-alpha", "16", "--lr", "5e-2", *extra)
