"""Running the trainer CLI in a subprocess, as users do."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training.driver.launch import free_port
from training.rank.saving import is_finished_output

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_DIR = Path(__file__).resolve().parent
NOTEBOOK = PROJECT_ROOT / "train_dolly.py"
CELL_SEPARATOR = "\n# COMMAND ----------\n"


def notebook_cells() -> list[str]:
    """The notebook's cells, as Databricks splits its source format."""
    header = "# Databricks notebook source\n"
    text = NOTEBOOK.read_text()
    assert text.startswith(header)
    return [cell.strip("\n") for cell in text[len(header) :].split(CELL_SEPARATOR)]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), str(TEST_DIR), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts leaves its stacks in the output
    env.update(extra)
    return env


# Set by conftest for each test: whether it is marked to start ranks (``launch`` or ``smoke``).
LAUNCH_ALLOWED = False


def trainer_command(
    args: list[str],
    *,
    ranks: int | None = None,
    launcher: str = "torchrun",
    module: str = "training.trainer",
    master_port: int | None = None,
    shared_run: bool = False,
) -> list[str]:
    """``python -m MODULE ARGS``, or ``ranks`` ranks of it under a launcher on a free port: torchrun (the quickest to
    start, for tests of what the ranks do), or DeepSpeed's ``deepspeed`` runner, as the notebook starts them (for
    tests of that launcher and of exit codes it passes on).

    Ranks start only for a test marked ``launch`` (or ``smoke``) or for a shared run (conftest's fixtures), so the fast
    tier cannot grow a launch unnoticed.
    """
    if not ranks:
        return [sys.executable, "-m", module] + args
    assert LAUNCH_ALLOWED or shared_run, "this test starts ranks: mark it @pytest.mark.launch (full tier)"
    port = str(master_port or free_port())
    if launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
        command += ["--master_addr", "127.0.0.1", "--master_port", port, "--module", module]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks)]
        command += ["--master-addr", "127.0.0.1", "--master-port", port, "-m", module]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    return command + args


def run_trainer(
    args: list[str],
    *,
    ranks: int | None = None,
    launcher: str = "torchrun",
    module: str = "training.trainer",
    env: dict[str, str] | None = None,
    timeout: int = 600,
    master_port: int | None = None,
    shared_run: bool = False,
    **popen_kwargs,
) -> subprocess.CompletedProcess:
    """Run the trainer (or a module wrapping it) to the end and capture its output."""
    command = trainer_command(
        args, ranks=ranks, launcher=launcher, module=module, master_port=master_port, shared_run=shared_run
    )
    return subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=subprocess_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_kwargs,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    """The run exited 0; otherwise the failure shows the ends of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def quick_training_args(model_dir: Path, data: Path, output_dir: Path, *extra: str, mlflow: bool = False) -> list[str]:
    """A few steps of training with frequent checkpoints, for tests (short sample answers: a tiny model under ZeRO-3
    takes about a second per 16 new tokens). MLflow only where the test reads it (``mlflow=True``): tracking and
    logging the model cost rank 0, and so every rank, a few seconds per run."""
    options = {
        "--input-model": model_dir,
        "--training-dataset": data,
        "--local-output-dir": output_dir,
        "--per-device-train-batch-size": 4,
        "--per-device-eval-batch-size": 4,
        "--test-size": 8,
        "--max-steps": 4,
        "--eval-steps": 2,
        "--save-steps": 2,
        "--logging-steps": 1,
        "--lr": "1e-3",
        "--warmup-steps": 0,
        "--eval-answer-tokens": 8,
    }
    tracking = [] if mlflow else ["--no-mlflow"]
    return [str(part) for option in options.items() for part in option] + tracking + list(extra)


CPU_ZERO3_CONFIG = PROJECT_ROOT / "config" / "cpu_config.json"


def zero3_run_args(model_dir: Path, data: Path, output_dir: Path, *extra: str, mlflow: bool = False) -> list[str]:
    """The arguments of the shared 2-rank ZeRO-3 run (conftest's ``zero3_run``), writing to ``output_dir``."""
    return quick_training_args(
        model_dir, data, output_dir, "--deepspeed", str(CPU_ZERO3_CONFIG), "--seed", "11", *extra, mlflow=mlflow
    )


def lora_run_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """The arguments of the shared 2-rank LoRA run (conftest's ``lora_run``), writing to ``output_dir``."""
    return zero3_run_args(model_dir, data, output_dir, "--lora-r", "8", "--lora-alpha", "16", "--lr", "5e-2", *extra)


@dataclass
class InProcessRun:
    """What :func:`invoke_trainer` saw: the CLI's exit code, its exception, and everything it printed and logged."""

    exit_code: int
    exception: BaseException | None
    log: str


def invoke_trainer(args: list[str]) -> InProcessRun:
    """Run the trainer CLI in this process (no launcher: one rank), as ``python -m training.trainer ARGS`` would, but
    without a new interpreter's start-up. For tests of the trainer's own logic; launches use :func:`run_trainer`."""
    from click.testing import CliRunner

    from training.trainer import main

    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        root.removeHandler(handler)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    failure = "".join(traceback.format_exception(exception)) if exception is not None else ""
    return InProcessRun(result.exit_code, exception, result.output + records.getvalue() + failure)


def assert_finished(run: InProcessRun) -> None:
    """The in-process run exited 0; otherwise the failure shows the end of its log."""
    assert run.exit_code == 0, run.log[-6000:]


# ---- resumed runs against uninterrupted ones ----

TRAIN_LOSS_LINE = "{'loss':"


def max_weight_difference(first: Path, second: Path) -> float:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def logged(output_dir: Path, key: str) -> dict[int, float]:
    """``key`` (``loss``, ``learning_rate``) per step, from the finished model's trainer state."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def assert_resumed_like_uninterrupted(
    reference: Path,
    resumed_out: Path,
    resumed: subprocess.CompletedProcess,
    resumed_from: int,
    steps: int,
    weights: str = "model.safetensors",
    tolerance: float = 1e-5,
) -> None:
    """The resumed run ran only the remaining steps and ended with the reference's weights (within ``tolerance``),
    losses and learning rates."""
    log = resumed.stdout + resumed.stderr
    assert f"Resuming from {resumed_out / f'checkpoint-{resumed_from}'}" in log
    # Only the remaining steps ran in the resumed process (one loss line per step).
    assert log.count(TRAIN_LOSS_LINE) == steps - resumed_from, log[-4000:]
    assert is_finished_output(resumed_out)
    assert max_weight_difference(reference / weights, resumed_out / weights) <= tolerance
    # Same losses and learning rates after the resume point: data order, schedule and RNG continued.
    reference_losses, resumed_losses = logged(reference, "loss"), logged(resumed_out, "loss")
    assert sorted(resumed_losses) == list(range(1, steps + 1))
    for step in range(resumed_from + 1, steps + 1):
        assert resumed_losses[step] == pytest.approx(reference_losses[step], abs=tolerance)
    assert logged(resumed_out, "learning_rate") == logged(reference, "learning_rate")


def run_killed(args: list[str], fault: str, ranks: int = 2, shared_run: bool = False) -> None:
    """Run on ``ranks`` ranks until ``fault`` kills them; the folder must not look finished afterwards."""
    killed = run_trainer(args, ranks=ranks, module="fault_injection", env={"DOLLY_FAULT": fault}, shared_run=shared_run)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not is_finished_output(Path(args[args.index("--local-output-dir") + 1]))


def copy_run(folder: Path, destination: Path) -> Path:
    """A copy of a (stopped) run's output folder, to resume without touching the shared one."""
    import shutil

    shutil.copytree(folder, destination)
    return destination


def run_example(name: str, *args: str, capsys, monkeypatch) -> str:
    """Run ``examples/NAME`` in this process (as ``python examples/NAME ARGS`` would, without the start-up of a new
    interpreter) and return what it printed."""
    import runpy

    script = PROJECT_ROOT / "examples" / name
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # as python puts the script's folder first
    level = logging.getLogger().level
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        logging.getLogger().setLevel(level)  # an example may quiet the log
    return capsys.readouterr().out


# ---- several "nodes" on the loopback address ----

NODES = 2


def torchrun_node(rank: int, port: int, args: list[str], module: str = "training.trainer") -> list[str]:
    """torchrun's command for node ``rank`` of :data:`NODES` on the loopback address, one rank per node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(NODES),
        "--node-rank",
        str(rank),
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        module,
        *args,
    ]


def start_nodes(commands: list[list[str]], logs: Path, **env: str) -> list[subprocess.Popen]:
    """Start one launcher per "node", each logging to ``logs/nodeR.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=subprocess_env(**env),
            stdout=open(logs / f"node{rank}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for rank, command in enumerate(commands)
    ]


def wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for node in nodes:
        try:
            codes.append(node.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    return codes


def node_logs(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-4000:]}" for path in sorted(logs.glob("*.log")))
