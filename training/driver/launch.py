"""Starting a launch plan's processes from the notebook, and telling the truth about how they ended.

The DeepSpeed launcher's and torchrun's command lines are written here, from the plan, where they are started (Spark's
path is ``training.driver.spark``). The launcher's output is streamed through unchanged (progress bars included) while
its tail is kept. If it fails, the error names the failing rank's exception, not a later "no model found"; if it
exits 0, the output folder must hold a finished model.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from ..rank.saving import is_finished_output
from ..settings import command_line
from .launch_outcome import (
    TrainingFailedError,
    TrainingStopped,
    failure_summary,
    published_since,
    ranks_reported_a_stop,
    request_stop,
    stopped_error,
    wait_stopping_on_interrupt,
)
from .launch_records import record_launch, warn_about_running_launches
from .plan import LaunchPlan, free_port

__all__ = [
    "TrainingFailedError",
    "TrainingStopped",
    "free_port",
    "launch_training",
    "launcher_command",
    "request_stop",
    "run_launcher",
]

logger = logging.getLogger(__name__)

TAIL_LINES = 400
# How long a launch's ranks may run on after their launcher exited before the verdict stops waiting for them: a
# stop's grace period (90 s by default) and the checkpoint it writes.
RANKS_OUTLIVE_LAUNCHER_S = 600.0


def _tee(source: IO[bytes], sink: IO[str], tail: deque[str]) -> None:
    """Copy ``source`` to ``sink`` as it arrives (carriage returns kept), remembering its last lines."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := source.read1(65536):
        text = decoder.decode(chunk)
        sink.write(text)
        sink.flush()
        pending += text
        *lines, pending = re.split(r"[\r\n]", pending)
        tail.extend(line for line in lines if line.strip())
    if pending.strip():
        tail.append(pending)


def run_launcher(
    command: list[str], output_dir: str | os.PathLike, *, cwd: Path, env: dict[str, str], launch_id: str | None = None
) -> None:
    """Run ``command``, streaming its output; raise ``TrainingFailedError`` unless it leaves a finished model.

    An interrupt (Ctrl-C, an interrupted notebook cell, SIGTERM to this process) asks the ranks to stop after their
    step and waits for them: the launcher exits only after every rank, and ``TrainingStopped`` says at which step.
    A second interrupt stops the launch at once (its process group, SIGTERM then SIGKILL).
    """
    warn_about_running_launches(output_dir)
    logger.info("Launching: %s", shlex.join(command))
    # A session of its own: a terminal's Ctrl-C reaches this process only, which stops the ranks its own way.
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    record = record_launch(process.pid, output_dir, shlex.join(command))
    try:
        # (a second for a coarse clock)
        _wait_for_launcher(process, output_dir, started=time.time() - 1.0, launch_id=launch_id)
    finally:
        record.unlink(missing_ok=True)


def _wait_for_launcher(
    process: subprocess.Popen, output_dir: str | os.PathLike, *, started: float, launch_id: str | None = None
) -> None:
    """Stream a started launch's output until it and its ranks end; raise as :func:`run_launcher` says.

    The ranks can outlive their launcher (DeepSpeed's runner exits at once on SIGTERM; its ranks finish their step,
    or the publish they are in): the verdict waits for them (they hold the output pipes), then reads the folder, so
    a model published after a stop is reported as finished, and a stop as a stop, whoever asked for it.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    readers = [
        threading.Thread(target=_tee, args=(process.stdout, sys.stdout, tail), daemon=True),
        threading.Thread(target=_tee, args=(process.stderr, sys.stderr, tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        returncode, stop_requested = wait_stopping_on_interrupt(
            process.wait, output_dir, stop_at_once=lambda: end_process_group(process), launch_id=launch_id
        )
    except BaseException:
        end_process_group(process)
        raise
    deadline = time.monotonic() + RANKS_OUTLIVE_LAUNCHER_S
    for reader in readers:
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(reader.is_alive() for reader in readers):
        logger.warning(
            "Processes of this launch still run %.0f s after its launcher exited (they hold its output): see ps",
            RANKS_OUTLIVE_LAUNCHER_S,
        )
    lines = list(tail)
    if returncode != 0 and published_since(output_dir, started):
        logger.warning(
            "The launcher exited with code %s after the model was published: training finished (%s); what ran "
            "after the publish (its copy, MLflow logging) may be incomplete, see the log above",
            returncode,
            output_dir,
        )
        return
    if returncode != 0 and (stop_requested or ranks_reported_a_stop(lines)):
        raise stopped_error(output_dir, f"the launcher exited with code {returncode}")
    if returncode != 0:
        raise TrainingFailedError(
            f"training failed (the launcher exited with code {returncode}). The failing rank reported:\n"
            f"{failure_summary(lines)}"
        )
    if not is_finished_output(output_dir):
        raise TrainingFailedError(f"the launcher exited 0 but {output_dir} holds no finished model")
    logger.info("Training finished: %s", output_dir)


def end_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a launcher and everything it started at once: SIGTERM to its process group, SIGKILL to what is left."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAINER_MODULE = "training.trainer"


def launcher_command(plan: LaunchPlan) -> list[str]:
    """The command that starts ``plan`` on this node: ``deepspeed ... --module training.trainer FLAGS`` or
    ``torchrun ... -m training.trainer FLAGS``, the flags written from the plan's settings."""
    port = str(plan.rendezvous_port())
    if plan.launcher == "deepspeed":
        command = [launcher_executable("deepspeed")]
        if plan.processes_per_node is not None:
            command.append(f"--num_gpus={plan.processes_per_node}")
        command += ["--master_port", port, "--module", TRAINER_MODULE]
    elif plan.launcher == "torchrun":
        per_node = str(plan.processes_per_node) if plan.processes_per_node is not None else "gpu"
        command = [
            launcher_executable("torchrun"),
            "--nnodes",
            "1",
            "--nproc-per-node",
            per_node,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "-m",
            TRAINER_MODULE,
        ]
    else:
        raise ValueError(
            f"launcher '{plan.launcher}' is not started from a command line here (see training.driver.spark)"
        )
    return command + command_line(plan.settings.overrides())


def launcher_executable(name: str) -> str:
    """The environment's own launcher script (beside its python, even when that folder is not on PATH), else ``name``."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else name


def launch_training(plan: LaunchPlan, *, spark=None) -> None:
    """Run ``plan``: its launcher on this node, streaming its output, or on Spark's workers (``spark``: the session).

    Raises ``TrainingFailedError`` with the failing rank's error if training fails, or if the launch ends without a
    finished model in the plan's output folder.
    """
    if plan.launcher == "spark":
        from .spark import train_on_spark

        train_on_spark(plan, spark)
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run_launcher(launcher_command(plan), plan.output_dir, cwd=PROJECT_ROOT, env=env, launch_id=plan.launch_id)
